"""`python -m store export`: every format written from a real store and read back with the tool people
would use (datasets and TRL, the csv module, FastChat's leaderboard code), with the filters and refusals."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from store import Store
from store.__main__ import main
from store.db import now
from store.exports import ExportFilter
from store.formats import ARENA_FIELDS, CSV_COLUMNS, PROVENANCE, markdown_counts
from tests import store_data
from tests.store_data import NASTY, build, one_vote

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "play.db"
    store = Store(path)
    ids = build(store)
    store.close()
    return path, ids


def export(db_path, fmt, out, *extra) -> int:
    return main(["export", "--db", str(db_path), "--format", fmt, "--out", str(out), *map(str, extra)])


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_trl_export_loads_with_datasets_and_trl_renders_it(db, tmp_path, tokenizer, capsys):
    from datasets import load_dataset
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    out = tmp_path / "pairs.jsonl"
    assert export(db[0], "trl", out) == 0
    summary = json.loads(capsys.readouterr().out.strip())
    assert summary["rows"] == store_data.PAIRS and summary["path"] == str(out) and summary["format"] == "trl"
    dataset = load_dataset("json", data_files=str(out), split="train")
    assert dataset.num_rows == store_data.PAIRS
    assert set(dataset.column_names) == {"prompt", "chosen", "rejected"}
    row = next(r for r in dataset if r["chosen"][0]["content"] == NASTY)  # the choice of b over a, texts exact
    assert row["rejected"] == [{"role": "assistant", "content": "hello A"}]
    assert row["prompt"] == [{"role": "system", "content": store_data.SYSTEM}, {"role": "user", "content": "hi"}]
    assert all(is_conversational(r) for r in dataset)
    rendered = maybe_apply_chat_template(row, tokenizer)
    assert rendered["prompt"].endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert rendered["chosen"] == NASTY + "<|im_end|>\n" and rendered["rejected"] == "hello A<|im_end|>\n"


def test_kto_export_has_one_row_per_thumb_with_its_label(db, tmp_path, tokenizer):
    from datasets import load_dataset
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    out = tmp_path / "kto.jsonl"
    assert export(db[0], "kto", out) == 0
    dataset = load_dataset("json", data_files=str(out), split="train")
    assert set(dataset.column_names) == {"prompt", "completion", "label"}
    labels = sorted((r["completion"][0]["content"], r["label"]) for r in dataset)
    assert labels == [("same-ish 1", True), ("thumbs down", False), ("thumbs up", True)]  # held-out thumb left out
    assert is_conversational(dataset[0])
    rendered = maybe_apply_chat_template(dataset[0], tokenizer)
    assert set(rendered) == {"prompt", "completion", "label"} and rendered["completion"].endswith("<|im_end|>\n")
    assert export(db[0], "kto", tmp_path / "all.jsonl", "--include-held-out") == 0
    assert len(jsonl(tmp_path / "all.jsonl")) == store_data.RATINGS + 1


def test_hf_folder_loads_with_provenance(db, tmp_path):
    from datasets import load_from_disk

    path, ids = db
    out = tmp_path / "hf"
    assert export(path, "hf", out, "--include-held-out") == 0
    dataset = load_from_disk(str(out))
    assert dataset.num_rows == store_data.PAIRS + store_data.HELD_OUT_PAIRS
    assert set(PROVENANCE) | {"prompt", "chosen", "rejected"} == set(dataset.column_names)
    rows = dataset.to_list()
    choice = next(r for r in rows if r["turn_id"] == ids["choice_turn"])
    assert choice["chosen"][0]["content"] == NASTY and (choice["chosen_seed"], choice["rejected_seed"]) == (12, 11)
    assert (choice["source"], choice["user"], choice["policy_version"]) == ("choice", "alice", "v0")
    assert (choice["chosen_version"], choice["rejected_version"]) == ("v0", "v0")
    assert choice["judged_at"] >= choice["turn_created_at"] and choice["model_id"] == store_data.MODEL
    assert not (choice["simulated"] or choice["imported"] or choice["held_out"] or choice["arena"])
    edits = [r for r in rows if r["source"] == "edit"]
    assert len(edits) == 2 and all(r["chosen_version"] is None and r["chosen_seed"] is None for r in edits)
    assert [r["user"] for r in rows if r["simulated"]] == ["sim-1"]
    assert [r["user"] for r in rows if r["held_out"]] == ["carol"]
    arena = [r for r in rows if r["arena"]]
    assert [(r["policy_version"], r["chosen_version"], r["rejected_version"]) for r in arena] == [("v0|v1", "v1", "v0")]
    assert all(len(r["feedback_ids"]) >= 1 for r in rows)


def test_csv_round_trips_newlines_commas_quotes_and_nul(db, tmp_path):
    out = tmp_path / "pairs.csv"
    assert export(db[0], "csv", out) == 0
    with open(out, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    assert len(rows) == store_data.PAIRS
    choice = next(r for r in rows if r["source"] == "choice" and r["user"] == "alice")
    assert choice["chosen"] == NASTY and choice["rejected"] == "hello A" and choice["user_message"] == "hi"
    assert json.loads(choice["prompt_json"])[-1] == {"role": "user", "content": "hi"}
    assert {r["simulated"] for r in rows} == {"True", "False"} and {r["held_out"] for r in rows} == {"False"}
    assert all(json.loads(r["feedback_ids"]) for r in rows)


# -- the arena: FastChat's cleaned battle file and its leaderboard's input handling -------------------------
# Faithful copies of what fastchat/serve/monitor/elo_analysis.py and rating_systems.py do with the file
# (lm-sys/FastChat at 0e6d3e4), so the test fails if a field or value they read is missing or wrong.

def fastchat_report_input(battles_json):
    """report_elo_analysis_results' filtering, as written there."""
    battles = pd.DataFrame(battles_json)
    battles = battles.sort_values(ascending=True, by=["tstamp"])
    battles = battles[~(battles["model_a"].isin([]) | battles["model_b"].isin([]))]
    battles = battles[battles["anony"]].reset_index(drop=True)
    battles_no_ties = battles[~battles["winner"].str.contains("tie")]
    return battles, battles_no_ties


def fastchat_compute_elo(df, k=4.0, base=10.0, init_rating=1000.0, scale=400.0):
    """rating_systems.py: get_matchups_models, preprocess_for_elo and compute_elo."""
    n_rows = len(df)
    model_indices, models = pd.factorize(pd.concat([df["model_a"], df["model_b"]]))
    matchups = np.column_stack([model_indices[:n_rows], model_indices[n_rows:]])
    outcomes = np.full(len(df), 0.5)
    outcomes[df["winner"] == "model_a"] = 1.0
    outcomes[df["winner"] == "model_b"] = 0.0
    alpha = math.log(base) / scale
    ratings = np.full(shape=(len(models),), fill_value=init_rating)
    for (a, b), outcome in zip(matchups, outcomes):
        prob = 1.0 / (1.0 + math.exp(alpha * (ratings[b] - ratings[a])))
        ratings[a] += k * (outcome - prob)
        ratings[b] -= k * (outcome - prob)
    return {model: ratings[i] for i, model in enumerate(models.to_list())}


def fastchat_style_features(df):
    """rating_systems.py preprocess_for_style's extraction of STYLE_CONTROL_ELEMENTS_V1 from conv_metadata."""
    elements = ["sum_assistant_a_tokens", "header_count_a", "list_count_a", "bold_count_a",
                "sum_assistant_b_tokens", "header_count_b", "list_count_b", "bold_count_b"]

    def feature(x, name):
        val = x[name]
        return val if isinstance(val, int) else sum(val.values())

    return np.array([df.conv_metadata.map(lambda x: feature(x, e)).values for e in elements], dtype=np.int32)


def fastchat_filter_long_conv(row):
    """elo_analysis.py's filter for the "long" category."""
    return any(sum(turn["num_tokens"] for turn in row[side]) >= 768 for side in ("conversation_a", "conversation_b"))


def test_arena_export_is_fastchat_battle_data_its_leaderboard_reads(db, tmp_path):
    out = tmp_path / "battles.json"
    assert export(db[0], "arena", out) == 0
    battles = json.loads(out.read_text(encoding="utf-8"))  # a JSON array, as clean_battle_data.py writes
    assert len(battles) == store_data.ARENA_VOTES
    for b in battles:
        assert set(b) == set(ARENA_FIELDS)
        assert b["winner"] in {"model_a", "model_b", "tie", "tie (bothbad)"}
        assert {b["model_a"], b["model_b"]} == {"v0", "v1"} and b["anony"] is True and b["judge"] == "bob"
        assert isinstance(b["tstamp"], float) and b["turn"] == 1 and b["language"] == "unknown"
        for side in ("conversation_a", "conversation_b"):
            assert [m["role"] for m in b[side]] == ["user", "assistant"]
            assert all(isinstance(m["content"], str) and isinstance(m["num_tokens"], int) for m in b[side])
        assert b["conversation_a"][0] == b["conversation_b"][0]  # the same question to both sides
    assert sorted(b["winner"] for b in battles) == ["model_b", "tie", "tie (bothbad)"]
    assert [b["tstamp"] for b in battles] == sorted(b["tstamp"] for b in battles)

    frame = pd.read_json(out)  # what elo_analysis.py --clean-battle-file does
    battles_df, no_ties = fastchat_report_input(frame)
    assert len(battles_df) == 3 and len(no_ties) == 1
    ratings = fastchat_compute_elo(battles_df)
    assert ratings["v1"] > ratings["v0"]  # v1 won the one decided battle (first); the ties then pull them closer
    assert fastchat_style_features(battles_df).shape == (8, 3)
    assert not battles_df.apply(fastchat_filter_long_conv, axis=1).any()


def test_markdown_counts_are_fastchats():
    text = "# Title\n## Sub\n1. one\n- a\n* b\n**bold** and __this__\n```\n# not a header **no**\n```"
    assert markdown_counts(text, "_a") == {
        "header_count_a": {"h1": 1, "h2": 1, "h3": 0, "h4": 0, "h5": 0, "h6": 0},
        "list_count_a": {"ordered": 1, "unordered": 2}, "bold_count_a": {"**": 1, "__": 1}}


# -- filters -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("user", sorted(store_data.BY_USER))
def test_user_filter(db, tmp_path, user):
    assert export(db[0], "trl", tmp_path / "u.jsonl", "--user", user) == 0
    assert len(jsonl(tmp_path / "u.jsonl")) == store_data.BY_USER[user]


def test_repeated_user_and_version_filters(db, tmp_path):
    assert export(db[0], "hf", tmp_path / "two", "--user", "alice", "--user", "sim-1") == 0
    from datasets import load_from_disk

    assert sorted(set(load_from_disk(str(tmp_path / "two"))["user"])) == ["alice", "sim-1"]
    for version, n in store_data.BY_VERSION.items():
        out = tmp_path / f"{version}.jsonl"
        assert export(db[0], "trl", out, "--version", version) == 0
        assert len(jsonl(out)) == n
    assert export(db[0], "trl", tmp_path / "both.jsonl", "--version", "v0", "--version", "v1") == 0
    assert len(jsonl(tmp_path / "both.jsonl")) == store_data.PAIRS
    assert export(db[0], "arena", tmp_path / "a.json", "--version", "v1") == 0  # either side of the battle
    assert len(json.loads((tmp_path / "a.json").read_text())) == store_data.ARENA_VOTES


@pytest.mark.parametrize("simulated,n", [("yes", 1), ("no", store_data.PAIRS - 1), ("all", store_data.PAIRS)])
def test_simulated_filter(db, tmp_path, simulated, n):
    assert export(db[0], "trl", tmp_path / "s.jsonl", "--simulated", simulated) == 0
    assert len(jsonl(tmp_path / "s.jsonl")) == n


def test_time_filters_split_at_the_judgment_time(db, tmp_path):
    path, _ = db
    store = Store(path)
    newest = max(r["judged_at"] for r in store.export_pairs(ExportFilter(include_held_out=True)))
    mid = now()
    while mid <= newest:  # the clock's millisecond must move past the last judgment before the split
        mid = now()
    one_vote(store, "dave", "a", "late left", "late right")
    store.close()
    assert export(path, "trl", tmp_path / "late.jsonl", "--since", mid) == 0
    assert [r["chosen"][0]["content"] for r in jsonl(tmp_path / "late.jsonl")] == ["late left"]
    assert export(path, "trl", tmp_path / "early.jsonl", "--until", mid) == 0
    assert len(jsonl(tmp_path / "early.jsonl")) == store_data.PAIRS
    day = mid[:10]  # a date alone reads as midnight UTC
    assert export(path, "trl", tmp_path / "day.jsonl", "--since", day) == 0
    assert len(jsonl(tmp_path / "day.jsonl")) == store_data.PAIRS + 1


# -- refusals ------------------------------------------------------------------------------------------

def test_an_empty_export_says_why_writes_nothing_and_exits_1(db, tmp_path, capsys):
    out = tmp_path / "out" / "none.jsonl"
    assert export(db[0], "trl", out, "--user", "nobody") == 1
    err = capsys.readouterr().err
    assert "nothing to export" in err and '"pairs": 8' in err and '"held_out_pairs": 1' in err
    assert not out.exists() and not (out.parent.exists() and os.listdir(out.parent))


def test_an_existing_output_is_kept_unless_forced(db, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    out.write_text("earlier export\n")
    assert export(db[0], "trl", out) == 1
    assert "exists" in capsys.readouterr().err and out.read_text() == "earlier export\n"
    assert export(db[0], "trl", out, "--force") == 0 and len(jsonl(out)) == store_data.PAIRS
    folder = tmp_path / "hf"
    assert export(db[0], "hf", folder) == 0
    assert export(db[0], "hf", folder, "--force", "--user", "bob") == 0  # replaced whole, nothing left over
    from datasets import load_from_disk

    assert load_from_disk(str(folder)).num_rows == store_data.BY_USER["bob"]
    assert sorted(p for p in os.listdir(tmp_path) if not p.startswith("play.db")) == ["hf", "pairs.jsonl"]


def test_an_unwritable_destination_is_reported_and_leaves_nothing(db, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    for fmt, out in [("trl", tmp_path / "a_file" / "pairs.jsonl"), ("hf", tmp_path / "a_file" / "hf")]:
        assert export(db[0], fmt, out) == 1
        assert f"could not write {out}" in capsys.readouterr().err
    assert (tmp_path / "a_file").read_text() == "not a folder"


@pytest.mark.parametrize("flag,value,message", [("--since", "yesterday", "not an ISO 8601 time"),
                                                 ("--until", "2020-01-01", "is not before")])
def test_bad_filters_are_refused(db, tmp_path, capsys, flag, value, message):
    extra = [flag, value] + (["--since", "2021-01-01"] if flag == "--until" else [])
    assert export(db[0], "trl", tmp_path / "x.jsonl", *extra) == 1
    assert message in capsys.readouterr().err and not (tmp_path / "x.jsonl").exists()


def test_export_cli_end_to_end(db, tmp_path):
    out = tmp_path / "cli.jsonl"
    done = subprocess.run([sys.executable, "-m", "store", "export", "--db", str(db[0]), "--format", "trl",
                           "--out", str(out), "--simulated", "no"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary == {"format": "trl", "rows": store_data.PAIRS - 1, "of": "pairs", "path": str(out),
                       "filters": {"since": None, "until": None, "users": [], "versions": [], "simulated": "no",
                                   "include_held_out": False}}
    assert len(jsonl(out)) == store_data.PAIRS - 1
