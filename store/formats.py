"""The formats `python -m store export` writes, each in the shape the tool that reads it expects.

- trl: TRL's conversational preference format, JSON lines of {"prompt": [messages], "chosen":
  [{"role": "assistant", ...}], "rejected": [...]}: `datasets.load_dataset("json", ...)` reads it and
  TRL's DPOTrainer and RewardTrainer take it as it is.
- kto: TRL's conversational unpaired preference format, {"prompt", "completion", "label"}: one row per
  thumb (up: True, down: False), for KTOTrainer.
- hf: a `datasets` folder (`Dataset.save_to_disk`): the trl columns plus every provenance column.
- csv: one row per pair with the same provenance; the prompt's messages as JSON.
- arena: FastChat's cleaned battle file (a JSON array, `clean_battle_data.py`'s output), which its
  leaderboard (`elo_analysis.py --clean-battle-file`, Elo and Bradley-Terry, style control) reads.

A file or folder is written next to its destination under a temporary name and renamed into place, so a
failed export leaves no half-written file.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FORMATS = ("trl", "kto", "hf", "csv", "arena")
# The provenance every hf and csv row carries, in column order (the texts come first).
PROVENANCE = ("pair_id", "conversation_id", "turn_id", "pair", "source", "policy_version", "chosen_version",
              "rejected_version", "chosen_seed", "rejected_seed", "model_id", "user", "judged_at", "turn_created_at",
              "feedback_ids", "simulated", "imported", "held_out", "arena", "conversation_source")
CSV_COLUMNS = ("user_message", "prompt_json", "chosen", "rejected") + PROVENANCE
# FastChat's winner values, by our choice.
ARENA_WINNER = {"a": "model_a", "b": "model_b", "tie": "tie", "both_bad": "tie (bothbad)"}
# The fields of a row of FastChat's cleaned battle file (clean_battle_data.py's `battles.append(dict(...))`)
# and the style-control metadata rating_systems.py reads (STYLE_CONTROL_ELEMENTS_V1).
ARENA_FIELDS = ("question_id", "model_a", "model_b", "winner", "judge", "conversation_a", "conversation_b", "turn",
                "anony", "language", "tstamp", "conv_metadata")
# FastChat names a language with polyglot's detector; the store keeps none, and says so.
UNKNOWN_LANGUAGE = "unknown"
_CODE_BLOCK = re.compile("```([^`]*)```")


def messages(context: list[dict]) -> list[dict[str, str]]:
    """A stored context as chat messages (role and content only: what a chat template reads)."""
    return [{"role": m["role"], "content": m["content"]} for m in context]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def trl_row(pair: dict) -> dict[str, Any]:
    return {"prompt": messages(pair["context"]), "chosen": assistant(pair["chosen"]),
            "rejected": assistant(pair["rejected"])}


def kto_row(rating: dict) -> dict[str, Any]:
    return {"prompt": messages(rating["context"]), "completion": assistant(rating["text"]),
            "label": rating["rating"] == "up"}


def provenance(pair: dict) -> dict[str, Any]:
    row = {k: pair[k] for k in PROVENANCE}
    for flag in ("simulated", "imported", "held_out", "arena"):
        row[flag] = bool(row[flag])
    return row


def arena_battle(vote: dict) -> dict[str, Any]:
    """One arena vote as a row of FastChat's cleaned battle file. conversation_a/b hold the turn's user
    message and each side's reply (the history before it is the same for both, and was not sampled by
    either side). num_tokens is in the model's own tokens: a reply's length, and on the user message the
    length of the whole prompt the model read (history included), so FastChat's long-conversation filter
    sees what the model read; 0 where the store has no count."""
    user_text = next((m["content"] for m in reversed(vote["context"]) if m["role"] == "user"), "")
    sides = {}
    for side in ("a", "b"):
        sides[side] = [{"role": "user", "content": user_text, "num_tokens": int(vote["prompt_tokens"] or 0)},
                       {"role": "assistant", "content": vote[f"{side}_text"],
                        "num_tokens": int(vote[f"{side}_tokens"] or 0)}]
    metadata: dict[str, Any] = {"turns": 1}
    for side in ("a", "b"):
        metadata[f"sum_assistant_{side}_tokens"] = int(vote[f"{side}_tokens"] or 0)
        metadata.update(markdown_counts(vote[f"{side}_text"], f"_{side}"))
    return {
        "question_id": f"turn{vote['turn_id']}-pair{vote['pair']}",
        "model_a": vote["a_version"], "model_b": vote["b_version"], "winner": ARENA_WINNER[vote["choice"]],
        "judge": vote["user"], "conversation_a": sides["a"], "conversation_b": sides["b"],
        "turn": 1, "anony": True,  # arena pairs are shown blind: which side is which version is revealed after the vote
        "language": UNKNOWN_LANGUAGE, "tstamp": datetime.datetime.fromisoformat(vote["judged_at"]).timestamp(),
        "conv_metadata": metadata,
    }


def markdown_counts(text: str, suffix: str) -> dict[str, dict[str, int]]:
    """Headers, lists and bold spans outside code blocks, counted as FastChat's add_markdown_info.py does
    (its style control takes them as covariates)."""
    text = _CODE_BLOCK.sub("", text)
    return {
        f"header_count{suffix}": {f"h{n}": len(re.findall(rf"^#{{{n}}}\s", text, re.MULTILINE)) for n in range(1, 7)},
        f"list_count{suffix}": {"ordered": len(re.findall(r"^\s*\d+\.\s", text, re.MULTILINE)),
                                "unordered": len(re.findall(r"^\s*[-*+]\s", text, re.MULTILINE))},
        f"bold_count{suffix}": {"**": len(re.findall(r"\*\*[^*\n]+\*\*", text)),
                                "__": len(re.findall(r"__[^_\n]+__", text))},
    }


# -- writers: each takes the rows and a destination, and returns how many rows it wrote ----------------

def write_trl(pairs: list[dict], out: Path) -> int:
    return _write_jsonl([trl_row(p) for p in pairs], out)


def write_kto(ratings: list[dict], out: Path) -> int:
    return _write_jsonl([kto_row(r) for r in ratings], out)


def write_csv(pairs: list[dict], out: Path) -> int:
    with _replaced_file(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, quoting=csv.QUOTE_MINIMAL)
        writer.writeheader()
        for pair in pairs:
            row = provenance(pair)
            row["feedback_ids"] = json.dumps(row["feedback_ids"])
            writer.writerow({"user_message": pair["user_message"],
                             "prompt_json": json.dumps(messages(pair["context"]), ensure_ascii=False),
                             "chosen": pair["chosen"], "rejected": pair["rejected"], **row})
    return len(pairs)


def write_arena(votes: list[dict], out: Path) -> int:
    battles = sorted((arena_battle(v) for v in votes), key=lambda b: b["tstamp"])
    with _replaced_file(out) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(battles, fh, indent=2, ensure_ascii=False)  # as clean_battle_data.py writes it
    return len(battles)


def write_hf(pairs: list[dict], out: Path) -> int:
    import datasets  # lazily: only this format needs it, and it takes a second to import

    message = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    text, integer, flag = datasets.Value("string"), datasets.Value("int64"), datasets.Value("bool")
    features = datasets.Features({
        "prompt": datasets.List(message), "chosen": datasets.List(message), "rejected": datasets.List(message),
        **{k: integer for k in ("pair_id", "conversation_id", "turn_id", "pair", "chosen_seed", "rejected_seed")},
        **{k: text for k in ("source", "policy_version", "chosen_version", "rejected_version", "model_id", "user",
                             "judged_at", "turn_created_at", "conversation_source")},
        "feedback_ids": datasets.List(integer), **{k: flag for k in ("simulated", "imported", "held_out", "arena")},
    })
    rows = [trl_row(p) | provenance(p) for p in pairs]
    dataset = datasets.Dataset.from_list(rows, features=features)
    with _replaced_dir(out) as tmp:
        dataset.save_to_disk(str(tmp))
    return len(rows)


WRITERS: dict[str, Callable[[list[dict], Path], int]] = {
    "trl": write_trl, "kto": write_kto, "hf": write_hf, "csv": write_csv, "arena": write_arena,
}


def _write_jsonl(rows: list[dict], out: Path) -> int:
    with _replaced_file(out) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)


@contextmanager
def _replaced_file(out: Path) -> Iterator[Path]:
    """A temporary file next to `out`, renamed onto it when the block succeeds, removed when it fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _replaced_dir(out: Path) -> Iterator[Path]:
    """A temporary folder next to `out`, put in its place when the block succeeds (an earlier folder there
    is removed only once the new one is in), removed when it fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = None
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f"{tmp.name}.old")
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        elif old is not None:
            old.unlink(missing_ok=True)
