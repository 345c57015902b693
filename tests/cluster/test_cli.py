import subprocess
import sys

import pytest

from cluster.cli import build_parser, main


def test_models_lists_every_preset(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "SiT-XL/2" in out and "674,834,720" in out and out.count("SiT-") == 16 and "SiT-XL/1" in out


def test_selfcheck_passes_its_checks(capsys):
    assert main(["selfcheck", "--samples", "2048"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "11/11 checks passed" in out


def test_unknown_command_exits_2():
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["nonsense"])
    assert exc.value.code == 2


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout and "models" in out.stdout


def test_user_errors_name_real_exception_classes():
    from importlib import import_module

    from cluster.cli import USER_ERRORS

    for module, name in USER_ERRORS:
        assert issubclass(getattr(import_module(module), name), Exception), (module, name)


def test_user_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    missing = str(tmp_path / "nothing")
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "inspect", missing], capture_output=True, text=True)
    assert (
        out.returncode == 1
        and out.stderr == f"sit inspect: error: {missing}: no latent dataset here (card.json not found)\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "--debug", "inspect", missing], capture_output=True, text=True
    )
    assert out.returncode == 1 and "Traceback" in out.stderr and "DatasetError" in out.stderr
