"""Every file in cluster/ (and every `sit` command in the READMEs) is checked against the CLI itself.

* YAML files parse; shell scripts pass `bash -n`; the training launcher's dry run prints the
  torchrun command it would run.
* Every `sit ...` command line found in them - RayJob entrypoints, `ray exec` examples in
  comments, README code blocks - parses with `sit`'s own argparse parser (so a renamed or
  removed flag fails here), and every trainer argument list given to cluster/train/launch.sh
  resolves with `sit train --dry-run` (which also rejects unknown config keys).
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
YAML_FILES = sorted(CLUSTER.rglob("*.yaml"))
SHELL_FILES = sorted([*CLUSTER.rglob("*.sh"), *CLUSTER.rglob("*.sbatch")])
PACKAGES = ("cluster", "latents", "pipeline", "trainer", "sampling")
DOC_FILES = [ROOT / "README.md", *(ROOT / package / "README.md" for package in PACKAGES)]
SHELL_VALUES = {"$DATA": "s3://bucket/data", "$RUN": "s3://bucket/run", "$SLURM_JOB_ID": "1"}


def logical_lines(text: str) -> list[str]:
    """Lines with comment markers removed and backslash continuations joined."""
    out, current = [], ""
    for raw in text.splitlines():
        line = re.sub(r"^\s*#\s?", "", raw).rstrip()
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        out.append(current + line)
        current = ""
    return out


def substitute(text: str) -> str:
    for var, value in SHELL_VALUES.items():
        text = text.replace(f'"{var}"', value).replace(var, value)
    return re.sub(r'"?\$\{?\w+\}?[^"\s]*"?', "x", text)


def sit_commands(path: Path) -> list[list[str]]:
    """argv lists of every `sit <subcommand> ...` in a file (YAML values, comments, code blocks)."""
    texts = [path.read_text()]
    if path.suffix == ".md":  # only code blocks: prose names commands in `backticks`
        texts = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", texts[0], flags=re.S)
    if path.suffix == ".yaml":  # comments from the text, everything else from the parsed values
        texts = ["\n".join(line for line in texts[0].splitlines() if line.lstrip().startswith("#"))]
        for doc in yaml.safe_load_all(path.read_text()):
            texts.extend(str(v) for v in _values(doc))
    commands = []
    for text in texts:
        for line in logical_lines(text):
            # a command starts a line or follows a quote or a space; `sit x` in backticks is prose
            for match in re.finditer(r"(?:^|[\s\"'(])(?:\S*/)?sit ([a-z]+(?: [^\"'`#;|&]*)?)", line):
                argv = [a for a in shlex.split(substitute(match.group(1))) if a != "..."]  # "..." elides
                if argv[0] in SUBCOMMANDS:
                    commands.append(argv)
    return commands


def launcher_arguments(path: Path) -> list[list[str]]:
    """Trainer argument lists given to cluster/train/launch.sh (shell scripts and Job manifests)."""
    found = []
    if path.suffix == ".yaml":
        for doc in yaml.safe_load_all(path.read_text()):
            for container in _containers(doc):
                if container.get("command") == ["cluster/train/launch.sh"]:
                    found.append([str(a) for a in container.get("args", [])])
    else:
        for line in logical_lines(path.read_text()):
            if "cluster/train/launch.sh " in line and not line.lstrip().startswith(("NNODES=", "DRY_RUN")):
                found.append(shlex.split(substitute(line.split("cluster/train/launch.sh ", 1)[1])))
    return found


def _values(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _values(v)
    elif isinstance(node, list):
        for v in node:
            yield from _values(v)
    elif isinstance(node, str):
        yield node


def _containers(node):
    if isinstance(node, dict):
        if "containers" in node:
            yield from node["containers"]
        for v in node.values():
            yield from _containers(v)
    elif isinstance(node, list):
        for v in node:
            yield from _containers(v)


SUBCOMMANDS = set(build_parser()._subparsers._group_actions[0].choices)


def parse(argv: list[str], where: str = ""):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            return build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: `sit {shlex.join(argv)}` does not parse: {stderr.getvalue().strip()}")


def test_cluster_has_the_promised_files():
    names = {p.relative_to(CLUSTER).as_posix() for p in CLUSTER.rglob("*") if p.is_file()}
    for needed in (
        "README.md",
        "docker/Dockerfile",
        "ray/aws.yaml",
        "ray/gcp.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob-encode.yaml",
        "kuberay/rayjob-sample.yaml",
        "train/launch.sh",
        "train/slurm.sbatch",
        "train/k8s-job.yaml",
    ):
        assert needed in names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no document"
    for doc in docs:
        assert isinstance(doc, dict)


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_shell_syntax(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_sit_command_parses():
    checked = {}
    for path in [*YAML_FILES, *SHELL_FILES, *DOC_FILES, CLUSTER / "docker" / "Dockerfile"]:
        for argv in sit_commands(path):
            parse(argv, path.name)
            checked.setdefault(argv[0], []).append(path.name)
    # the manifests must actually run the jobs (a regex that finds nothing would pass vacuously)
    assert {"encode", "sample"} <= set(checked), checked
    assert "rayjob-encode.yaml" in checked["encode"] and "rayjob-sample.yaml" in checked["sample"]


def test_a_wrong_flag_is_caught():
    with pytest.raises(pytest.fail.Exception, match="unrecognized arguments"):
        parse(["encode", "src", "dst", "--no-such-flag"])


def test_launcher_arguments_resolve_with_the_trainer(tmp_path):
    lists = [args for path in [*YAML_FILES, *SHELL_FILES] for args in launcher_arguments(path)]
    assert len(lists) >= 2, "slurm.sbatch and k8s-job.yaml both launch the trainer"
    for args in lists:
        parse(["train", *args])
        result = subprocess.run(
            [sys.executable, "-m", "cluster.cli", "train", *args, "--dry-run"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
        )
        assert result.returncode == 0, f"sit train {shlex.join(args)} --dry-run: {result.stderr}"


def test_launch_dry_run_prints_the_rendezvous():
    env = {"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "NNODES": "2", "NPROC_PER_NODE": "8", "RUN_ID": "r1"}
    env["RDZV_ENDPOINT"] = "node-0:29400"
    result = subprocess.run(
        ["bash", str(CLUSTER / "train" / "launch.sh"), "--preset", "sit-xl2-256", "--steps", "10"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[1:3] == ["-m", "cluster.torchrun"]
    for flag, value in (("--nnodes", "2"), ("--nproc-per-node", "8"), ("--rdzv-endpoint", "node-0:29400")):
        assert argv[argv.index(flag) + 1] == value
    assert argv[argv.index("--rdzv-backend") + 1] == "c10d"
    assert argv[-6:] == ["-m", "trainer.train", "--preset", "sit-xl2-256", "--steps", "10"]
