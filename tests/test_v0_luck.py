"""bench.v0_luck: a single v0 draw against the rest of a multi-draw --v0-cache, on hand-made replies."""

from __future__ import annotations

import json

import pytest

from bench.v0_luck import luck, main


def test_draw_zero_is_compared_with_the_mean_of_every_other_draw():
    scores = {"a": [[1.0] * 4, [0.0] * 4], "b": [[0.0] * 4, [0.0] * 4]}
    out = luck(scores)
    assert out["a"] == {"draw_means": [1.0, 0.0], "draw0_minus_rest": 1.0, "ci": [1.0, 1.0], "prompts": 4}
    assert out["b"]["draw0_minus_rest"] == pytest.approx(-1 / 3, abs=1e-4)  # 0 against (1 + 0 + 0) / 3
    with pytest.raises(ValueError, match="one draw"):
        luck({"a": [[1.0, 2.0]]})


def test_it_reads_a_cache_folder_prompt_major_and_refuses_one_of_another_size(tmp_path, capsys):
    prompts = 3
    # Prompt-major, 2 draws: prompt i's draws are texts[2i], texts[2i + 1]. Draw 0 replies have 25 words
    # (concise's target), draw 1 replies 80: draw 0 scores higher under concise in both files.
    texts = [" ".join(["word"] * (25 if k == 0 else 80)) for _ in range(prompts) for k in range(2)]
    for name in ("v0-a.json", "v0-b.json"):
        (tmp_path / name).write_text(json.dumps({"texts": texts, "n_tokens": [1] * len(texts)}))
    assert main([str(tmp_path), "--draws", "2", "--eval-prompts", str(prompts), "--golds", "concise"]) == 0
    [line] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    first, second = line["files"]["v0-a.json"], line["files"]["v0-b.json"]
    assert first["prompts"] == prompts and first["draw_means"][0] > first["draw_means"][1]
    assert first["draw0_minus_rest"] > 0 and first == second
    with pytest.raises(SystemExit, match="3 prompts x 3 draws"):
        main([str(tmp_path), "--draws", "3", "--eval-prompts", str(prompts), "--golds", "concise"])
    with pytest.raises(SystemExit, match="no v0"):
        main([str(tmp_path / "empty"), "--draws", "2"])
