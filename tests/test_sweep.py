"""bench.sweep: the table and the winner on hand-made results, each setting's flags, and a tiny sweep end
to end that a rerun resumes instead of repeating."""

from __future__ import annotations

import json

import pytest

from bench.sweep import SETTINGS, gold_order, main, run_flags, table


def row(setting, gold, reached, kl, labels=128, rounds=2, diff=0.1, ci=(0.0, 0.2)):
    return {"setting": setting, "gold": gold, "seed": 0,
            "summary": {"labels": labels, "rounds": rounds,
                        "labels_to_significance": None if reached is None else {"labels": reached, "kl_to_v0": kl},
                        "final": {"kl_to_v0": kl, "gold_mean_diff": diff, "gold_mean_diff_ci": list(ci)}}}


def test_the_winner_is_best_on_its_worst_gold_within_the_kl_limit():
    rows = [row("base", "concise", 128, 1.0), row("base", "keyword", None, 0.5),  # keyword never: 128 + 64
            row("fast", "concise", 64, 2.0), row("fast", "keyword", 128, 3.0),
            row("drifty", "concise", 64, 6.0), row("drifty", "keyword", 64, 4.0),  # KL 6 > 5 on concise
            row("half", "concise", 64, 1.0)]  # no keyword result: not complete
    result = table(rows)
    assert result["golds"] == ["concise", "keyword"]
    assert result["settings"]["base"]["worst"] == 192 and result["settings"]["fast"]["worst"] == 128
    assert not result["settings"]["drifty"]["qualifies"] and not result["settings"]["half"]["complete"]
    assert result["ranking"] == ["fast", "base"] and result["winner"] == "fast"
    # A failed run never qualifies its setting.
    failed = table(rows[:4] + [{"setting": "fast", "gold": "keyword", "seed": 0, "failed": "boom"}])
    assert failed["winner"] == "base" and not failed["settings"]["fast"]["complete"]


def test_when_no_setting_reaches_significance_the_nearest_on_its_worst_gold_wins():
    rows = [row("base", "concise", None, 1.0, diff=0.02, ci=(-0.02, 0.06)),     # z 0.98
            row("base", "keyword", None, 0.5, diff=-0.01, ci=(-0.11, 0.09)),    # z -0.196: its worst
            row("bold", "concise", None, 2.0, diff=0.04, ci=(-0.01, 0.09)),     # z 1.568
            row("bold", "keyword", None, 1.5, diff=0.05, ci=(-0.05, 0.15))]     # z 0.98: its worst
    result = table(rows)
    assert result["settings"]["base"]["min_z"] == pytest.approx(-0.196)
    assert result["settings"]["bold"]["min_z"] == pytest.approx(0.98)
    assert result["ranking"] == ["bold", "base"] and result["winner"] == "bold"
    assert result["winner_reached_significance_on_every_gold"] is False
    assert table([row("a", "concise", 64, 1.0)])["winner_reached_significance_on_every_gold"] is True


def test_a_crossing_that_falls_back_ranks_as_never_by_the_held_rule():
    def rounds(*cis):
        return [{"round": i + 1, "labels": 64 * (i + 1), "gold_mean_diff_ci": list(ci), "kl_to_v0": 0.5}
                for i, ci in enumerate(cis)]

    lucky = row("lucky", "concise", 64, 0.5, diff=0.0, ci=(-0.03, 0.03))
    lucky["rounds"] = rounds((0.01, 0.06), (-0.03, 0.03))  # crossed at 64, back inside noise at 128
    steady = row("steady", "concise", 128, 0.5, diff=0.05, ci=(0.01, 0.09))
    steady["rounds"] = rounds((-0.02, 0.04), (0.01, 0.09))
    result = table([lucky, steady])
    assert result["ranking"] == ["lucky", "steady"]          # the first crossing: 64 beats 128
    assert result["ranking_held"] == ["steady", "lucky"] and result["winner_held"] == "steady"
    assert result["settings"]["lucky"]["golds"]["concise"]["labels_to_held_significance"] is None
    assert result["settings"]["lucky"]["golds"]["concise"]["held_score"] == 192
    # A row kept without its rounds is read from its summary.
    assert table([row("old", "concise", 64, 0.5)])["settings"]["old"]["golds"]["concise"]["held_score"] == 64


def test_each_setting_changes_one_thing_at_the_same_labels():
    from trainers.dpo import DPOConfig

    # Every setting is one change from the screen's base (1 epoch, every click trusted), not from the app's
    # defaults of now (label smoothing 0.25 since the screen chose it).
    base = '{"epochs": 1, "label_smoothing": 0.0}'
    assert run_flags("base", 2, 64) == ["--config", base, "--labels-per-round", "64", "--rounds", "2"]
    assert run_flags("labels_per_round_32", 2, 64) == ["--config", base, "--labels-per-round", "32", "--rounds", "4"]
    assert json.loads(run_flags("lr_5e-4", 2, 64)[1]) == {"epochs": 1, "label_smoothing": 0.0, "learning_rate": 5e-4}
    assert json.loads(run_flags("epochs_2", 2, 64)[1]) == {"epochs": 2, "label_smoothing": 0.0}
    assert json.loads(run_flags("label_smoothing_0.25", 2, 64)[1]) == {"epochs": 1, "label_smoothing": 0.25}
    for name in SETTINGS:
        flags = run_flags(name, 2, 64)
        DPOConfig(**json.loads(flags[flags.index("--config") + 1]))  # every run's config is one DPO takes


def test_a_tiny_sweep_runs_end_to_end_and_a_rerun_resumes(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    argv = ["--golds", "concise", "--settings", "base", "pairs_most_different", "--rounds", "1",
            "--labels-per-round", "8", "--out", str(out), "--workdir", str(tmp_path / "runs"), "--",
            "--model", str(tiny_model_dir), "--max-new-tokens", "8", "--eval-prompts", "4", "--candidates", "3"]
    assert main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["setting"], r["gold"]) for r in rows] == [("base", "concise"), ("pairs_most_different", "concise")]
    for r in rows:
        assert "failed" not in r, r.get("failed")
        assert r["summary"]["labels"] == 8 and r["summary"]["pair_rule"] == (
            "most_different" if r["setting"] == "pairs_most_different" else "random")
    # Both settings sample v0 alike: the second run read v0's replies from the first's cache.
    assert len(list(out.with_suffix(".v0-cache").glob("v0-*.json"))) == 2
    assert rows[0]["rounds"][0]["gold_mean"] == rows[1]["rounds"][0]["gold_mean"]
    final = lines[-1]
    assert set(final["settings"]) == {"base", "pairs_most_different"} and final["golds"] == ["concise"]
    # Again: both runs are in the results already, nothing runs twice.
    assert main(argv) == 0
    assert len(out.read_text().splitlines()) == 2
    capsys.readouterr()
    assert main(["--report", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["settings"] == final["settings"]


def test_a_cut_off_results_line_is_a_clear_message(tmp_path):
    bad = tmp_path / "r.jsonl"
    bad.write_text('{"setting": "base"')
    with pytest.raises(SystemExit, match="line 1 is not JSON"):
        main(["--report", str(bad)])
    with pytest.raises(SystemExit, match="missing.jsonl is not a results file"):
        main(["--report", str(tmp_path / "missing.jsonl")])
    with pytest.raises(SystemExit, match="is not a results file"):
        main(["--report", str(tmp_path)])  # a folder


def test_a_setting_that_already_ranks_below_the_winner_cannot_win_and_is_run_weakest_gold_first():
    rows = [row("fast", "concise", 64, 1.0, diff=0.2, ci=(0.1, 0.3)),      # z 3.92
            row("fast", "keyword", 128, 0.5, diff=0.1, ci=(0.01, 0.19)),   # z 2.178: its weakest
            row("slow", "keyword", None, 0.5),                            # never: 192 > fast's worst 128
            row("even", "keyword", 128, 0.5),                             # 128 so far: may still win
            row("drifty", "keyword", 64, 6.0)]                            # KL 6 > 5: never qualifies
    result = table(rows)
    assert result["winner"] == "fast"
    flags = {name: e["cannot_win"] for name, e in result["settings"].items()}
    assert flags == {"fast": False, "slow": True, "even": False, "drifty": True}
    assert gold_order(["concise", "keyword"], rows) == ["keyword", "concise"]
    assert gold_order(["concise", "keyword"], []) == ["concise", "keyword"]
    # Where nothing reached significance a setting behind on one gold can still win on the total (by
    # reaching significance on the others), so it is not skipped.
    never = [row("base", "concise", None, 1.0), row("base", "keyword", None, 0.5),
             row("behind", "keyword", None, 0.5, diff=-0.1)]
    assert table(never)["settings"]["behind"]["cannot_win"] is False


def test_the_sweep_skips_the_rest_of_a_setting_that_cannot_win(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    rows = [row("base", "concise", 64, 1.0), row("base", "keyword", 64, 0.5),
            row("lr_1e-4", "keyword", None, 0.5)]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # lr_1e-4's concise run would start a real bench.loop (and fail on the missing model): it is skipped.
    assert main(["--golds", "concise", "keyword", "--settings", "base", "lr_1e-4", "--out", str(out),
                 "--", "--model", str(tmp_path / "no-such-model")]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed[0] == {"setting": "lr_1e-4", "gold": "concise",
                          "skipped": "cannot win: ranks below the winner on the golds it has run"}
    assert len(out.read_text().splitlines()) == 3 and printed[-1]["winner"] == "base"


@pytest.mark.parametrize("extra", [["--config", '{"beta": 0.2}'], ['--config={"beta": 0.2}']])
def test_a_config_after_the_separator_is_refused_not_left_to_replace_every_setting(extra, capsys):
    from bench.sweep import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--settings", "lr_5e-4", "--", "--max-new-tokens", "8", *extra])
    assert "would replace every setting's trainer settings" in capsys.readouterr().err
