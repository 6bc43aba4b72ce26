"""bench.loop end to end on the tiny model: two tiny rounds per arm, every field in every JSON line, the
summary's labels to significance, a head-to-head of two runs, and the inputs it refuses before it starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.loop import ARMS, DEFAULT_EVAL_FILE, DEFAULT_EVAL_PROMPTS, RUN_FILE

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"round", "labels", "gold_win_rate", "gold_win_rate_ci", "gold_mean", "kl_to_v0", "mean_tokens",
          "distinct_2", "seconds", "gold_mean_diff", "gold_mean_diff_ci", "eval_prompts"}
ROUND_FIELDS = {"round_ties", "round_label_agreement"}  # rounds that labelled something
EVAL_PROMPTS = 6
TINY = ["--max-new-tokens", "8", "--eval-prompts", str(EVAL_PROMPTS)]


def bench_loop(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.loop", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, **(env or {})})


def json_lines(out: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Each arm run once, two rounds of 12 labels: {arm: (the JSON lines, its workdir)}."""
    done = {}
    for arm in ARMS:
        work = tmp_path_factory.mktemp(f"loop-{arm}")
        out = bench_loop("--arm", arm, "--gold", "concise", "--rounds", "2", "--labels-per-round", "12", "--seed", "0",
                         "--model", str(tiny_model_dir), "--workdir", str(work), "--config", '{"epochs": 1}', *TINY)
        assert out.returncode == 0, out.stderr[-2000:]
        done[arm] = (json_lines(out), work)
    return done


@pytest.mark.parametrize("arm", ARMS)
def test_loop_bench_runs_end_to_end_and_reports_every_field(runs, arm):
    lines, work = runs[arm]
    rounds, summary = [line for line in lines if "round" in line], lines[-1]
    assert [line["round"] for line in rounds] == [0, 1, 2]
    for line in rounds:
        assert FIELDS <= set(line), FIELDS - set(line)
        low, high = line["gold_win_rate_ci"]
        assert 0 <= low <= line["gold_win_rate"] <= high <= 1
        low, high = line["gold_mean_diff_ci"]
        assert low <= line["gold_mean_diff"] <= high
        assert line["eval_prompts"] == EVAL_PROMPTS
    for line in rounds[1:]:
        assert ROUND_FIELDS <= set(line), ROUND_FIELDS - set(line)
        assert 0 <= line["round_ties"] <= 12
    assert [line["labels"] for line in rounds] == [0, 12, 24]
    assert rounds[0]["kl_to_v0"] == 0 and rounds[2]["kl_to_v0"] > 0
    assert [line["version"] for line in rounds] == ["v0", "v1", "v2"]
    if arm == "goodhart":
        assert all("proxy_mean" in line for line in rounds)
    # The summary: the headline number (null, or a round that labelled something), and the final version.
    assert summary["summary"] is True and summary["labels"] == 24 and summary["eval_prompts"] == EVAL_PROMPTS
    assert "labels_to_significance" in summary
    reached = summary["labels_to_significance"]
    assert reached is None or (reached["labels"] in (12, 24) and reached["kl_to_v0"] >= 0)
    # The held crossing is the same rule over the same rounds, never earlier than the first crossing.
    from playground.metrics import labels_to_held_significance

    assert summary["labels_to_held_significance"] == labels_to_held_significance(rounds)
    held = summary["labels_to_held_significance"]
    assert held is None or (reached is not None and held["labels"] >= reached["labels"])
    assert summary["final"]["version"] == "v2" and summary["final"]["gold_mean_diff"] == rounds[2]["gold_mean_diff"]
    saved = json.loads((work / RUN_FILE).read_text())
    assert saved["lines"] == rounds and saved["summary"] == summary and saved["args"]["arm"] == arm


def in_process(capsys, *args: str) -> tuple[int, list[dict], str]:
    """bench.loop's main in this process (no interpreter to start): (exit status, JSON lines, stderr)."""
    from bench.loop import main

    status = main(list(args))
    out = capsys.readouterr()
    return status, [json.loads(line) for line in out.out.splitlines() if line.startswith("{")], out.err


def test_head_to_head_scores_two_runs_final_versions_on_the_same_prompts_and_seeds(runs, capsys):
    (_, onpolicy), (_, offline) = runs["onpolicy"], runs["offline"]
    status, [line], err = in_process(capsys, "--head-to-head", str(onpolicy), str(offline), *TINY)
    assert status == 0, err[-2000:]
    assert line["head_to_head"] is True and (line["a"]["arm"], line["b"]["arm"]) == ("onpolicy", "offline")
    assert line["a"]["version"] == line["b"]["version"] == "v2" and line["eval_prompts"] == EVAL_PROMPTS
    low, high = line["gold_mean_diff_ci"]
    assert low <= line["gold_mean_diff"] <= high
    assert line["gold_mean_diff"] == pytest.approx(line["a"]["gold_mean"] - line["b"]["gold_mean"], abs=2e-4)
    # A version against itself from the same seeds writes the same replies: no difference, no width.
    status, [same], err = in_process(capsys, "--head-to-head", str(onpolicy), str(onpolicy), *TINY)
    assert status == 0, err[-2000:]
    assert (same["gold_mean_diff"], same["gold_mean_diff_ci"], same["gold_win_rate"]) == (0.0, [0.0, 0.0], 0.5)


def test_head_to_head_needs_finished_runs(tmp_path, capsys):
    status, _, err = in_process(capsys, "--head-to-head", str(tmp_path / "a"), str(tmp_path / "b"), *TINY)
    assert status == 2 and "--workdir of a finished" in err


def test_an_unknown_gold_stops_before_anything_runs(tiny_model_dir):
    out = bench_loop("--gold", "brevity", "--model", str(tiny_model_dir), timeout=120)
    assert out.returncode == 2 and "unknown gold" in out.stderr.lower()


def test_a_gold_that_returns_nan_stops_before_anything_runs(tiny_model_dir, tmp_path, capsys):
    status, lines, err = in_process(capsys, "--gold", "tests.gold_example:returns_nan", "--model", str(tiny_model_dir),
                                    "--workdir", str(tmp_path / "work"), *TINY)
    assert status == 2 and "must be finite" in err and lines == []
    assert not (tmp_path / "work").exists()


def test_a_gold_that_scores_every_reply_the_same_is_refused_before_any_label(tiny_model_dir, tmp_path, capsys,
                                                                             monkeypatch):
    (tmp_path / "flat_gold.py").write_text("def flat(context, reply):\n    return 0.5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    status, lines, err = in_process(capsys, "--gold", "flat_gold:flat", "--model", str(tiny_model_dir),
                                    "--workdir", str(tmp_path / "work"), *TINY)
    assert status == 2, err[-2000:]
    assert "same score (0.5)" in err and "no labels to learn from" in err
    assert lines == [] and not (tmp_path / "work" / "adapters").exists()


def test_more_eval_prompts_than_the_file_holds_is_a_clear_message(tmp_path, capsys):
    from bench.loop import parse_args

    few = tmp_path / "few.txt"
    few.write_text("Why is the sky blue?\nWhat is rain?\nHow do magnets work?\n")
    for argv, message in [(["--eval-file", str(few), "--eval-prompts", "5"],
                           f"--eval-prompts 5 is more than the 3 prompts in {few}: lower --eval-prompts to at most 3"),
                          (["--eval-prompts", "100000"], "or pass a longer --eval-file"),
                          (["--eval-file", str(tmp_path / "none.txt")], "does not exist"),
                          (["--tau", "0"], "--tau must be > 0")]:
        with pytest.raises(SystemExit) as stop:
            parse_args(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_the_eval_prompts_are_enough_and_never_trained_on_or_probed():
    from playground.evaluation.probes import load_probes
    from playground.sim.prompt_file import load_prompts

    held_out = load_prompts(DEFAULT_EVAL_FILE)
    assert len(held_out) >= DEFAULT_EVAL_PROMPTS >= 128
    probes = {messages[-1]["content"] for messages in load_probes()}
    assert not set(held_out) & (set(load_prompts()) | probes)


def test_check_tells_apart_refuses_only_a_gold_that_scores_every_reply_the_same():
    from playground.sim.gold import Gold, GoldError, check_tells_apart

    flat = Gold("flat", lambda context, reply: 1.0)
    with pytest.raises(GoldError, match=r"gives all 3 of v0's replies the same score \(1\)"):
        check_tells_apart(flat, [1.0, 1.0, 1.0 + 1e-15], "of v0's replies")
    check_tells_apart(flat, [1.0, 1.0, 0.0], "of v0's replies")  # one reply apart is something to learn
    check_tells_apart(flat, [1.0], "of v0's replies")  # one reply: nothing to compare yet


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


def test_v0_cache_is_written_then_read_and_keyed_by_the_sampling(tiny_model_dir, tmp_path):
    cache = tmp_path / "v0"
    common = ["--gold", "concise", "--rounds", "1", "--labels-per-round", "4", "--seed", "0", "--model",
              str(tiny_model_dir), "--config", '{"epochs": 1}', "--v0-cache", str(cache), *TINY]
    first = bench_loop(*common, "--workdir", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr[-2000:]
    files = sorted(cache.glob("v0-*.json"))
    assert len(files) == 2  # v0's replies for the baseline seeds and for the reference (v0 against itself)
    # Replace one file's replies with a marker: the next run must report them, not sample afresh.
    for path in files:
        saved = json.loads(path.read_text())
        assert len(saved["texts"]) == len(saved["n_tokens"]) == EVAL_PROMPTS
        marked = ["cached" + " word" * i for i in range(EVAL_PROMPTS)]  # scores that differ (a gold must)
        path.write_text(json.dumps({"texts": marked, "n_tokens": [3] * EVAL_PROMPTS}))
    second = bench_loop(*common, "--workdir", str(tmp_path / "b"))
    assert second.returncode == 0, second.stderr[-2000:]
    assert json_lines(second)[0]["round"] == 0 and json_lines(second)[0]["mean_tokens"] == 3
    assert json_lines(first)[0]["mean_tokens"] != 3
    # A cache file cut off or edited by hand is sampled again (and rewritten), not a crash.
    files[0].write_text('{"texts": ["cut off')
    files[1].write_text(json.dumps({"texts": ["x"], "n_tokens": [1]}))
    third = bench_loop(*common, "--workdir", str(tmp_path / "b2"))
    assert third.returncode == 0, third.stderr[-2000:]
    assert third.stderr.count("sampling") == 2 and json_lines(third)[0] == {**json_lines(first)[0],
                                                                            "seconds": json_lines(third)[0]["seconds"]}
    assert all(len(json.loads(f.read_text())["texts"]) == EVAL_PROMPTS for f in files)
    # Other sampling settings are another key: new files, nothing read from the marked ones.
    other = bench_loop(*[a if a != "8" else "6" for a in common], "--workdir", str(tmp_path / "c"))
    assert other.returncode == 0, other.stderr[-2000:]
    assert len(list(cache.glob("v0-*.json"))) == 4 and json_lines(other)[0]["mean_tokens"] != 3


def test_eval_draws_score_each_prompt_by_the_mean_of_draws_from_the_single_draw_seeds(tiny_model_dir, tmp_path):
    from playground.sim.gold import resolve_gold
    from playground.sim.prompt_file import load_prompts

    draws = 3
    common = ["--gold", "concise", "--rounds", "1", "--labels-per-round", "4", "--seed", "0", "--model",
              str(tiny_model_dir), "--config", '{"epochs": 1}', *TINY]
    one, many = tmp_path / "one", tmp_path / "many"
    single = bench_loop(*common, "--v0-cache", str(one), "--workdir", str(tmp_path / "a"))
    multi = bench_loop(*common, "--v0-cache", str(many), "--eval-draws", str(draws), "--workdir", str(tmp_path / "b"))
    assert single.returncode == 0 and multi.returncode == 0, (single.stderr + multi.stderr)[-2000:]
    lines = json_lines(multi)
    assert all(line["eval_draws"] == draws for line in lines) and json_lines(single)[-1]["eval_draws"] == 1
    assert lines[-1]["summary"] is True and lines[-1]["eval_prompts"] == EVAL_PROMPTS  # prompts, not replies
    # Draw 0 of every prompt is the reply a single-draw run samples (the same seed); the others differ.
    first = {tuple(json.loads(f.read_text())["texts"]) for f in one.glob("v0-*.json")}
    saved = [json.loads(f.read_text())["texts"] for f in many.glob("v0-*.json")]
    assert len(first) == len(saved) == 2 and all(len(texts) == EVAL_PROMPTS * draws for texts in saved)
    assert {tuple(texts[::draws]) for texts in saved} == first
    assert any(texts[i] != texts[i + 1] for texts in saved for i in range(0, len(texts), draws))
    # Round 0 (v0's second set of seeds against its first): each side's gold mean is the mean over its
    # prompts of the mean over their draws.
    gold, prompts = resolve_gold("concise"), load_prompts(DEFAULT_EVAL_FILE)[:EVAL_PROMPTS]
    means = sorted(sum(gold.score([{"role": "user", "content": prompts[i // draws]}], t)
                       for i, t in enumerate(texts)) / len(texts) for texts in saved)
    zero = lines[0]
    assert zero["round"] == 0
    assert means == pytest.approx(sorted([zero["gold_mean"], zero["gold_mean"] - zero["gold_mean_diff"]]), abs=2e-4)


@pytest.mark.parametrize("draws", ["0", "9"])
def test_eval_draws_out_of_range_is_a_clear_message(draws, capsys):
    from bench.loop import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--eval-draws", draws])
    assert "--eval-draws must be between 1 and 8" in capsys.readouterr().err


def test_edits_cost_a_label_each_and_reach_the_training_pairs_as_the_app_stores_them(tiny_model_dir, tmp_path, capsys):
    """--edit-rate 1: after every vote the annotator writes the gold's better reply (concise: cut to one
    word) where there is one, each edit one label, so a round of 8 labels is its votes and edits together;
    every edit is a feedback row the pair rules turn into (edit, A) and (edit, B)."""
    import sqlite3

    work = tmp_path / "edits"
    status, lines, err = in_process(capsys, "--gold", "concise:target_words=1", "--rounds", "1", "--labels-per-round",
                                    "8", "--seed", "0", "--model", str(tiny_model_dir), "--workdir", str(work),
                                    "--config", '{"epochs": 1}', "--edit-rate", "1", *TINY)
    assert status == 0, err[-2000:]
    rounds, summary = [line for line in lines if "round" in line], lines[-1]
    assert rounds[1]["labels"] == 8 and summary["labels"] == 8 and summary["edit_rate"] == 1.0
    edits = rounds[1]["round_edits"]
    with sqlite3.connect(work / "loop.db") as db:
        kinds = dict(db.execute("select kind, count(*) from feedback group by kind").fetchall())
        edit_pairs = db.execute("select count(*) from training_pairs where edit_feedback_id is not null").fetchone()[0]
        edit_texts = [t for (t,) in db.execute("select value from feedback where kind = 'edit'")]
    assert kinds.get("edit", 0) == edits >= 1 and kinds["choice"] + edits == 8
    # A pair whose better reply is already one word long has no better reply to write: only a vote.
    assert kinds["choice"] > 4
    from playground.sim.gold import count_words

    assert edit_pairs == 2 * edits and all(count_words(t) == 1 for t in edit_texts), edit_texts


def test_no_edits_by_default_draws_and_reports_what_it_did_before(runs):
    """Without --edit-rate the lines carry no round_edits and every label is a vote (the kept results ran so)."""
    lines, work = runs["onpolicy"]
    assert all("round_edits" not in line for line in lines)
    assert lines[-1]["edit_rate"] == 0.0 and lines[-1]["top_p"] == 1.0
    import sqlite3

    with sqlite3.connect(work / "loop.db") as db:
        assert db.execute("select count(*) from feedback where kind = 'edit'").fetchone()[0] == 0


def test_top_p_is_applied_to_the_pairs_and_stored_with_them(tiny_model_dir, tmp_path, capsys):
    import sqlite3

    work = tmp_path / "top-p"
    status, lines, err = in_process(capsys, "--gold", "concise", "--rounds", "1", "--labels-per-round", "4",
                                    "--seed", "0", "--model", str(tiny_model_dir), "--workdir", str(work),
                                    "--config", '{"epochs": 1}', "--top-p", "0.5", *TINY)
    assert status == 0, err[-2000:]
    assert lines[-1]["top_p"] == 0.5
    with sqlite3.connect(work / "loop.db") as db:
        assert {p for (p,) in db.execute("select distinct top_p from replies")} == {0.5}


@pytest.mark.parametrize("flag, value, message", [("--edit-rate", "1.5", "--edit-rate must be between 0 and 1"),
                                                  ("--edit-rate", "-0.1", "--edit-rate must be between 0 and 1"),
                                                  ("--top-p", "0", "--top-p must be in (0, 1]"),
                                                  ("--top-p", "1.2", "--top-p must be in (0, 1]")])
def test_edit_rate_and_top_p_out_of_range_are_clear_messages(flag, value, message, capsys):
    from bench.loop import parse_args

    with pytest.raises(SystemExit):
        parse_args([flag, value])
    assert message in capsys.readouterr().err
