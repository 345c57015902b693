import json
from pathlib import Path

from cluster.cli import main
from latents.format import shard_name


def test_inspect(dataset, capsys):
    assert main(["inspect", dataset]) == 0
    out = capsys.readouterr().out
    assert "100 in 6 shards" in out and "z * 0.5 [vae] (applied by the reader)" in out
    assert "compression ratio" in out and "B/sample" in out
    assert main(["inspect", dataset, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 100 and sum(summary["class_histogram"]) == 100
    assert len(summary["class_histogram"]) == 10 and summary["card"]["format_version"] == 2


def test_inspect_incomplete(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 1
    assert "no latent dataset here" in capsys.readouterr().err


def test_verify_ok_and_failing(dataset, capsys):
    assert main(["verify", dataset, "--quiet", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    shard_bytes = sum(f.stat().st_size for f in (Path(dataset) / "shards").iterdir())
    assert "OK" in out and f"100 samples verified; {shard_bytes / 1e6:,.1f} MB in " in out and " MB/s)" in out
    shard = Path(dataset) / shard_name(1)
    shard.write_bytes(shard.read_bytes()[:-3000])
    assert main(["verify", dataset, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "shards/000001.tar: size" in err and "sha256" in err
