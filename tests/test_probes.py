"""The probe file: its format, every refusal naming its line, the shipped set, the set's hash."""

from __future__ import annotations

import pytest

from app import main
from playground.evaluation import (
    DEFAULT_PROBES,
    MAX_PROBE_CHARS,
    MIN_PROBES,
    ProbeFileError,
    load_probes,
    probe_set_hash,
)
from playground.evaluation.probes import parse_probes

PLAIN = [f"Question number {i}?" for i in range(MIN_PROBES)]


def write(tmp_path, lines):
    path = tmp_path / "probes.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_lines_comments_blanks_and_turns(tmp_path):
    path = write(tmp_path, ["# a comment", "", *PLAIN[1:], "   ", "Hi ||| Hello! How can I help? ||| Tell me a joke."])
    probes = load_probes(path)
    assert len(probes) == MIN_PROBES
    assert probes[0] == [{"role": "user", "content": PLAIN[1]}]
    assert probes[-1] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                          {"role": "user", "content": "Tell me a joke."}]


@pytest.mark.parametrize("bad, message", [
    ("first ||| ||| third", "turn 2 is empty"),
    (" ||| answer ||| again", "turn 1 is empty"),
    ("question ||| answer", "ends on an assistant turn"),
    (PLAIN[2], "the same probe as line 4"),
    ("x" * (MAX_PROBE_CHARS + 1), f"over the {MAX_PROBE_CHARS:,} allowed"),
])
def test_a_bad_probe_is_refused_with_its_line_number(tmp_path, bad, message):
    # Line 1 is a comment, so PLAIN[i] sits on line i + 2 and the bad probe on line MIN_PROBES + 2.
    path = write(tmp_path, ["# probes", *PLAIN, bad])
    with pytest.raises(ProbeFileError) as caught:
        load_probes(path)
    assert f"line {MIN_PROBES + 2}:" in str(caught.value) and message in str(caught.value)
    assert str(path) in str(caught.value)


def test_a_duplicate_is_the_same_turns_whatever_the_spacing(tmp_path):
    with pytest.raises(ProbeFileError, match="line 10: the same probe as line 9"):
        parse_probes("\n".join(PLAIN + ["a |||  b ||| c", "a ||| b |||   c"]))


def test_too_few_probes(tmp_path):
    path = write(tmp_path, ["# only a few", *PLAIN[:MIN_PROBES - 1]])
    needs = f"has {MIN_PROBES - 1} probe\\(s\\); an evaluation needs at least {MIN_PROBES}"
    with pytest.raises(ProbeFileError, match=needs):
        load_probes(path)
    with pytest.raises(ProbeFileError, match="cannot read"):
        load_probes(tmp_path / "missing.txt")


def test_the_shipped_probes():
    probes = load_probes(DEFAULT_PROBES)
    assert len(probes) >= 64
    assert sum(len(p) > 1 for p in probes) >= 4  # multi-turn ones
    assert all(p[-1]["role"] == "user" for p in probes)


def test_the_hash_is_of_the_probes_not_the_file(tmp_path):
    a = write(tmp_path, PLAIN)
    base = probe_set_hash(load_probes(a))
    b = write(tmp_path, ["# now with a comment", "", *PLAIN])
    assert probe_set_hash(load_probes(b)) == base
    c = write(tmp_path, [*PLAIN[:-1], PLAIN[-1] + " (edited)"])
    assert probe_set_hash(load_probes(c)) != base


def test_the_app_refuses_to_start_on_a_bad_probe_file(tiny_model_dir, tmp_path, capsys):
    path = write(tmp_path, PLAIN[:2])
    code = main(["--model", str(tiny_model_dir), "--db", str(tmp_path / "app.db"), "--probes", str(path), "--no-train"])
    assert code == 1
    err = capsys.readouterr().err
    assert f"error: {path} has 2 probe(s); an evaluation needs at least {MIN_PROBES}" in err
