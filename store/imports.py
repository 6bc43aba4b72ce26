"""`python -m store import`: a TRL preference file becomes seed pairs.

Each row becomes a conversation whose source is "import:<file name>#<sha256 of the row>" (the pair
index marks its pairs imported), one turn whose context is the prompt's messages, two replies of
version "import" (chosen in slot a, rejected in slot b) and a recorded choice of "a": the pair rules
(`store/pairs.py`) then index it like any vote, so rounds train on it, while the on-policy metrics
leave it out (no version of ours sampled it).

Accepted rows, as TRL reads them: conversational ({"prompt": [messages], "chosen": [one assistant
message], "rejected": [...]}), with an implicit prompt (no "prompt": chosen and rejected are whole
conversations that share every message but the last), or standard (plain strings, wrapped as a user
message and assistant replies). A file is JSON lines (or one JSON array), or a `datasets` folder saved
with `save_to_disk`. The whole file is checked before anything is written: one bad row imports
nothing and the message names every bad line. A row already in the store (the same prompt, chosen and
rejected, from any file) is skipped and counted, so importing a file twice adds nothing. The rows go in
IMPORT_CHUNK_ROWS to a transaction, so the app's votes never wait long for the write lock; a database
error midway (a full disk) leaves whole rows only, and the same import again adds the rest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from store.pairs import IMPORT_SOURCE_PREFIX, IMPORT_VERSION, index_rows, judged_groups

# Every message of an imported row at most this long: the chat refuses longer messages the same way
# (playground.serving.limits.MAX_STORED_MESSAGE_CHARS), so an import cannot store what a person could not type.
MAX_IMPORT_TEXT_CHARS = 200_000
# Rows per import: every row is read and checked in memory before the first is written, and the store is
# measured up to 100,000 judgments (bench/status_cost.py); a larger set is imported in parts.
MAX_IMPORT_ROWS = 100_000
# A file is read whole before it is checked: past this size it is refused rather than filling memory.
MAX_IMPORT_FILE_BYTES = 1 << 30
# Rows per transaction: each holds the database's write lock, and the app's writes wait for it at most
# BUSY_TIMEOUT_MS (5 s); 2,000 rows of about 1 KB took at most 1.7 s on the 2-core machine under load
# (`python bench/import_cost.py`).
IMPORT_CHUNK_ROWS = 2_000
# Bad lines named in one message at most (a wholly wrong file would otherwise print every line).
MAX_ERRORS_SHOWN = 20
# Who made imported pairs, unless `--user` says; a name like the chat's (MAX_USER_CHARS, printable).
IMPORT_USER = "import"
MAX_USER_CHARS = 100
ROLES = ("system", "user", "assistant")


class ImportFormatError(ValueError):
    """The file is not a TRL preference file we can import; nothing was imported. Says which lines."""


@dataclass(frozen=True)
class ImportRow:
    line: str  # where in the file: "line 3" (JSON lines), "row 3" (an array), "train[3]" (a datasets folder)
    prompt: tuple[tuple[str, str], ...]  # (role, content), ending with the user's message
    chosen: str
    rejected: str

    @property
    def sha(self) -> str:
        canonical = json.dumps([list(map(list, self.prompt)), self.chosen, self.rejected], ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass
class ImportResult:
    file: str
    imported: int = 0
    duplicates: list[str] = field(default_factory=list)  # rows already in the store, or earlier in the file
    no_pair: list[str] = field(default_factory=list)  # chosen identical to rejected, or empty: no pair to make

    def summary(self) -> dict[str, Any]:
        return {"file": self.file, "imported": self.imported, "skipped_duplicates": len(self.duplicates),
                "skipped_no_pair": len(self.no_pair), "duplicate_rows": self.duplicates[:MAX_ERRORS_SHOWN],
                "no_pair_rows": self.no_pair[:MAX_ERRORS_SHOWN]}


def check_user(user: str) -> str:
    if not user or len(user) > MAX_USER_CHARS or not user.isprintable():
        raise ImportFormatError(f"a user name must be 1 to {MAX_USER_CHARS} printable characters")
    return user


def read_trl(path: str | Path) -> list[ImportRow]:
    """Every row of a TRL preference file, checked; ImportFormatError (naming the bad lines) if any is bad."""
    path = Path(path)
    if not path.exists():
        raise ImportFormatError(f"{path} does not exist")
    records = _dataset_records(path) if path.is_dir() else _file_records(path)
    if len(records) > MAX_IMPORT_ROWS:
        raise ImportFormatError(f"{path.name} has {len(records):,} rows, over {MAX_IMPORT_ROWS:,} (MAX_IMPORT_ROWS); "
                                "import it in parts")
    rows, errors = [], []
    for where, record in records:
        try:
            rows.append(_row(where, record))
        except ValueError as exc:
            errors.append(f"{where}: {exc}")
    if errors:
        shown = "\n  ".join(errors[:MAX_ERRORS_SHOWN])
        more = f"\n  ... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise ImportFormatError(f"{path.name}: {len(errors)} bad row(s), nothing imported:\n  {shown}{more}")
    if not rows:
        raise ImportFormatError(f"{path.name} holds no rows")
    return rows


def _file_records(path: Path) -> list[tuple[str, Any]]:
    if path.stat().st_size > MAX_IMPORT_FILE_BYTES:
        raise ImportFormatError(f"{path.name} is over {MAX_IMPORT_FILE_BYTES >> 20:,} MiB (MAX_IMPORT_FILE_BYTES); "
                                "import it in parts")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ImportFormatError(f"{path.name} is not UTF-8 text (byte {exc.start}); nothing imported") from None
    if text.lstrip().startswith("["):  # one JSON array rather than JSON lines
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ImportFormatError(f"{path.name}: not valid JSON at line {exc.lineno} ({exc.msg}); "
                                    "nothing imported") from None
        return [(f"row {i}", item) for i, item in enumerate(items)]
    records, errors = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            errors.append(f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})")
    if errors:
        shown = "\n  ".join(errors[:MAX_ERRORS_SHOWN])
        raise ImportFormatError(f"{path.name}: {len(errors)} malformed line(s), nothing imported:\n  {shown}")
    return records


def _dataset_records(path: Path) -> list[tuple[str, Any]]:
    import datasets  # lazily, as the hf export does

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise ImportFormatError(f"{path} is a folder but not a saved `datasets` dataset ({exc})") from None
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("rows", loaded)]
    return [(f"{name}[{i}]", record) for name, split in splits for i, record in enumerate(split)]


def _row(where: str, record: Any) -> ImportRow:
    if not isinstance(record, dict):
        raise ValueError(f"a row is a JSON object with prompt, chosen and rejected, not {type(record).__name__}")
    missing = [k for k in ("chosen", "rejected") if record.get(k) is None]
    if missing:
        raise ValueError(f"missing {' and '.join(missing)}")
    chosen, rejected = record["chosen"], record["rejected"]
    if record.get("prompt") is None:  # TRL's implicit prompt: the shared messages before the last
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise ValueError("missing prompt (without one, chosen and rejected must be message lists)")
        chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    else:
        prompt = record["prompt"]
        prompt = [("user", _text(prompt, "prompt"))] if isinstance(prompt, str) else _messages(prompt, "prompt")
        chosen, rejected = _reply(chosen, "chosen"), _reply(rejected, "rejected")
    if not prompt:
        raise ValueError("the prompt has no messages")
    if prompt[-1][0] != "user":
        raise ValueError(f"the prompt must end with a user message (it ends with {prompt[-1][0]!r})")
    return ImportRow(where, tuple(prompt), _single(chosen, "chosen"), _single(rejected, "rejected"))


def _reply(value: Any, name: str) -> list[tuple[str, str]]:
    return [("assistant", _text(value, name))] if isinstance(value, str) else _messages(value, name)


def _single(reply: list[tuple[str, str]], name: str) -> str:
    if len(reply) != 1 or reply[0][0] != "assistant":
        roles = [role for role, _ in reply]
        raise ValueError(f"{name} must be one assistant message, not {roles}")
    return reply[0][1]


def _messages(value: Any, name: str) -> list[tuple[str, str]]:
    if not isinstance(value, list):
        raise ValueError(f"{name} must be a string or a list of messages, not {type(value).__name__}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{name}[{i}] must be a message, {{\"role\": ..., \"content\": ...}}")
        if message["role"] not in ROLES:
            raise ValueError(f"{name}[{i}] has role {str(message['role'])[:40]!r}; use one of {', '.join(ROLES)}")
        out.append((message["role"], _text(message["content"], f"{name}[{i}].content")))
    return out


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text, not {type(value).__name__}")
    if len(value) > MAX_IMPORT_TEXT_CHARS:
        raise ValueError(f"{name} has {len(value):,} characters; the limit is {MAX_IMPORT_TEXT_CHARS:,}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800") is valid JSON but no text SQLite can keep
        raise ValueError(f"{name} holds an unpaired surrogate escape, which is not text") from None
    return value  # control characters and NUL are kept exactly, as the chat keeps them


def import_source(file_name: str, sha: str) -> str:
    return f"{IMPORT_SOURCE_PREFIX}{file_name}#{sha}"


class ImportQueries:
    def import_pairs(self, rows: list[ImportRow], file_name: str, user: str = IMPORT_USER,
                     chunk_rows: int = IMPORT_CHUNK_ROWS) -> ImportResult:
        """Store checked rows as seed pairs (see the module's docstring), `chunk_rows` to a transaction;
        rows whose content is already stored, or that make no pair (chosen the same as rejected, or
        empty), are skipped and listed. A database error stops the import with a StoreError that says how
        many rows went in: the same import again skips those and adds the rest."""
        from store.db import StoreError  # store.db builds Store from this mixin: imported when first needed

        user = check_user(user)
        result = ImportResult(file=file_name)
        todo, in_file = [], set()
        for row in rows:
            sha = row.sha
            if sha in in_file:
                result.duplicates.append(row.line)
            elif row.chosen == row.rejected or not row.chosen.strip():
                result.no_pair.append(row.line)
            else:
                in_file.add(sha)
                todo.append((row, sha))
        for start in range(0, len(todo), chunk_rows):
            try:
                with self._write("the import") as db:
                    # Read in the transaction, so that two imports of one file at once cannot both add a row.
                    stored = _imported_hashes(db)
                    chunk = []
                    for row, sha in todo[start:start + chunk_rows]:
                        if sha in stored:
                            result.duplicates.append(row.line)
                        else:
                            chunk.append((row, sha))
                    first = None
                    for row, sha in chunk:
                        feedback_id = _insert_row(db.conn, row, sha, file_name, user, self._now())
                        first = first or feedback_id
                    if first is not None:
                        # The pair index by its own rules, once per chunk (a pass per row would hold the
                        # write lock several times as long).
                        db["training_pairs"].insert_all(
                            [r for g in judged_groups(db, "and f.id >= ?", [first]) for r in index_rows(g)])
            except StoreError as exc:
                raise StoreError(f"{exc}; {result.imported} row(s) of {file_name} went in before it, and the same "
                                 "import again skips them and adds the rest") from exc
            result.imported += len(chunk)
        return result


def _imported_hashes(db) -> set[str]:
    return {source.rsplit("#", 1)[1] for (source,) in db.execute(
        "select source from conversations where source like ? and instr(source, '#') > 0",
        [IMPORT_SOURCE_PREFIX + "%"]).fetchall()}


def _insert_row(conn, row: ImportRow, sha: str, file_name: str, user: str, created: str) -> int:
    """One row's conversation, turn, replies and choice, with plain statements (sqlite-utils' insert
    inspects the table at every call: most of an import's time). Returns the choice's feedback id."""
    session_id = f"import-{sha[:16]}"
    system = row.prompt[0][1] if row.prompt[0][0] == "system" else ""
    conversation_id = conn.execute(
        "insert into conversations (session_id, user, model_id, system_prompt, simulated, created_at, source)"
        " values (?, ?, null, ?, 0, ?, ?)", [session_id, user, system, created, import_source(file_name, sha)]
    ).lastrowid
    context = [{"role": role, "content": content} for role, content in row.prompt]
    turn_id = conn.execute(
        "insert into turns (conversation_id, idx, context_json, user_message, created_at) values (?, ?, ?, ?, ?)",
        [conversation_id, sum(1 for role, _ in row.prompt[:-1] if role == "user"),
         json.dumps(context, ensure_ascii=False), row.prompt[-1][1], created]).lastrowid
    for slot, text in (("a", row.chosen), ("b", row.rejected)):
        conn.execute("insert into replies (turn_id, pair, slot, text, policy_version, superseded, created_at)"
                     " values (?, 0, ?, ?, ?, 0, ?)", [turn_id, slot, text, IMPORT_VERSION, created])
    return conn.execute(
        "insert into feedback (turn_id, pair, kind, value, user, session_id, created_at)"
        " values (?, 0, 'choice', 'a', ?, ?, ?)", [turn_id, user, session_id, created]).lastrowid
