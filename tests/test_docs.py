"""README is the contract: every flag of every command, with its default, is in the README; the client
example works."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

import app
import trainers.run
from playground import report
from playground.sim import simulate

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# Each command's flags table sits under a marker `<!-- flags: COMMAND -->` in README.md.
COMMANDS = {"python app.py": app.parse_args, "python -m trainers.run": trainers.run.parse_args,
            "python -m playground.sim.simulate": simulate.parse_args, "python -m playground.report": report.parse_args}


def parser_of(parse_args) -> argparse.ArgumentParser:
    """The parser a command's parse_args builds, caught as it parses an empty command line."""
    built = []
    real = argparse.ArgumentParser.parse_args

    def catch(self, args=None, namespace=None):
        built.append(self)
        return real(self, args, namespace)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", catch):
        parse_args([])
    return built[0]


def flags_table(command: str) -> dict[str, str]:
    """{flag: default cell} of the table under the command's marker."""
    marker = f"<!-- flags: {command} -->"
    assert marker in README, f"README has no flags table for `{command}` (marker {marker})"
    rows = {}
    for line in README.split(marker, 1)[1].lstrip().splitlines():
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0].startswith("`--"):
            rows[cells[0].strip("`")] = cells[1]
    return rows


def documented_default(action: argparse.Action, cell: str) -> bool:
    """Whether a table's default cell says what the parser does when the flag is left out: `off` for a
    switch, `none` for no value, else the value in backticks, read as the flag would read it (so `5`
    documents 5.0); a path inside the checkout is written relative to it."""
    if isinstance(action, argparse._StoreTrueAction):
        return cell == "off"
    if action.default is None:
        return cell == "none"
    if not (len(cell) > 2 and cell[0] == cell[-1] == "`"):
        return False
    default = action.default
    if isinstance(default, str) and Path(default).is_absolute() and Path(default).is_relative_to(ROOT):
        default = Path(default).relative_to(ROOT).as_posix()
    try:
        return (action.type or str)(cell[1:-1]) == default
    except ValueError:  # `5 min` for an int flag
        return False


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_and_its_default_is_in_the_readme(command):
    actions = [a for a in parser_of(COMMANDS[command])._actions if not isinstance(a, argparse._HelpAction)]
    table = flags_table(command)
    flags = {flag: action for action in actions for flag in action.option_strings if flag.startswith("--")}
    assert len(flags) == len(actions) >= 3  # every option has a long name: the table names that one
    missing = sorted(set(flags) - set(table))
    assert not missing, f"flags of `{command}` missing from its README table: {missing}"
    gone = sorted(set(table) - set(flags))
    assert not gone, f"README documents flags `{command}` no longer has: {gone}"
    wrong = {flag: (table[flag], action.default) for flag, action in flags.items()
             if not documented_default(action, table[flag])}
    assert not wrong, f"README defaults of `{command}` differ from the parser's (README, code): {wrong}"


def test_readme_opens_with_the_two_commands():
    head = README[:1500]
    assert "make run" in head and "make test" in head


def test_every_api_endpoint_is_documented():
    for endpoint in ("/send", "/vote", "/rate", "/edit", "/regenerate", "/new_conversation", "/state",
                     "/training_status", "/train_now", "/pause", "/resume", "/rollback"):
        assert f"`{endpoint}`" in README or f"`{endpoint}`," in README, endpoint


def test_bad_flag_values_are_refused_with_a_message():
    out = subprocess.run([sys.executable, "app.py", "--port", "70000"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "not a port number" in out.stderr
    out = subprocess.run([sys.executable, "app.py", "--device", "tpu"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_missing_model_fails_with_a_clear_message(tmp_path):
    out = subprocess.run([sys.executable, "app.py", "--model", str(tmp_path / "nope.gguf"), "--db",
                          str(tmp_path / "x.db")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 1 and "no GGUF file" in out.stderr


def test_readme_client_example_runs_against_the_live_app(tiny_loaded, tmp_path):
    from tests.servers import running_app

    block = README.split("<!-- client-example -->", 1)[1]
    code = block.split("```python", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) == 5
    with running_app(tiny_loaded, tmp_path / "readme.db") as (url, service):
        namespace = {}
        exec(code.replace("http://127.0.0.1:7860/", url), namespace)  # noqa: S102 - our own README
        assert namespace["pair"]["replies"]["a"]["policy_version"] == "v0"
        assert service.store.stats()["current_feedback"] == {"choice": {"a": 1}}
