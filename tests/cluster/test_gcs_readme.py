"""README's gs:// commands, run against the GCS emulator (tests/gcs.py), each through an injected
503 on an object it reads or writes; and the same paths failing, naming the object, when the
fault is permanent.

The commands are taken from README.md's bash blocks as written (``gs://my-bucket`` becomes the
test's bucket, ``./sd-vae-ft-ema`` the tiny VAE, ``--address auto`` the session's Ray cluster),
then flags are appended that shrink them to test size (argparse keeps the last value):
`cluster/train/launch.sh` runs ``python -m trainer.train`` with the same flags under torchrun, so
its flags are run as ``sit train`` in one process here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from cluster.cli import main
from latents.format import shard_name
from pipeline.synthetic import synthetic_images, write_parquet

ROOT = Path(__file__).resolve().parents[2]
SHRINK = {
    "encode": ["--resolution", "64", "--dtype", "fp32", "--shard-size", "8", "--quiet"],
    "train": [
        *("--preset", "tiny-cpu", "--steps", "4", "--set", "model.num_classes=1000", "--set", "checkpoint.every=2"),
        *("--set", "log.eval_every=2", "--set", "log.eval_samples=8", "--set", "log.eval_steps=2"),
        *("--set", "data.global_batch_size=8", "--set", "log.tensorboard=false", "--set", "log.progress=false"),
    ],
    "status": [],
    "sample": ["--num-samples", "6", "--steps", "3", "--chunk-size", "4", "--batch-size", "4", "--quiet"],
}


def readme_gs_commands() -> list[list[str]]:
    """The README's bash commands that name gs://, as argument lists after ``sit``, in order; a
    launch.sh line becomes ``train``. `sit status` of a run trained on gs:// is included."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line)
            if not words:
                continue
            if "cluster/train/launch.sh" in words:
                words = ["sit", "train", *words[words.index("cluster/train/launch.sh") + 1 :]]
            if words[0] == "sit" and (any("gs://" in w for w in words) or words[1] == "status"):
                commands.append(words[1:])
    return commands


def localise(args: list[str], bucket: str, vae: str, ray_address: str) -> list[str]:
    out = [a.replace("gs://my-bucket", bucket).replace("./sd-vae-ft-ema", vae) for a in args]
    return [ray_address if a == "auto" and out[i - 1] == "--address" else a for i, a in enumerate(out)]


def test_readme_holds_the_gs_commands():
    assert [c[0] for c in readme_gs_commands()] == ["encode", "train", "status", "sample"]


@pytest.mark.slow
def test_readme_gs_commands_run_through_a_503_each(
    tmp_path, monkeypatch, gcs_bucket, gcs_faults, ray_address, tiny_vae_dir, capsys
):
    write_parquet(f"{gcs_bucket}/imagenet-parquet", synthetic_images(num_classes=2, per_class=8, broken=0), files=2)
    monkeypatch.chdir(tmp_path)  # runs/... of the README is relative
    key = gcs_bucket.removeprefix("gs://")
    faults = {  # one transient fault per path, on an object that command reads or writes
        "encode": [("imagenet-parquet/", "GET"), (f"latents/imagenet-512/{shard_name(0)}", "POST")],
        "train": [("runs/xl2-512/step-000000002/COMPLETE.json", "POST"), ("runs/xl2-512/ema.safetensors", "POST")],
        "status": [],
        "sample": [("samples/xl2-512/chunks/", "POST")],
    }
    for args in readme_gs_commands():
        command = args[0]
        injected = [gcs_faults.fault(needle, 503, times=1, method=method) for needle, method in faults[command]]
        run = localise(args, gcs_bucket, str(tiny_vae_dir), ray_address) + SHRINK[command]
        assert main(run) == 0, f"sit {shlex.join(run)}: {capsys.readouterr().err[-2000:]}"
        assert [f.hits for f in injected] == [1] * len(injected), (command, injected)
        out = capsys.readouterr().out
        if command == "status":
            assert f"checkpoint  {gcs_bucket}/runs/xl2-512/step-000000004 (step 4)" in out
            assert "step        4 / 4 (100.0%)" in out and "eval last   step 4: latent FD" in out
            assert f"last {gcs_bucket}/runs/xl2-512/ema.safetensors" in out
    assert main(["verify", f"{gcs_bucket}/latents/imagenet-512"]) == 0
    import gcsfs

    fs = gcsfs.GCSFileSystem(skip_instance_cache=True)
    assert fs.exists(f"{key}/samples/xl2-512/samples.npz")
    assert fs.exists(f"{key}/runs/xl2-512/ema-best.safetensors")  # the best export next to the last one


@pytest.mark.slow
@pytest.mark.parametrize("path", ["checkpoint", "export"])
def test_permanent_fault_on_a_checkpoint_or_export_names_the_object(tmp_path, gcs_bucket, gcs_faults, capsys, path):
    from tests.trainer.conftest import write_toy_dataset

    data = write_toy_dataset(f"{gcs_bucket}/toy", n=32)
    obj = {"checkpoint": "run/step-000000002/COMPLETE.json", "export": "run/ema.safetensors"}[path]
    gcs_faults.fault(obj, 403, times=None, method="POST")
    args = ["train", "--preset", "tiny-cpu", "--data", data, "--run-dir", str(tmp_path / "run"), "--steps", "2"]
    for kv in (f"checkpoint.url={gcs_bucket}/run", f"export_url={gcs_bucket}/run/ema.safetensors"):
        args += ["--set", kv]
    args += ["--set", "log.tensorboard=false", "--set", "log.progress=false"]
    assert main(args) == 1
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sit ")]  # (gcsfs logs too)
    assert len(ours) == 1 and ours[0].startswith(f"sit train: error: writing {gcs_bucket}/{obj}: OSError: Forbidden")


@pytest.mark.slow
def test_permanent_fault_on_a_sample_chunk_names_the_object(tmp_path, gcs_bucket, gcs_faults, capsys, ray_address):
    from tests.sampling.conftest import tiny_sit
    from trainer.export import save_export

    model = tiny_sit()
    ckpt = f"{gcs_bucket}/ema.safetensors"
    save_export(ckpt, model.state_dict(), model.config, {})
    gcs_faults.fault("samples/chunks/", 403, times=None, method="POST")
    args = ["sample", ckpt, f"{gcs_bucket}/samples", "--vae", str(tmp_path / "vae"), "--address", ray_address]
    from tests.conftest import save_tiny_vae

    save_tiny_vae(tmp_path / "vae")
    assert main([*args, *SHRINK["sample"]]) == 1
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sit ")]
    assert len(ours) == 1 and f"{gcs_bucket}/samples/chunks/" in ours[0] and "Forbidden" in ours[0], ours


@pytest.mark.slow
def test_permanent_fault_on_an_encoded_shard_names_the_object(tmp_path, gcs_bucket, gcs_faults, capsys, ray_address):
    from tests.conftest import save_tiny_vae

    write_parquet(f"{gcs_bucket}/src", synthetic_images(num_classes=2, per_class=4, broken=0), files=1)
    save_tiny_vae(tmp_path / "vae")
    gcs_faults.fault(f"dst/{shard_name(0)}", 403, times=None, method="POST")
    vae = str(tmp_path / "vae")
    args = ["encode", f"{gcs_bucket}/src", f"{gcs_bucket}/dst", "--vae", vae, "--address", ray_address]
    assert main([*args, *SHRINK["encode"]]) == 1
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sit ")]
    assert len(ours) == 1 and f"{gcs_bucket}/dst/{shard_name(0)}" in ours[0] and "Forbidden" in ours[0], ours
