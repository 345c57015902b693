"""Checkpoints: completion marker, checksums taken while writing and checked while loading, the
nine damage cases, fallback, retention, object storage (moto S3)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import fsspec
import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from tests.trainer.conftest import (
    assert_identical,
    consolidated,
    run,
    tiny_config,
    train_command,
    write_toy_dataset,
)
from trainer.checkpoint import MARKER, CheckpointError, CheckpointManager, DamagedCheckpointError, step_folder
from trainer.train import train

# the manager used on its own in the test process (no process group): DCP says it assumes one process
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

SETTINGS = {"total_steps": 10, "checkpoint": {"every": 5}, "data": {"global_batch_size": 8}, "export": False}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return write_toy_dataset(str(tmp_path_factory.mktemp("toy") / "ds"), n=32)


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory, data) -> Path:
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    result = train(tiny_config(data, str(run_dir), **SETTINGS))
    assert result.exit_code == 0 and result.step == 10
    return run_dir


@pytest.fixture
def trained(tmp_path, trained_once) -> tuple[str, str]:
    """A copy of a run directory with complete checkpoints at steps 5 and 10; (run_dir, checkpoint url)."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_once, run_dir)
    return str(run_dir), f"{run_dir}/checkpoints"


def template(folder: str) -> dict:
    """Empty tensors for every tensor a (one-rank) checkpoint holds, under DCP's flat keys."""
    metadata = FsspecReader(folder).read_metadata().state_dict_metadata
    return {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in metadata.items()
        if isinstance(m, TensorStorageMetadata)
    }


def _damage(path: Path, how: str) -> None:
    if how == "deleted":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:-7])
    else:  # flipped bytes in the middle, same size
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["deleted", "truncated", "flipped"])
@pytest.mark.parametrize("member", ["__0_0.distcp", "rank-00000.pt", ".metadata"])
def test_damaged_checkpoint_is_named_and_skipped(trained, caplog, how, member):
    _, url = trained
    newest = step_folder(url, 10)
    state = template(step_folder(url, 5))
    _damage(Path(newest) / member, how)
    manager = CheckpointManager(url)
    with pytest.raises(DamagedCheckpointError, match=re.escape(f"{newest}/{member}")):
        manager.verify(newest)
    with pytest.raises(DamagedCheckpointError, match=re.escape(f"{newest}/{member}")) as err:  # named: an error
        manager.restore(newest, state)
    assert "\n" not in str(err.value)
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        folder, local = manager.restore("auto", state)  # automatic resume: the previous one
    assert folder == step_folder(url, 5) and local["step"] == 5
    assert f"{newest}/{member}" in caplog.text


def test_loading_checks_while_reading(trained, tmp_path):
    """A good checkpoint loads to the same tensors as DCP's own reader gives; a flipped byte in a tensor's
    data (which DCP would load without complaint) is caught by the hash taken while reading."""
    _, url = trained
    folder = step_folder(url, 10)
    manager = CheckpointManager(url)
    state = template(folder)
    assert manager.load(folder, state)["step"] == 10
    reference = consolidated(folder, tmp_path)
    assert all(torch.equal(v, reference[f".{k}"]) for k, v in state.items())
    data = Path(folder, "__0_0.distcp")
    raw = bytearray(data.read_bytes())
    raw[-100] ^= 0x01  # inside the last tensor's bytes, not its zip records
    data.write_bytes(bytes(raw))
    with pytest.raises(DamagedCheckpointError, match=re.escape(f"{folder}/__0_0.distcp: sha256")):
        manager.load(folder, template(folder))


def test_folder_without_marker_is_never_loaded_and_resume_continues(trained, data):
    run_dir, url = trained
    (Path(step_folder(url, 10)) / MARKER).unlink()
    assert CheckpointManager(url).restore("auto", template(step_folder(url, 5)))[0] == step_folder(url, 5)
    result = train(tiny_config(data, run_dir, **{**SETTINGS, "total_steps": 12}))
    assert result.resumed_from == step_folder(url, 5)
    assert result.step == 12
    assert (Path(step_folder(url, 10)) / MARKER).exists()  # redone from step 5, marker written last


def test_no_complete_checkpoint_starts_fresh_or_names_the_folder(tmp_path):
    manager = CheckpointManager(str(tmp_path / "none"))
    assert manager.restore("auto", {}) is None
    assert manager.restore("none", {}) is None
    with pytest.raises(CheckpointError, match="step-000000003"):
        manager.restore(str(tmp_path / "none" / "step-000000003"), {})


def test_every_checkpoint_damaged_stops(trained):
    _, url = trained
    for step in (5, 10):
        _damage(Path(step_folder(url, step)) / "rank-00000.pt", "flipped")
    with pytest.raises(CheckpointError, match=r"every complete checkpoint is damaged.*checkpoint\.resume=none"):
        CheckpointManager(url).restore("auto", template(step_folder(url, 5)))


def test_retention_keeps_last_k_and_every_m(tmp_path):
    url = str(tmp_path / "ckpt")
    manager = CheckpointManager(url, keep_last=2, keep_every=4)
    for step in range(2, 14, 2):
        manager.save(step, {"w": torch.full((3,), float(step))}, {"step": step})
    assert manager.complete_steps() == [4, 8, 10, 12]
    state = {"w": torch.zeros(3)}
    assert manager.load(step_folder(url, 8), state) == {"step": 8}
    assert torch.equal(state["w"], torch.full((3,), 8.0))


def test_checkpoints_on_s3(s3_bucket, tmp_path, data):
    url = f"{s3_bucket}/run/checkpoints"
    config = tiny_config(data, str(tmp_path / "run"), **{**SETTINGS, "total_steps": 6, "checkpoint": {"every": 3}})
    config.checkpoint.url = url
    assert train(config).step == 6
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    assert fs.exists(f"{step_folder(url, 6)}/{MARKER}")
    manager = CheckpointManager(url)
    assert manager.complete_steps() == [3, 6]
    manager.verify(step_folder(url, 6))

    config.total_steps = 9
    result = train(config)
    assert result.resumed_from == step_folder(url, 6) and result.step == 9
    fs.rm(f"{step_folder(url, 9)}/{MARKER}".removeprefix("s3://"))
    state = template(step_folder(url, 6))
    assert CheckpointManager(url).restore("auto", state)[0] == step_folder(url, 6)
    fs.pipe(f"{step_folder(url, 6)}/rank-00000.pt".removeprefix("s3://"), b"damaged")
    with pytest.raises(DamagedCheckpointError, match=re.escape("rank-00000.pt")):
        CheckpointManager(url).verify(step_folder(url, 6))
    assert CheckpointManager(url).restore("auto", state)[0] == step_folder(url, 3)


def test_async_save_writes_the_same_checkpoints(tmp_path, data, trained_once):
    run_dir = tmp_path / "async"
    result = train(tiny_config(data, str(run_dir), **{**SETTINGS, "checkpoint": {"every": 5, "async_save": True}}))
    assert result.step == 10
    for step in (5, 10):  # step 5 uploaded in the background while steps 6-10 ran
        ours, blocking = step_folder(f"{run_dir}/checkpoints", step), step_folder(f"{trained_once}/checkpoints", step)
        CheckpointManager(f"{run_dir}/checkpoints").verify(ours)
        assert_identical(consolidated(blocking, tmp_path), consolidated(ours, tmp_path))


def _replicated_bytes(folder: Path) -> dict[str, int]:
    """Per file, the bytes of its items that every rank loads: bytes items and unsharded tensors
    (one chunk; e.g. the optimizer's step counts), which DCP saves once, in one rank's file."""
    metadata = FileSystemReader(str(folder)).read_metadata()
    whole = {
        fqn
        for fqn, m in metadata.state_dict_metadata.items()
        if not isinstance(m, TensorStorageMetadata) or len(m.chunks) == 1
    }
    out: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        if index.fqn in whole:
            out[info.relative_path] = out.get(info.relative_path, 0) + info.length
    return out


@pytest.mark.slow
def test_two_ranks_save_reads_nothing_and_resume_reads_own_share(tmp_path, data):
    """Bytes read per rank, counted by a real fsspec file system (tests/trainer/count_reads.py): saving
    reads nothing back; resuming, each rank reads its own files once, the marker and .metadata, and
    of the other rank's file only the replicated items it needs - never the whole checkpoint."""
    run_dir = tmp_path / "run"
    flags = [f"checkpoint.url=counting://{run_dir}/checkpoints", "checkpoint.every=3", "data.global_batch_size=8"]
    flags += ["export=false"]
    command = train_command(2, data, str(run_dir), *flags)
    probe = [*command[: command.index("trainer.train")], "tests.trainer.count_reads"]
    flags = command[command.index("trainer.train") + 1 :]

    def reads(out: Path, steps: int) -> list[dict[str, int]]:
        done = run([*probe, str(out), *flags, "--set", f"total_steps={steps}"])
        assert done.returncode == 0, done.stdout
        return [json.loads((out / f"reads-{rank}.json").read_text()) for rank in (0, 1)]

    assert reads(tmp_path / "save", 3) == [{}, {}]  # a fresh run writes step 3: nothing read
    folder = run_dir / "checkpoints" / "step-000000003"
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    total = sum(sizes.values())
    replicated = _replicated_bytes(folder)
    for rank, counts in enumerate(reads(tmp_path / "resume", 4)):
        assert all(Path(p).parent == folder for p in counts), counts  # saving step 4 read nothing either
        got = {Path(p).name: n for p, n in counts.items()}
        own, other = f"__{rank}_0.distcp", f"__{1 - rank}_0.distcp"
        assert got[own] == sizes[own] and got[f"rank-{rank:05d}.pt"] == sizes[f"rank-{rank:05d}.pt"]
        assert got[MARKER] == sizes[MARKER] and got[".metadata"] == sizes[".metadata"]
        assert got.get(other, 0) == replicated.get(other, 0), (rank, got, replicated)
        assert f"rank-{1 - rank:05d}.pt" not in got
        assert sum(got.values()) < 0.6 * total, (rank, got, sizes)
