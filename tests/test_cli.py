"""The one entry point: fast help, clear errors for unknown commands, version."""

from __future__ import annotations

import subprocess
import sys

from searchrl.cli import COMMANDS, SERVICES, main


def test_help_lists_every_command(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in [*COMMANDS, "serve"]:
        assert name in out


def test_unknown_command_and_service_fail_with_usage(capsys) -> None:
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main(["serve", "nosuch"]) == 2
    assert "usage: searchrl serve" in capsys.readouterr().err


def test_help_imports_no_heavy_modules() -> None:
    out = subprocess.run([sys.executable, "-m", "searchrl", "--help"], capture_output=True, text=True, check=True)
    assert "serve" in out.stdout
    # lazy imports: no torch / grpc stubs loaded for --help
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, searchrl.cli; searchrl.cli.main(['--help']); print('torch' in sys.modules, 'grpc' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert check.stdout.strip().endswith("False False"), check.stdout


def test_every_command_module_exists() -> None:
    import importlib.util

    for mod, _fn, _help in COMMANDS.values():
        assert importlib.util.find_spec(mod) is not None, mod
    for mod in SERVICES.values():
        assert importlib.util.find_spec(mod) is not None, mod
