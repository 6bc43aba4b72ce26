"""README is the contract: every flag of `python app.py` is documented, and the client example works."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from app import parse_args

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def app_flags() -> list[str]:
    parser_help = subprocess.run([sys.executable, "app.py", "--help"], capture_output=True, text=True, cwd=ROOT,
                                 check=True).stdout
    return sorted(set(re.findall(r"(--[a-z][a-z-]+)", parser_help)) - {"--help"})


def test_every_flag_is_documented_in_readme():
    flags = app_flags()
    assert {"--model", "--device", "--host", "--port", "--db"} <= set(flags)
    missing = [f for f in flags if f"`{f}" not in README]
    assert not missing, f"flags missing from README: {missing}"


def test_defaults_in_readme_match_the_parser():
    args = parse_args([])
    assert f"`{args.host}`" in README and f"`{args.port}`" in README and f"`{args.db}`" in README


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
