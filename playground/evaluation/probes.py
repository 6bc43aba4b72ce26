"""The probe set: fixed prompts every version is evaluated on, read from a text file.

One probe per line; blank lines and lines starting with `#` are skipped. A multi-turn probe writes its
turns separated by ` ||| `, starting and ending with a user turn (user ||| assistant ||| user): the
evaluation samples the reply to the last one. A file with an empty turn, a probe that ends on an
assistant turn, a duplicate probe, a probe over MAX_PROBE_CHARS or fewer than MIN_PROBES probes is
refused with `ProbeFileError`, naming the line.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from playground.evaluation.defaults import DEFAULT_PROBES

TURN_SEPARATOR = " ||| "
MAX_PROBE_CHARS = 2000  # a probe line, every turn included: longer ones are a paste, not a probe
# Below this the per-version numbers (means over probes, with intervals) say little; the shipped file has 64+.
MIN_PROBES = 8
ROLES = ("user", "assistant")


class ProbeFileError(ValueError):
    """A probe file that cannot be used; the message names the file and the line."""


def parse_probes(text: str, source: str = "the probe file") -> list[list[dict[str, str]]]:
    """The probes of a file's text as chat-template messages; ProbeFileError naming `source` and the line."""
    probes: list[list[dict[str, str]]] = []
    seen: dict[tuple[str, ...], int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{source}, line {number}"
        if len(stripped) > MAX_PROBE_CHARS:
            raise ProbeFileError(f"{where}: the probe has {len(stripped):,} characters, over the "
                                 f"{MAX_PROBE_CHARS:,} allowed")
        turns = tuple(turn.strip() for turn in stripped.split(TURN_SEPARATOR.strip()))
        for i, turn in enumerate(turns, start=1):
            if not turn:
                raise ProbeFileError(f"{where}: turn {i} is empty (turns are separated by '{TURN_SEPARATOR.strip()}')")
        if len(turns) % 2 == 0:
            raise ProbeFileError(f"{where}: the probe ends on an assistant turn ({len(turns)} turns); it must "
                                 "end on a user turn (user ||| assistant ||| user)")
        if turns in seen:
            raise ProbeFileError(f"{where}: the same probe as line {seen[turns]}")
        seen[turns] = number
        probes.append([{"role": ROLES[i % 2], "content": turn} for i, turn in enumerate(turns)])
    if len(probes) < MIN_PROBES:
        raise ProbeFileError(f"{source} has {len(probes)} probe(s); an evaluation needs at least {MIN_PROBES}")
    return probes


def load_probes(path: str | Path = DEFAULT_PROBES) -> list[list[dict[str, str]]]:
    """The probes of a file as chat-template messages (each ends with a user turn)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProbeFileError(f"cannot read the probe file {path}: {exc}") from exc
    return parse_probes(text, source=str(path))


def probe_set_hash(probes: list[list[dict[str, str]]]) -> str:
    """sha256 of the probes themselves (not of the file: a comment or a blank line changes nothing), so
    evaluations on the same probes compare and evaluations on others do not."""
    canonical = json.dumps(probes, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
