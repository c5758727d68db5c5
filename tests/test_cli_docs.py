"""What the `gallop` command says about itself and what README.md says about it agree with the code:
every subcommand's --help, every option the README uses or lists, mistyped options and commands."""

from __future__ import annotations

import argparse
import os
import re

import pytest

from gallop_kernels.cli import build_parser, closest_option, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


SUBCOMMANDS = _subparsers()


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_help_runs_and_shows_no_raw_defaults(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert text.startswith(f"usage: gallop {command}")
    assert "(default: None)" not in text and "(default: (" not in text and "(default: [" not in text
    for option_help in re.split(r"\s(?=--?[a-z])", text):  # one option's help never states its default twice
        assert option_help.count("(default") <= 1, option_help


def _commands_in_readme() -> list[tuple[str, str]]:
    """(subcommand, the rest of the line) of every `gallop X ...` / `-m gallop_kernels X ...` in the README."""
    found = []
    for match in re.finditer(r"(?:\bgallop|-m gallop_kernels)\s+(demo|finetune|reproduce|memory)\b([^`\n]*)", README):
        found.append((match.group(1), match.group(2)))
    return found


def test_every_option_the_readme_uses_exists():
    commands = _commands_in_readme()
    assert {c for c, _ in commands} == set(SUBCOMMANDS)  # every subcommand is shown at least once
    for command, rest in commands:
        known = SUBCOMMANDS[command]._option_string_actions
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest):
            assert flag in known, f"README: `gallop {command} ...{rest}` uses {flag}, which gallop {command} lacks"


def _section(heading: str) -> str:
    start = README.index(heading)
    end = README.find("\n#", start + len(heading))
    return README[start:end if end >= 0 else None]


@pytest.mark.parametrize("heading, command", [("## The main job: `gallop demo`", "demo"),
                                              ("### `gallop finetune`", "finetune")])
def test_the_options_a_section_lists_exist(heading, command):
    known = SUBCOMMANDS[command]._option_string_actions
    listed = set(re.findall(r"`(--[a-z][a-z0-9-]*)", _section(heading)))
    assert listed, heading
    assert not listed - set(known), f"{heading} lists {sorted(listed - set(known))}, unknown to gallop {command}"


@pytest.mark.parametrize("given, meant", [
    ("--learning-rate", "--lr"), ("--learning_rate", "--lr"), ("--desnity", "--density"),
    ("--per-device-train-batch-size", "--batch-size"), ("--max_steps", "--max-steps"), ("--wibble", None),
])
def test_the_closest_option(given, meant):
    options = SUBCOMMANDS["finetune"]._option_string_actions
    assert closest_option(given, list(options)) == meant


def test_a_misspelt_option_gets_the_subcommands_usage_and_the_option_meant(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--learning-rate", "1e-4"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith("usage: gallop finetune") and "gallop finetune: error: unrecognized arguments" in err
    assert "did you mean --lr?" in err
    with pytest.raises(SystemExit):
        main(["demoo"])
    assert "did you mean demo?" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["demo", "--steps", "0"], "--steps"), (["demo", "--tiny", "--steps", "0"], "--steps"),
    (["demo", "--lr", "0"], "--lr"), (["demo", "--tiny", "--pretrain-steps", "0"], "--pretrain-steps"),
    (["demo", "--ood-items", "0"], "--ood-items"),
])
def test_numbers_that_make_the_command_meaningless_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_an_unreachable_model_is_one_line_and_exit_2(monkeypatch, capsys):
    from gallop_kernels import models

    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    assert main(["demo", "--quiet", "--model", "SmolLM2-135M-Instrct"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no network" in err[0] and "did you mean SmolLM2-135M-Instruct" in err[0]
