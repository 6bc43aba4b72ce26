"""`python -m store import --format trl`: a TRL preference file becomes seed pairs, marked imported, used in
training, left out of the on-policy metrics; bad files import nothing and say which line; nothing doubles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from store import Store, StoreError
from store.__main__ import main
from store.exports import ExportFilter
from store.imports import MAX_IMPORT_FILE_BYTES, MAX_IMPORT_ROWS, MAX_IMPORT_TEXT_CHARS, read_trl
from store.pairs import IMPORT_SOURCE_PREFIX, IMPORT_VERSION, judged_groups, pair_rows
from tests import store_data
from tests.store_data import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = [{"role": "user", "content": "What is 2 + 2?"}]


def row(chosen="4", rejected="5", prompt=None) -> dict:
    return {"prompt": PROMPT if prompt is None else prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def run_import(db, path, *extra) -> int:
    return main(["import", "--db", str(db), "--format", "trl", str(path), *extra])


def export(db, fmt, out, *extra) -> int:
    return main(["export", "--db", str(db), "--format", fmt, "--out", str(out), *extra])


def triples(path) -> Counter:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return Counter(json.dumps([r["prompt"], r["chosen"], r["rejected"]], ensure_ascii=False) for r in rows)


def counts(db) -> dict:
    store = Store(db)
    try:
        stats = store.stats()
    finally:
        store.close()
    return {k: stats[k] for k in ("conversations", "turns", "replies", "feedback", "training_pairs")}


def test_round_trip_export_import_export_gives_the_same_pairs(tmp_path, capsys):
    first_db, second_db = tmp_path / "first.db", tmp_path / "second.db"
    store = Store(first_db)
    build(store)
    store.close()
    exported = tmp_path / "pairs.jsonl"
    assert export(first_db, "trl", exported, "--include-held-out") == 0
    capsys.readouterr()
    assert run_import(second_db, exported, "--user", "team") == 0
    summary = json.loads(capsys.readouterr().out)
    n = store_data.PAIRS + store_data.HELD_OUT_PAIRS
    assert (summary["imported"], summary["skipped_duplicates"], summary["file"]) == (n, 0, "pairs.jsonl")
    again = tmp_path / "again.jsonl"
    assert export(second_db, "trl", again, "--include-held-out") == 0
    assert triples(again) == triples(exported)

    store = Store(second_db)
    pairs = store.export_pairs(ExportFilter(include_held_out=True))
    store.close()
    assert all(p["imported"] == 1 and p["user"] == "team" and p["source"] == "choice" for p in pairs)
    assert all(p["policy_version"] == IMPORT_VERSION and p["model_id"] is None for p in pairs)
    assert all(p["conversation_source"].startswith(f"{IMPORT_SOURCE_PREFIX}pairs.jsonl#") for p in pairs)
    assert len({p["conversation_source"] for p in pairs}) == n  # one conversation, one content hash, per row
    store = Store(second_db)  # the index written once per chunk is the rules' own, applied from scratch
    groups = judged_groups(store.db)
    from_scratch = sorted((g["turn_id"], r["chosen"], r["rejected"]) for g in groups for r in pair_rows(g))
    store.close()
    assert from_scratch == sorted((p["turn_id"], p["chosen"], p["rejected"]) for p in pairs)


def test_importing_the_same_file_twice_adds_nothing(tmp_path, capsys):
    db = tmp_path / "p.db"
    path = write_jsonl(tmp_path / "seed.jsonl", [row("4", "5"), row("four", "five"), row("4", "5")])
    assert run_import(db, path) == 0
    first = json.loads(capsys.readouterr().out)
    assert (first["imported"], first["skipped_duplicates"], first["duplicate_rows"]) == (2, 1, ["line 3"])
    before = counts(db)
    assert before["training_pairs"] == 2
    renamed = tmp_path / "renamed.jsonl"  # the same rows under another name are the same rows
    renamed.write_bytes((tmp_path / "seed.jsonl").read_bytes())
    for again in (path, renamed):
        assert run_import(db, again) == 0
        second = json.loads(capsys.readouterr().out)
        assert (second["imported"], second["skipped_duplicates"]) == (0, 3)
    assert counts(db) == before


def test_a_full_disk_midway_leaves_whole_rows_and_the_same_import_adds_the_rest(tmp_path):
    store = Store(tmp_path / "p.db")
    rows = read_trl(write_jsonl(tmp_path / "seed.jsonl", [row(f"good {i}" + "g" * 3000, f"bad {i}")
                                                          for i in range(12)]))
    store.import_pairs(rows[:1], "seed.jsonl")
    pages = store.db.execute("pragma page_count").fetchone()[0]
    # Room for about one more chunk of 4 rows (3 KB each): a later chunk fails as on a full disk.
    store.db.execute(f"pragma max_page_count = {pages + 6}")
    with pytest.raises(StoreError, match="disk is full.*went in before it.*the same import again") as caught:
        store.import_pairs(rows, "seed.jsonl", chunk_rows=4)
    went_in = int(str(caught.value).split("; ")[1].split(" row")[0])
    assert went_in in (3, 7)  # whole chunks only (the first holds the row already stored)
    stats = store.stats()
    assert stats["conversations"] == stats["training_pairs"] == 1 + went_in and stats["replies"] == 2 * (1 + went_in)
    store.db.execute("pragma max_page_count = 1073741823")
    again = store.import_pairs(rows, "seed.jsonl", chunk_rows=4)
    assert (again.imported, len(again.duplicates)) == (12 - 1 - went_in, 1 + went_in)
    assert store.stats()["training_pairs"] == 12
    store.close()


def test_imported_pairs_are_used_in_training(tmp_path, tiny_loaded):
    from trainers.data import build_round, count_new_pairs

    db = tmp_path / "p.db"
    rows = [row(f"right {i}", f"wrong {i}", [{"role": "user", "content": f"question {i}"}]) for i in range(30)]
    assert run_import(db, write_jsonl(tmp_path / "seed.jsonl", rows)) == 0
    store = Store(db)
    try:
        waiting = count_new_pairs(store, store_data.MODEL, max_length=512)
        data = build_round(store, tiny_loaded.tokenizer, store_data.MODEL, 512, 0.0, 0)
    finally:
        store.close()
    assert waiting == data.new_pairs == len(data.train) and waiting + len(data.held_out) == 30
    assert waiting > 20  # about 90% train, 10% held out
    assert {p.policy_version for p in data.train} == {IMPORT_VERSION}
    assert {(p.chosen_reply_id is not None) for p in data.train} == {True}


def test_imported_pairs_stay_out_of_the_on_policy_metrics(tmp_path, tiny_loaded):
    from trainers.data import build_round
    from trainers.run import round_staleness

    db = tmp_path / "p.db"
    store = Store(db)
    build(store)  # people's pairs, sampled by v0 and v1
    store.close()
    rows = [row(f"right {i}", f"wrong {i}", [{"role": "user", "content": f"q {i}"}]) for i in range(20)]
    assert run_import(db, write_jsonl(tmp_path / "seed.jsonl", rows)) == 0
    store = Store(db)
    try:
        data = build_round(store, tiny_loaded.tokenizer, store_data.MODEL, 512, 0.0, 0)
        imported = [p for p in data.train if p.policy_version == IMPORT_VERSION]
        assert imported and len(imported) < len(data.train)
        stale = round_staleness(data, {}, "v1")
        assert "error" not in stale  # a version named "import" is no "vN": it would void the whole metric
        assert stale["n"] == len(data.train) - len(imported)
        assert stale["by_version"][IMPORT_VERSION] == len(imported)
        # The evaluation's held-out accuracy by sampling version, and the dashboard's votes, leave them out.
        held = store.training_pairs(store_data.MODEL, held_out=True, new=None, include_imported=False)
        assert held and not any(p["imported"] for p in held)
        everyone = store.training_pairs(store_data.MODEL, held_out=True, new=None)
        assert any(p["imported"] for p in everyone)  # ... which the rounds' held-out set does hold
        assert not [v for v in store.votes(store_data.MODEL) if v["a_version"] == IMPORT_VERSION]
        prompts = {p["user_message"] for p in store.user_prompts(store_data.MODEL)}
        assert "hi" in prompts and not prompts & {f"q {i}" for i in range(20)}  # the input drift reads people's
    finally:
        store.close()


def test_plain_strings_and_an_implicit_prompt_are_taken_as_trl_takes_them(tmp_path):
    db = tmp_path / "p.db"
    conversation = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hello"}]
    rows = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},  # TRL's standard format
            {"chosen": conversation + [{"role": "assistant", "content": "Hi!"}],  # implicit prompt
             "rejected": conversation + [{"role": "assistant", "content": "Go away."}]}]
    assert run_import(db, write_jsonl(tmp_path / "mixed.jsonl", rows)) == 0
    store = Store(db)
    pairs = store.export_pairs(ExportFilter(include_held_out=True))
    store.close()
    got = [(p["context"], p["chosen"], p["rejected"]) for p in pairs]
    assert got == [([{"role": "user", "content": "The sky is"}], " blue.", " green."),
                   (conversation, "Hi!", "Go away.")]


def test_control_characters_and_nul_are_kept_exactly(tmp_path):
    db = tmp_path / "p.db"
    odd = "tab\t nul\x00 bell\x07 esc\x1b[31m del\x7f 🙂 مرحبا <script>alert(1)</script>"
    path = write_jsonl(tmp_path / "odd.jsonl", [row(odd, "plain", [{"role": "user", "content": odd}])])
    assert run_import(db, path) == 0
    store = Store(db)
    (pair,) = store.export_pairs(ExportFilter(include_held_out=True))
    store.close()
    assert pair["chosen"] == odd and pair["user_message"] == odd
    assert pair["context"] == [{"role": "user", "content": odd}]


BAD_ROWS = [
    ('{"prompt": [{"role": "user", "content": "hi"}], "chosen": ', "not valid JSON"),
    ({"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "x"}]}, "missing rejected"),
    ({"prompt": PROMPT}, "missing chosen and rejected"),
    (["a", "list"], "a row is a JSON object"),
    ({"chosen": "x", "rejected": "y"}, "missing prompt"),
    (row(prompt=[{"role": "assistant", "content": "I start"}]), "must end with a user message"),
    (row(prompt=[{"role": "hacker", "content": "hi"}]), "has role 'hacker'"),
    (row(prompt=[{"role": "user"}]), "must be a message"),
    (row(prompt=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]), "must be text"),
    (row(prompt=[]), "the prompt has no messages"),
    ({"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
      "rejected": "c"}, "chosen must be one assistant message"),
    ({"prompt": PROMPT, "chosen": [{"role": "user", "content": "a"}], "rejected": "c"}, "one assistant message"),
    (row("x" * (MAX_IMPORT_TEXT_CHARS + 1)), f"the limit is {MAX_IMPORT_TEXT_CHARS:,}"),
    ('{"prompt": "hi", "chosen": "\\ud800", "rejected": "b"}', "unpaired surrogate"),
    ({"prompt": "hi", "chosen": 4, "rejected": "b"}, "must be a string or a list of messages"),
]


@pytest.mark.parametrize("bad,message", BAD_ROWS, ids=[m for _, m in BAD_ROWS])
def test_a_bad_row_imports_nothing_and_names_its_line(tmp_path, capsys, bad, message):
    db = tmp_path / "p.db"
    store = Store(db)
    build(store)
    store.close()
    before = counts(db)
    path = write_jsonl(tmp_path / "bad.jsonl", [row("good 1", "bad 1"), bad, row("good 2", "bad 2")])
    assert run_import(db, path) == 1
    err = capsys.readouterr().err
    assert "line 2" in err and message in err and "nothing imported" in err and "line 1" not in err
    assert counts(db) == before


def test_rows_that_make_no_pair_are_skipped_and_named(tmp_path, capsys):
    db = tmp_path / "p.db"
    path = write_jsonl(tmp_path / "s.jsonl", [row("same", "same"), row("   ", "b"), row("good", "bad"), ""])
    assert run_import(db, path) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["imported"], summary["skipped_no_pair"], summary["no_pair_rows"]) == (1, 2, ["line 1", "line 2"])
    assert counts(db)["training_pairs"] == 1


def test_empty_missing_and_non_utf8_files_are_refused(tmp_path, capsys):
    db = tmp_path / "p.db"
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    for name, message in [("empty.jsonl", "holds no rows"), ("missing.jsonl", "does not exist"),
                          ("latin1.jsonl", "is not UTF-8")]:
        assert run_import(db, tmp_path / name) == 1
        assert message in capsys.readouterr().err
    assert counts(db)["conversations"] == 0


def test_files_over_the_row_or_size_limit_are_refused_before_anything_is_written(tmp_path, capsys):
    db = tmp_path / "p.db"
    line = json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
    (tmp_path / "many.jsonl").write_text(line * (MAX_IMPORT_ROWS + 1))
    with open(tmp_path / "huge.jsonl", "wb") as fh:  # sparse: the size alone is refused, nothing is read
        fh.truncate(MAX_IMPORT_FILE_BYTES + 1)
    for name, message in [("many.jsonl", f"over {MAX_IMPORT_ROWS:,} (MAX_IMPORT_ROWS)"),
                          ("huge.jsonl", "MAX_IMPORT_FILE_BYTES")]:
        assert run_import(db, tmp_path / name) == 1
        assert message in capsys.readouterr().err
    assert counts(db)["conversations"] == 0


def test_a_json_array_and_a_datasets_folder_import(tmp_path, capsys):
    from datasets import Dataset, DatasetDict

    db = tmp_path / "p.db"
    (tmp_path / "array.json").write_text(json.dumps([row("a1", "b1"), row("a2", "b2")]))
    assert run_import(db, tmp_path / "array.json") == 0
    assert json.loads(capsys.readouterr().out)["imported"] == 2
    folder = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list([row("a3", "b3"), row("a1", "b1")]),
                 "test": Dataset.from_list([row("a4", "b4")])}).save_to_disk(str(folder))
    assert run_import(db, folder) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["imported"], summary["duplicate_rows"]) == (2, ["train[1]"])
    assert counts(db)["training_pairs"] == 4


def test_our_hf_export_imports_back(tmp_path, capsys):
    first, second = tmp_path / "first.db", tmp_path / "second.db"
    store = Store(first)
    build(store)
    store.close()
    assert export(first, "hf", tmp_path / "hf") == 0
    assert run_import(second, tmp_path / "hf") == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["imported"] == store_data.PAIRS


def test_a_bad_user_name_is_refused(tmp_path, capsys):
    path = write_jsonl(tmp_path / "seed.jsonl", [row()])
    assert run_import(tmp_path / "p.db", path, "--user", "bad\nname") == 1
    assert "printable" in capsys.readouterr().err and counts(tmp_path / "p.db")["conversations"] == 0


def test_import_cli_end_to_end(tmp_path):
    db = tmp_path / "p.db"
    path = write_jsonl(tmp_path / "seed.jsonl", [row(), '{"broken'])
    command = [sys.executable, "-m", "store", "import", "--db", str(db), "--format", "trl", path]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1 and "line 2: not valid JSON" in done.stderr and done.stdout == ""
    write_jsonl(tmp_path / "seed.jsonl", [row()])
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["imported"] == 1
