"""The import contract (.importlinter) holds, and it is a real check: a planted upward import breaks it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("store", "trainers", "playground", "bench", "tests")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint), "--config", str(cwd / ".importlinter"), "--no-cache"], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_the_layers_contract_is_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def copy_tree(dest: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "artifacts"))
    shutil.copy(ROOT / ".importlinter", dest / ".importlinter")
    return dest


def test_an_upward_import_breaks_the_build(tmp_path):
    tree = copy_tree(tmp_path)
    # The serving layer reaching up into the chat service (lazily, inside a function: still counted).
    target = tree / "playground" / "serving" / "policy.py"
    target.write_text(target.read_text() + "\n\ndef _upward():\n    from playground.chat import ChatService  # noqa\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert "playground.serving.policy -> playground.chat" in result.stdout


def test_bench_importing_tests_breaks_the_build(tmp_path):
    tree = copy_tree(tmp_path)
    target = tree / "bench" / "report.py"
    target.write_text(target.read_text() + "\nimport tests.servers  # noqa\n")
    result = lint_imports(tree)
    assert result.returncode != 0 and "bench.report -> tests.servers" in result.stdout
