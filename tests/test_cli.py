"""The CLI dispatcher: usage, unknown commands and user errors exit 2 with one line, no traceback."""

from __future__ import annotations

from rlhfkit.cli import main


def test_usage_and_unknown_command(capsys):
    assert main([]) == 2
    assert "rlhfkit <command>" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'frobnicate'" in err and "Traceback" not in err


def test_rm_needs_subcommand(capsys):
    assert main(["rm"]) == 2
    assert "rm {train,eval}" in capsys.readouterr().err
