import subprocess
import sys

import pytest

from cluster.cli import build_parser, main


def test_models_lists_every_preset(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "SiT-XL/2" in out and "674,834,720" in out and out.count("SiT-") == 12


def test_demo_passes_its_checks(capsys):
    assert main(["demo", "--samples", "2048"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "11/11 checks passed" in out


def test_unknown_command_exits_2():
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["nonsense"])
    assert exc.value.code == 2


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout and "models" in out.stdout
