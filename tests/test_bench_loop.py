"""bench.loop end to end on the tiny model: two tiny rounds per arm, every field in every JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"round", "labels", "gold_win_rate", "gold_win_rate_ci", "gold_mean", "kl_to_v0", "mean_tokens",
          "distinct_2", "seconds"}


@pytest.mark.parametrize("arm", ["onpolicy", "offline", "goodhart"])
def test_loop_bench_runs_end_to_end_and_reports_every_field(tiny_model_dir, tmp_path, arm):
    out = subprocess.run(
        [sys.executable, "-m", "bench.loop", "--arm", arm, "--gold", "concise", "--rounds", "2",
         "--labels-per-round", "12", "--seed", "0", "--model", str(tiny_model_dir), "--eval-prompts", "6",
         "--max-new-tokens", "8", "--workdir", str(tmp_path / "work"), "--config", '{"epochs": 1}'],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [line["round"] for line in lines] == [0, 1, 2]
    for line in lines:
        assert FIELDS <= set(line), FIELDS - set(line)
        low, high = line["gold_win_rate_ci"]
        assert 0 <= low <= line["gold_win_rate"] <= high <= 1
    assert [line["labels"] for line in lines] == [0, 12, 24]
    assert lines[0]["kl_to_v0"] == 0 and lines[2]["kl_to_v0"] > 0
    assert [line["version"] for line in lines] == ["v0", "v1", "v2"]
    if arm == "goodhart":
        assert all("proxy_mean" in line for line in lines)


def test_an_unknown_gold_stops_before_anything_runs(tiny_model_dir):
    out = subprocess.run([sys.executable, "-m", "bench.loop", "--gold", "brevity", "--model", str(tiny_model_dir)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "unknown gold" in out.stderr.lower()
