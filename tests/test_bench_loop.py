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


def test_goodhart_proxy_agrees_with_concise_above_its_target_and_not_below():
    from bench.loop import DEFAULT_GOODHART_LAMBDA, proxy_gold
    from playground.sim.gold import resolve_gold

    gold = resolve_gold("concise:target_words=25")
    proxy = proxy_gold(gold, DEFAULT_GOODHART_LAMBDA)
    context = [{"role": "user", "content": "Tell me about tea."}]
    words = lambda n: " ".join(["tea"] * n)  # noqa: E731
    # Above the target both prefer the shorter reply: the proxy looks right while the policy is long.
    assert gold.score(context, words(60)) > gold.score(context, words(120))
    assert proxy.score(context, words(60)) > proxy.score(context, words(120))
    # Below it they disagree: gold wants the reply back up to 25 words, the proxy still wants fewer.
    assert gold.score(context, words(25)) > gold.score(context, words(8))
    assert proxy.score(context, words(8)) > proxy.score(context, words(25))
    assert proxy.name == "concise-40xlength"
