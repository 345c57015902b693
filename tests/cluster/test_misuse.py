"""The misuse matrix: every `sit` subcommand, each kind of misuse that applies to it.

Each row of CELLS is (command line, expected exit status, a word the one error line must hold).
Every cell must end with

* exit status 1 (a user error found while running) or 2 (a usage error in the command line, from
  argparse), as README's "Exit statuses" documents;
* exactly one line on stderr, naming the path or the flag, and no traceback;
* nothing created or changed anywhere: the workspace (every input and output path of the rows),
  the tiny VAE and the current folder are listed with sizes, modification times and hashes
  before and after.

Misuses: an output path that is a regular file, holds another kind of artifact (a latent dataset,
a run folder, a sample output, a demo) or cannot be written; an input that is missing, empty,
truncated, header-damaged or of another kind; a URL with an unknown protocol or without
credentials; numeric flags out of range. "Not writable" is a path below a regular file
(``file.txt/sub``): the tests run as root, for whom file permissions stop nothing, and a path
below a file fails for every user.

A new subcommand joins the matrix by adding rows. Most cells run `cluster.cli.main` in this
process and fail before any Ray or torchrun start; none starts Ray. The matrix can fail:
`test_the_matrix_catches_a_removed_check` switches artifact detection off and shows the
sample-into-a-dataset cell failing (sit sample then writes run.json beside the dataset).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest

from cluster.cli import main
from tests.conftest import REFERENCE_DIR
from tests.trainer.conftest import write_toy_dataset

W = "{ws}"  # the workspace, filled in per test run

# (argv, exit status, a word the error line names): the path or flag at fault
ENCODE = ["encode", f"{W}/images"]
VAE = ["--vae", "{vae}"]
CELLS = [
    # ---- sit encode ----------------------------------------------------------------------------------
    (["encode", f"{W}/images", f"{W}/file.txt", *VAE], 1, "file.txt"),
    (["encode", f"{W}/images", f"{W}/file.txt/sub", *VAE], 1, "file.txt"),
    (["encode", f"{W}/images", f"{W}/run", *VAE], 1, "training run"),
    (["encode", f"{W}/images", f"{W}/samples", *VAE], 1, "sample output"),
    (["encode", f"{W}/images", f"{W}/demo", *VAE], 1, "demo"),
    (["encode", f"{W}/missing", f"{W}/new", *VAE], 1, "missing"),
    (["encode", f"{W}/empty", f"{W}/new", *VAE], 1, "empty"),
    (["encode", f"{W}/ds", f"{W}/new", *VAE], 1, "latent dataset"),
    (["encode", f"{W}/file.txt", f"{W}/new", *VAE], 1, "file.txt"),
    (["encode", "foo://bucket/images", f"{W}/new", *VAE], 1, "foo"),
    (["encode", f"{W}/images", "foo://bucket/latents", *VAE], 1, "foo"),
    (["encode", f"{W}/images", "s3://no-credentials/latents", *VAE], 1, "NoCredentialsError"),
    (["encode", f"{W}/images", f"{W}/new", "--vae", f"{W}/ds"], 1, "--vae"),
    (["encode", f"{W}/images", f"{W}/new", "--vae", f"{W}/missing-vae"], 1, "missing-vae"),
    ([*ENCODE, f"{W}/new", *VAE, "--resolution", "100"], 2, "--resolution"),
    ([*ENCODE, f"{W}/new", *VAE, "--resolution", "-8"], 2, "--resolution"),
    ([*ENCODE, f"{W}/new", *VAE, "--resolution", "abc"], 2, "--resolution"),
    ([*ENCODE, f"{W}/new", *VAE, "--max-reject-fraction", "2"], 2, "--max-reject-fraction"),
    ([*ENCODE, f"{W}/new", *VAE, "--micro-batch", "0"], 2, "--micro-batch"),
    ([*ENCODE, f"{W}/new", *VAE, "--shard-size", "-1"], 2, "--shard-size"),
    ([*ENCODE, f"{W}/new", *VAE, "--workers", "0"], 2, "--workers"),
    ([*ENCODE, f"{W}/new", *VAE, "--cpus-per-worker", "0"], 2, "--cpus-per-worker"),
    ([*ENCODE, f"{W}/new", *VAE, "--limit", "0"], 2, "--limit"),
    ([*ENCODE, f"{W}/new", *VAE, "--stored", "mean"], 2, "--stored"),
    # ---- sit train -----------------------------------------------------------------------------------
    (["train", "--preset", "tiny-cpu", "--data", f"{W}/ds", "--run-dir", f"{W}/file.txt"], 1, "file.txt"),
    (["train", "--preset", "tiny-cpu", "--data", f"{W}/ds", "--run-dir", f"{W}/file.txt/run"], 1, "file.txt"),
    (["train", "--preset", "tiny-cpu", "--data", f"{W}/ds", "--run-dir", f"{W}/ds"], 1, "latent dataset"),
    (["train", "--preset", "tiny-cpu", "--data", f"{W}/ds", "--run-dir", f"{W}/samples"], 1, "sample output"),
    (["train", "--preset", "tiny-cpu", "--data", f"{W}/ds", "--run-dir", f"{W}/demo"], 1, "demo"),
    (["train", "--preset", "tiny-cpu", "--data", f"{W}/missing", "--run-dir", f"{W}/new"], 1, "missing"),
    (["train", "--preset", "tiny-cpu", "--data", f"{W}/empty", "--run-dir", f"{W}/new"], 1, "empty"),
    (["train", "--preset", "tiny-cpu", "--data", f"{W}/run", "--run-dir", f"{W}/new"], 1, "training run"),
    (["train", "--preset", "tiny-cpu", "--data", f"{W}/ds-bad-card", "--run-dir", f"{W}/new"], 1, "card.json"),
    (["train", "--preset", "tiny-cpu", "--data", "foo://bucket/ds", "--run-dir", f"{W}/new"], 1, "foo"),
    (["train", "--preset", "tiny-cpu", "--config", f"{W}/missing.json", "--run-dir", f"{W}/new"], 1, "missing.json"),
    (["train", "--preset", "tiny-cpu", "--config", f"{W}/file.txt", "--run-dir", f"{W}/new"], 1, "file.txt"),
    (["train", "--preset", "tiny-cpu", "--set", "optim.lr=fast", "--run-dir", f"{W}/new"], 1, "optim.lr"),
    (["train", "--preset", "tiny-cpu", "--set", "optim.nope=1", "--run-dir", f"{W}/new"], 1, "optim.nope"),
    (["train", "--preset", "nope"], 2, "--preset"),
    (["train", "--preset", "tiny-cpu", "--steps", "0"], 2, "--steps"),
    # ---- sit sample ----------------------------------------------------------------------------------
    (["sample", f"{W}/ckpt/tiny.safetensors", f"{W}/file.txt", *VAE, "--num-samples", "2"], 1, "file.txt"),
    (["sample", f"{W}/ckpt/tiny.safetensors", f"{W}/file.txt/out", *VAE, "--num-samples", "2"], 1, "file.txt"),
    (["sample", f"{W}/ckpt/tiny.safetensors", f"{W}/ds", *VAE, "--num-samples", "2"], 1, "latent dataset"),
    (["sample", f"{W}/ckpt/tiny.safetensors", f"{W}/run", *VAE, "--num-samples", "2"], 1, "training run"),
    (["sample", f"{W}/ckpt/tiny.safetensors", f"{W}/demo", *VAE, "--num-samples", "2"], 1, "demo"),
    (["sample", f"{W}/ckpt/missing.safetensors", f"{W}/new", *VAE, "--num-samples", "2"], 1, "missing"),
    (["sample", f"{W}/ckpt/empty.safetensors", f"{W}/new", *VAE, "--num-samples", "2"], 1, "empty.safetensors"),
    (["sample", f"{W}/ckpt/truncated.safetensors", f"{W}/new", *VAE, "--num-samples", "2"], 1, "truncated"),
    (["sample", f"{W}/ckpt/header.safetensors", f"{W}/new", *VAE, "--num-samples", "2"], 1, "header"),
    (["sample", f"{W}/ckpt/huge-header.safetensors", f"{W}/new", *VAE, "--num-samples", "2"], 1, "huge-header"),
    (["sample", f"{W}/ckpt/junk.pt", f"{W}/new", *VAE, "--num-samples", "2"], 1, "junk.pt"),
    (["sample", f"{W}/ckpt/truncated.pt", f"{W}/new", *VAE, "--num-samples", "2"], 1, "truncated.pt"),
    (["sample", f"{W}/ds", f"{W}/new", *VAE, "--num-samples", "2"], 1, "latent dataset"),
    (["sample", f"{W}/run", f"{W}/new", *VAE, "--num-samples", "2"], 1, "ema.safetensors"),
    (["sample", "foo://bucket/ema.safetensors", f"{W}/new", *VAE, "--num-samples", "2"], 1, "foo"),
    (["sample", f"{W}/ckpt/tiny.safetensors", "s3://no-credentials/out", *VAE, "--num-samples", "2"], 1, "NoCred"),
    (["sample", f"{W}/ckpt/tiny.safetensors", f"{W}/new", "--vae", f"{W}/ds", "--num-samples", "2"], 1, "--vae"),
    (["sample", f"{W}/ckpt/tiny.safetensors", f"{W}/n", "--vae", f"{W}/no-vae", "--num-samples", "1"], 1, "hf downl"),
    (["sample", f"{W}/ckpt/tiny.safetensors", f"{W}/new", *VAE], 1, "--num-samples"),
    (["sample", f"{W}/ckpt/tiny.safetensors", f"{W}/new", *VAE, "--num-samples", "0"], 2, "--num-samples"),
    (["sample", f"{W}/ckpt/tiny.safetensors", f"{W}/new", *VAE, "--num-samples", "2", "--chunk-size", "0"], 2, "chunk"),
    (
        ["sample", f"{W}/ckpt/tiny.safetensors", f"{W}/new", *VAE, "--num-samples", "2", "--batch-size", "-1"],
        2,
        "batch",
    ),
    (["sample", f"{W}/ckpt/tiny.safetensors", f"{W}/new", *VAE, "--num-samples", "2", "--cfg-scale", "-1"], 2, "cfg"),
    (["sample", f"{W}/ckpt/tiny.safetensors", f"{W}/new", *VAE, "--num-samples", "2", "--workers", "0"], 2, "workers"),
    (["sample", f"{W}/ckpt/tiny.safetensors", f"{W}/new", *VAE, "--num-samples", "2", "--steps", "0"], 2, "--steps"),
    (["sample", f"{W}/ckpt/tiny.safetensors", f"{W}/new", *VAE, "--num-samples", "2", "--mode", "fast"], 1, "fast"),
    (["sample", f"{W}/ckpt/tiny.safetensors", f"{W}/ds", *VAE, "--grid"], 1, "latent dataset"),
    (["sample", f"{W}/ckpt/tiny.safetensors", f"{W}/file.txt/grid.png", *VAE, "--grid"], 1, "file.txt"),
    (["sample", f"{W}/ckpt/tiny.safetensors", f"{W}/g.png", *VAE, "--grid", "--per-class", "0"], 2, "--per-class"),
    # ---- sit inspect / sit verify --------------------------------------------------------------------
    (["inspect", f"{W}/missing"], 1, "missing"),
    (["inspect", f"{W}/empty"], 1, "empty"),
    (["inspect", f"{W}/file.txt"], 1, "file.txt"),
    (["inspect", f"{W}/run"], 1, "training run"),
    (["inspect", f"{W}/ds-bad-card"], 1, "card.json"),
    (["inspect", "foo://bucket/ds"], 1, "foo"),
    (["inspect", "s3://no-credentials/ds"], 1, "NoCredentialsError"),
    (["verify", f"{W}/missing"], 1, "missing"),
    (["verify", f"{W}/samples"], 1, "sample output"),
    (["verify", f"{W}/ds-bad-card"], 1, "card.json"),
    (["verify", f"{W}/ds", "--workers", "0"], 2, "--workers"),
    (["verify", f"{W}/ds", "--max-problems", "-1"], 2, "--max-problems"),
    # ---- sit eval ------------------------------------------------------------------------------------
    (["eval", f"{W}/ds", "--ref", f"{W}/images", "--inception", f"{W}/file.txt"], 1, "latent dataset"),
    (["eval", f"{W}/samples", "--ref", f"{W}/run", "--inception", f"{W}/file.txt"], 1, "--ref"),
    (["eval", f"{W}/samples", "--ref", f"{W}/images", "--inception", f"{W}/missing.pt"], 1, "missing.pt"),
    (["eval", f"{W}/samples", "--ref", f"{W}/images", "--inception", f"{W}/ds"], 1, "--inception"),
    (
        ["eval", f"{W}/samples", "--ref", f"{W}/images", "--inception", f"{W}/file.txt", "--save-ref-stats", f"{W}/ds"],
        1,
        "--save-ref-stats",
    ),
    (["eval", f"{W}/samples", "--ref", f"{W}/images", "--inception", f"{W}/file.txt", "--batch-size", "0"], 2, "batch"),
    # ---- sit status ----------------------------------------------------------------------------------
    (["status", f"{W}/missing"], 1, "missing"),
    (["status", f"{W}/empty"], 1, "empty"),
    (["status", f"{W}/file.txt"], 1, "file.txt"),
    (["status", f"{W}/ds"], 1, "ds"),
    (["status", f"{W}/run"], 1, "config.json"),
    (["status", "foo://bucket/run"], 1, "foo"),
    (["status", "s3://no-credentials/run"], 1, "no-credentials"),
    # ---- sit sweep -----------------------------------------------------------------------------------
    (["sweep", "--preset", "tiny-cpu", "--data", f"{W}/ds", *VAE, "--out", f"{W}/file.txt"], 1, "file.txt"),
    (["sweep", "--preset", "tiny-cpu", "--data", f"{W}/ds", *VAE, "--out", f"{W}/file.txt/s"], 1, "file.txt"),
    (["sweep", "--preset", "tiny-cpu", "--data", f"{W}/ds", *VAE, "--out", f"{W}/run"], 1, "training run"),
    (["sweep", "--preset", "tiny-cpu", "--data", f"{W}/missing", *VAE, "--out", f"{W}/new"], 1, "missing"),
    (["sweep", "--preset", "tiny-cpu", "--data", f"{W}/run", *VAE, "--out", f"{W}/new"], 1, "training run"),
    (["sweep", "--preset", "tiny-cpu", "--data", f"{W}/ds", *VAE, "--grid", "model.depht=1,2"], 2, "--grid"),
    (["sweep", "--preset", "tiny-cpu", "--data", f"{W}/ds", *VAE, "--samplers", "sde:cosine"], 2, "--samplers"),
    (["sweep", "--preset", "tiny-cpu", "--data", f"{W}/ds", *VAE, "--sample-steps", "0"], 2, "--sample-steps"),
    # ---- sit demo, sit models, sit selfcheck, sit ----------------------------------------------------
    (["demo", "--quick", "--out", f"{W}/file.txt"], 1, "file.txt"),
    (["demo", "--quick", "--out", f"{W}/file.txt/demo"], 1, "file.txt"),
    (["demo", "--quick", "--fresh", "--out", f"{W}/ds"], 1, "latent dataset"),  # never deleted
    (["demo", "--quick", "--fresh", "--out", f"{W}/run"], 1, "training run"),
    (["demo", "--quick", "--steps", "0"], 2, "--steps"),
    (["models", "--input-size", "0"], 2, "--input-size"),
    (["selfcheck", "--samples", "-5"], 2, "--samples"),
    (["nonsense"], 2, "nonsense"),
    ([], 2, "command"),
]


def _fill(argv: list[str], ws: Path, vae: Path) -> list[str]:
    return [a.replace(W, str(ws)).replace("{vae}", str(vae)) for a in argv]


def cell_id(cell) -> str:
    argv = [a.replace(f"{W}/", "") for a in cell[0] if a not in ("--preset", "tiny-cpu", "--num-samples", "2", "{vae}")]
    return " ".join(a for a in argv if a != "--vae" or argv[-1] == a)[:70] or "(no command)"


def listing(*roots: Path) -> dict[str, tuple]:
    """Every path under ``roots``: (is a folder, size, mtime, sha256 of a file's bytes)."""
    out = {}
    for root in roots:
        for p in sorted([root, *root.rglob("*")]):
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            out[str(p)] = (p.is_dir(), st.st_size if p.is_file() else 0, st.st_mtime_ns, digest)
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Inputs and outputs of every kind, good and damaged."""
    from trainer.export import save_export

    ws = tmp_path_factory.mktemp("misuse")
    (ws / "file.txt").write_text("a regular file\n")
    (ws / "empty").mkdir()
    write_toy_dataset(str(ws / "ds"), n=16)
    bad = write_toy_dataset(str(ws / "ds-bad-card"), n=16)
    card = Path(bad) / "card.json"
    card.write_bytes(card.read_bytes()[:40])  # truncated mid-JSON
    (ws / "run").mkdir()
    (ws / "run" / "config.json").write_text(json.dumps({"total_steps": 2}))
    (ws / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (ws / "samples" / "chunks").mkdir(parents=True)
    (ws / "samples" / "run.json").write_text(json.dumps({"format": "sit-samples", "format_version": 1}))
    (ws / "demo").mkdir()
    (ws / "demo" / "demo-size.json").write_text("{}")
    images = ws / "images" / "n01440764"
    images.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(images / "a.JPEG")

    ckpt = ws / "ckpt"
    ckpt.mkdir()
    from tests.sampling.conftest import TINY, tiny_sit

    save_export(str(ckpt / "tiny.safetensors"), tiny_sit().state_dict(), TINY, {"step": 0})
    data = (ckpt / "tiny.safetensors").read_bytes()
    (ckpt / "empty.safetensors").write_bytes(b"")
    (ckpt / "truncated.safetensors").write_bytes(data[: len(data) - 1000])
    (ckpt / "header.safetensors").write_bytes(data[:8] + b"#" + data[9:])  # the header is no longer JSON
    (ckpt / "huge-header.safetensors").write_bytes(struct.pack("<Q", 10**12) + data[8:100])
    (ckpt / "junk.pt").write_bytes(b"not a checkpoint at all\n" * 10)
    released = (REFERENCE_DIR / "released_sit_tiny" / "state_dict.pt").read_bytes()
    (ckpt / "truncated.pt").write_bytes(released[: len(released) // 2])
    (ws / "cwd").mkdir()
    return ws


@pytest.fixture
def no_credentials(monkeypatch):
    """s3:// without credentials: none in the environment, no profile files, no instance metadata."""
    import s3fs

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # never reached: signing fails first
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def run_sit(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of `sit ARGV` run in this process."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


def check_cell(argv, status, names, ws, vae, capsys, request):
    argv = _fill(argv, ws, vae)
    if any(a.startswith("s3://no-credentials") for a in argv):
        request.getfixturevalue("no_credentials")
    before = listing(ws, vae)
    code, err = run_sit(argv, capsys)
    assert "Traceback" not in err and "weights_only" not in err, err  # never advice to unpickle
    assert err.endswith("\n") and err.count("\n") == 1, f"not exactly one line on stderr:\n{err}"
    assert code == status, (code, err)
    assert names in err, f"the error line does not name {names!r}: {err}"
    assert err.startswith("sit"), err
    assert listing(ws, vae) == before, "files were created or changed"


@pytest.mark.parametrize(("argv", "status", "names"), CELLS, ids=[cell_id(c) for c in CELLS])
def test_misuse_is_one_line_and_writes_nothing(
    argv, status, names, workspace, tiny_vae_dir, capsys, monkeypatch, request
):
    monkeypatch.chdir(workspace / "cwd")  # relative leftovers would land in the listed workspace
    check_cell(argv, status, names, workspace, tiny_vae_dir, capsys, request)


def test_the_matrix_has_enough_cells_and_every_subcommand():
    from cluster.cli import build_parser

    assert len(CELLS) >= 60
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    covered = {argv[0] for argv, _, _ in CELLS if argv}
    assert set(sub.choices) <= covered | {"nonsense"}, set(sub.choices) - covered


def test_the_matrix_catches_a_removed_check(workspace, tiny_vae_dir, capsys, monkeypatch, request, tmp_path):
    """A deliberately broken build: the sample job's output check is removed. The cell `sit sample
    CKPT DATASET` then fails the matrix's checks (run.json is written beside the dataset), so the
    matrix tests the handling, not just an exit status."""
    import shutil

    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws)
    monkeypatch.chdir(ws / "cwd")
    from sampling import job

    def no_ray(address):
        raise job.SampleJobError("no Ray in this test")

    monkeypatch.setattr(job, "require_output", lambda url, kind, flag: None)
    monkeypatch.setattr(job, "connect", no_ray)  # the broken build would go on to sample; stop it there
    cell = (["sample", f"{W}/ckpt/tiny.safetensors", f"{W}/ds", *VAE, "--num-samples", "2"], 1, "latent dataset")
    with pytest.raises(AssertionError) as failure:
        check_cell(*cell, ws, tiny_vae_dir, capsys, request)
    assert "files were created or changed" in str(failure.value) or "latent dataset" in str(failure.value)
    assert (ws / "ds" / "run.json").exists(), "the broken build writes beside the dataset"


def test_help_imports_no_heavy_module_and_every_subcommand_describes_itself():
    """`sit --help` stays fast (no torch, numpy, pyarrow, fsspec or Ray imported; a subprocess so
    that this process's imports do not count); each subcommand has a description and shows defaults."""
    import subprocess
    import sys

    code = (
        "import sys; from cluster.cli import build_parser; p = build_parser(); p.format_help(); "
        "print(sorted(m for m in ('torch', 'numpy', 'pyarrow', 'fsspec', 'ray', 'PIL') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path.cwd())
    assert out.stdout.strip() == "[]", out.stdout
    from cluster.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        assert parser.description and len(parser.description) > 40, name
        text = parser.format_help()
        for action in parser._actions:
            if action.default not in (None, False, [], argparse_suppress()) and action.option_strings:
                assert "default" in (action.help or ""), f"sit {name} {action.option_strings[0]}: default not shown"
        assert "memory://" not in text, name  # per process: useless from a command line
    assert sub.choices["inspect"].description != sub.choices["verify"].description


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


# A few cells as real processes: what a user's terminal gets, import-time warnings included.
PROCESS_CELLS = [
    (["-m", "cluster.cli", "train", "--preset", "tiny-cpu", "--data", f"{W}/ds", "--run-dir", f"{W}/file.txt"], 1,
     "sit train: error: --run-dir"),
    (["-m", "trainer.train", "--preset", "tiny-cpu", "--data", f"{W}/ds", "--run-dir", f"{W}/samples"], 1,
     "error: --run-dir"),
    (["-m", "cluster.cli", "sample", f"{W}/ckpt/header.safetensors", f"{W}/new", *VAE, "--num-samples", "2"], 1,
     "damaged safetensors header"),
    (["-m", "cluster.cli", "encode", f"{W}/images", f"{W}/new", *VAE, "--resolution", "100"], 2, "--resolution"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "status", "names"), PROCESS_CELLS, ids=[c[0][1] + " " + c[0][2] for c in PROCESS_CELLS]
)
def test_misuse_in_a_process_is_one_line(argv, status, names, workspace, tiny_vae_dir):
    import subprocess
    import sys

    argv = _fill(argv, workspace, tiny_vae_dir)
    before = listing(workspace, tiny_vae_dir)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=workspace / "cwd", env=env)
    assert out.returncode == status and out.stderr.count("\n") == 1 and names in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "[rank" not in out.stderr and out.stdout == ""
    assert listing(workspace, tiny_vae_dir) == before


def test_safetensors_are_told_from_torch_files_by_name_or_content():
    """A header length whose first byte is 0x80 (a pickle's first byte) or whose bytes spell "PK" is
    still safetensors: the demo's export had such a length and was once handed to torch.load."""
    from trainer.export import looks_like_safetensors

    for n in (0x80, 0x4B50, 0x1280, 0x34B50):
        assert looks_like_safetensors("ema.bin", n.to_bytes(8, "little") + b'{"a": 1}')
    released = (REFERENCE_DIR / "released_sit_tiny" / "state_dict.pt").read_bytes()
    assert not looks_like_safetensors("model.pt", released) and looks_like_safetensors("x.safetensors", b"")
