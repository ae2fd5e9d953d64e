"""Every command's ``--help`` prints and exits 0 (argparse %-formats help texts: a stray "%" breaks it)."""

import argparse
import importlib

import pytest

from clic.cli import build_parser


def _subcommands(parser: argparse.ArgumentParser) -> list[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return sorted(action.choices)
    return []


@pytest.mark.parametrize("command", _subcommands(build_parser()))
def test_clic_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    # a default written out in the help text is not followed by argparse's "(default: None)"
    assert "(default: None)" not in out and "(default: ())" not in out


def _actions(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """(command, action) of the commands that have actions of their own (``clic realfill learn``)."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += [(name, a) for a in _subcommands(sub)]
    return out


@pytest.mark.parametrize("command, action", _actions(build_parser()))
def test_clic_action_help(command, action, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, action, "--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("module", ["clic_lab.toyworld.train", "clic_lab.toyworld.inpaint", "clic_lab.toyworld.detector",
                                    "clic_lab.toyworld.benchmark"])
def test_module_help(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(["--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out
