"""The small-team story end to end (issue 15's "done when"), through the real app with --auth and
gradio_client: three people sign in, chat and vote under their own names, the admin reads the
per-annotator table, excludes one of them, and the next round's data counts leave that person's pairs
out; then the team's data goes out in TRL's format and loads with `datasets`."""

from __future__ import annotations

import json

from gradio_client import Client

from store import Store
from store.__main__ import main as store_main
from tests.servers import running_app
from tests.test_evaluation import wait_for

TEAM = {"root": ("admin", "root-Pw-team-11"), "ann": ("annotator", "ann-Pw-team-22"),
        "bob": ("annotator", "bob-Pw-team-33")}
FAST = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0}
# A round's subprocess loads the model before it trains: a generous bound on a loaded 2-core machine (the
# wait ends as soon as the round does).
ROUND_WAIT_S = 600
CONVERSATIONS, TURNS = 4, 2  # per person: 8 votes each, in conversations enough that most pairs train


def test_a_team_of_three_signs_in_votes_excludes_one_and_exports(tiny_loaded, tmp_path, capsys):
    db = tmp_path / "team.db"
    store = Store(db)
    for name, (role, password) in TEAM.items():
        store.add_user(name, role, password)
    store.close()
    settings = {"adapters_dir": str(tmp_path / "adapters"), "model_cache": str(tmp_path / "cache"), "enabled": False}
    with running_app(tiny_loaded, db, loop_settings=settings, extra_args=("--auth",)) as (url, service, loop):
        clients = {name: Client(url, auth=(name, password), verbose=False) for name, (_, password) in TEAM.items()}
        for name, client in clients.items():
            for c in range(CONVERSATIONS):
                client.predict(name, None, api_name="/new_conversation")
                for t in range(TURNS):
                    client.predict(f"{name} asks question {c}.{t}", api_name="/send", **FAST)
                    assert client.predict("a" if (c + t) % 2 else "b", api_name="/vote")["choice"] in "ab"
        store = service.store
        voters = store._rows("select user, count(*) as n from feedback group by user order by user")
        assert voters == [{"user": name, "n": CONVERSATIONS * TURNS} for name in sorted(TEAM)]

        # The per-annotator table, as the admin (and the dashboard) read it.
        table = {row["user"]: row for row in clients["root"].predict(api_name="/annotators")}
        assert set(table) == set(TEAM) and all(table[n]["votes"] == CONVERSATIONS * TURNS for n in TEAM)
        pairs_of = {n: store._rows("select count(*) as n from training_pairs where user = ? and held_out = 0",
                                   [n])[0]["n"] for n in TEAM}
        assert all(pairs_of.values()), pairs_of  # every person has pairs outside the held-out split

        # The admin excludes bob; the round started now trains on root's and ann's pairs only.
        assert clients["root"].predict("bob", "votes at random", api_name="/exclude_annotator")["user"] == "bob"
        table = {row["user"]: row for row in clients["root"].predict(api_name="/annotators")}
        assert table["bob"]["excluded"] and not table["ann"]["excluded"]
        clients["root"].predict(api_name="/train_now")
        run = wait_for(lambda: next((r for r in loop.runs() if r["status"] not in ("queued", "running")), None),
                       what="the round after the exclusion", timeout=ROUND_WAIT_S)
        assert run["status"] == "succeeded", run
        counts = json.loads((tmp_path / "adapters" / run["version"] / "manifest.json").read_text())["data"]
        assert counts["excluded_annotators"] == ["bob"]
        # Every pair of root's and ann's is in the round, trained or left out with its counted reason (the tiny
        # random model's reply can merge with the prompt's last token: 'boundary', trainers/data.py); bob's 8 are not.
        assert set(counts["skipped"]) <= {"boundary", "too_long"}
        assert counts["new"] + sum(counts["skipped"].values()) == pairs_of["root"] + pairs_of["ann"]

    # The team's data, out in TRL's conversational preference format, loads with datasets.
    import datasets

    out = tmp_path / "team.jsonl"
    assert store_main(["export", "--db", str(db), "--format", "trl", "--out", str(out)]) == 0
    capsys.readouterr()
    rows = datasets.load_dataset("json", data_files=str(out), split="train")
    assert len(rows) == sum(pairs_of.values())
    assert set(rows.column_names) == {"prompt", "chosen", "rejected"}
    assert rows[0]["prompt"][-1]["role"] == "user" and rows[0]["chosen"][0]["role"] == "assistant"
    only_ann = tmp_path / "ann.jsonl"
    assert store_main(["export", "--db", str(db), "--format", "trl", "--out", str(only_ann), "--user", "ann"]) == 0
    assert len(datasets.load_dataset("json", data_files=str(only_ann), split="train")) == pairs_of["ann"]
