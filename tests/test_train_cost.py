"""bench/train_cost.py: the FLOP formulas on shapes small enough to check by hand and against torch's own
FLOP counter on the tiny model, and the bench end to end on the tiny model (--quick)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from bench.train_cost import (
    REQUIRED_KEYS,
    ModelShape,
    Tokens,
    dpo_row,
    generation,
    generation_limits,
    main,
    make_data,
    pass_flops,
    trained_tokens,
)
from trainers.dpo import DPOConfig, pack_pairs
from trainers.runtime import ALL_LINEAR
from trainers.pairs import PreferencePair

# hidden 4, 2 layers, 2 heads of 2 (q: 4 wide), 1 kv head (k, v: 2 wide), MLP 8, vocab 10, LoRA rank 1 on all 7.
HAND = ModelShape(hidden=4, layers=2, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10, lora_r=1,
                  lora_targets=ALL_LINEAR)


def test_the_parameter_counts_by_hand():
    # Per layer: q 4x4 + k 4x2 + v 4x2 + o 4x4 + gate 4x8 + up 4x8 + down 8x4 = 16+8+8+16+32+32+32 = 144.
    assert HAND.base_params == 2 * 144
    # LoRA r (in + out): q 8, k 6, v 6, o 8, gate 12, up 12, down 12 = 64 per layer.
    assert HAND.lora_params == 2 * 64
    assert HAND.first_qkv_params == 16 + 8 + 8
    assert HAND.first_qkv_lora_inputs == 4 + 4 + 4
    # A decode step reads 288 + 128 weights and the 10 x 4 head, all float32; k and v of 2 layers x 2 wide.
    assert HAND.decode_bytes(4) == (288 + 128 + 40) * 4
    assert HAND.kv_bytes_per_token == 2 * 2 * 2 * 4


def test_a_forward_and_a_lora_step_by_hand():
    # 3 causal tokens: 1 + 2 + 3 = 6 (query, key) pairs; 2 of them go through the LM head.
    row = Tokens(tokens=3, keys=6, head_rows=2)
    assert pass_flops(HAND, row, lora=True, backward=False) == {
        "base": 2 * 288 * 3,  # 1728
        "lora": 2 * 128 * 3,  # 768
        "attention": 4 * 2 * 2 * 2 * 6,  # 4 x layers x heads x head_dim x pairs = 192
        "head": 2 * 4 * 10 * 2,  # 160
    }
    assert pass_flops(HAND, row, lora=True, backward=True) == {
        # + input gradients of every frozen product but layer 0's q, k, v: 2 x (288 - 32) x 3
        "base": 1728 + 2 * 256 * 3,
        # + A and B weight gradients and input gradients (4 x 128 x 3), less layer 0's q/k/v x-gradients
        "lora": 768 + 4 * 128 * 3 - 2 * 1 * 12 * 3,
        "attention": 3 * 192,
        "head": 2 * 160,  # + the input gradient only: the head's weight is frozen
    }
    assert pass_flops(HAND, row, lora=False, backward=False)["lora"] == 0  # the adapter switched off


def test_a_dpo_row_needs_exactly_the_keys_its_packed_mask_allows():
    pairs = [PreferencePair((5, 6, 7), (8, 9), (10, 11, 12, 13)), PreferencePair((5,), (8, 9, 10), (11,))]
    rows = pack_pairs(pairs, pad_id=0, device="cpu", dtype=torch.float32)
    allowed = rows.attention_mask[:, 0] == 0  # [B, L, L]: the trainer's own mask
    for b, (pair, length) in enumerate(zip(pairs, [3 + 2 + 1 + 4, 1 + 3 + 1 + 1])):
        need = dpo_row(len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids))
        assert need.tokens == length
        assert int(allowed[b, : need.tokens, : need.tokens].sum()) == need.keys  # padding queries left out
        assert int(rows.target_mask[b].sum()) == need.head_rows
    # By hand for the first: prompt+chosen 5 causal (15), the copy sees 2 prompt tokens and itself (3), rejected
    # token j sees those 3 and j+1 rejected ones (4 + 5 + 6 + 7).
    assert dpo_row(3, 2, 4).keys == 15 + 3 + 22


def test_generation_is_a_causal_pass_of_the_prompt_and_all_but_the_last_token():
    assert generation(5, 3) == Tokens(7, 28, 3)  # prefill 5, then 2 one-token steps; 3 sampled tokens
    assert trained_tokens([4, 4, 4], max_new_tokens=8) == 4  # stopped: its stop token is trained on too
    assert trained_tokens([4] * 8, max_new_tokens=8) == 8  # cut off at the limit: no stop token


def test_the_bandwidth_limit_of_a_generation_by_hand():
    # Two rollouts decoded together: prompt 2 with 3 tokens, prompt 1 with 1 token (stopped at once).
    rollouts = [([[1, 2], [1]], [[7, 7], []])]
    config = type("Config", (), {"max_new_tokens": 8})()
    limits = generation_limits(HAND, rollouts, config, "float32", 4, {"float32": 1e30}, bandwidth=1.0, batch_rows=64)
    weights = HAND.decode_bytes(4)
    # Prefill reads the weights; step 1 and 2 read them again plus the first row's cache of 2 and 3 tokens.
    assert limits["bandwidth_s"] == pytest.approx(3 * weights + 32 * 2 + 32 * 3)
    assert limits["roofline_s"] == pytest.approx(limits["bandwidth_s"])


def test_the_shape_counts_the_tiny_models_own_projection_weights(tiny_loaded):
    shape = ModelShape.of(tiny_loaded.model, 16, ALL_LINEAR)
    layers = tiny_loaded.model.get_decoder().layers
    linears = [m for m in layers.modules() if isinstance(m, torch.nn.Linear)]
    assert shape.base_params == sum(m.weight.numel() for m in linears)
    assert shape.vocab * shape.hidden == tiny_loaded.model.get_output_embeddings().weight.numel()


def test_the_formulas_are_what_torchs_flop_counter_counts(tiny_loaded):
    """A LoRA forward and backward of the tiny model through the trainers' log-prob helper, eager attention
    (whose products the counter sees; it computes every (query, key) pair, so n x n of them)."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode

    from trainers.logprobs import token_logprobs

    model = copy.deepcopy(tiny_loaded.model)
    model.set_attn_implementation("eager")
    policy = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=list(ALL_LINEAR),
                                              task_type="CAUSAL_LM"))
    shape = ModelShape.of(tiny_loaded.model, 16, ALL_LINEAR)
    n, h = 20, 7
    ids = torch.randint(3, shape.vocab, (1, n), generator=torch.Generator().manual_seed(0))
    target = torch.zeros(1, n, dtype=torch.bool)
    target[:, n - h:] = True
    with FlopCounterMode(display=False) as forward:
        logprobs, _ = token_logprobs(policy, ids, target)
    with FlopCounterMode(display=False) as backward:
        logprobs.sum().backward()
    work = Tokens(n, n * n, h)
    fwd = sum(pass_flops(shape, work, lora=True, backward=False).values())
    both = sum(pass_flops(shape, work, lora=True, backward=True).values())
    assert forward.get_total_flops() == fwd
    # The fused LM head recomputes its logits in the backward (2 x hidden x vocab a row): done, not needed.
    assert backward.get_total_flops() == both - fwd + 2 * shape.hidden * shape.vocab * h


@pytest.fixture
def one_thread():
    # Tiny ops on 2 threads crawl when other jobs share the cores (trainers/procenv.py); the numbers of a
    # quick run mean nothing anyway.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_bench_runs_on_the_tiny_model_and_accounts_for_what_ran(tiny_loaded, tiny_model_dir, tmp_path, capsys,
                                                                    one_thread):
    out = tmp_path / "cost.json"
    report = main(["--model", str(tiny_model_dir), "--quick", "--out", str(out)])
    assert json.loads(capsys.readouterr().out) == report == json.loads(out.read_text())
    for key in REQUIRED_KEYS:
        assert key in report, key
    assert set(report["matmul_gflops"]) >= {"float32"} and all(v > 0 for v in report["matmul_gflops"].values())
    for name in ("reward_round_vs_limit", "dpo_round_vs_limit", "ppo_train_vs_limit", "ppo_generate_vs_limit",
                 "ppo_generate_vs_bandwidth_limit"):
        assert report[name] > 0, name
    assert 0 < report["ppo_generate_share"] < 1

    # The needed tokens are the data's own: every DPO pair row once for the reference and once per epoch.
    pairs, _, _ = make_data(tiny_loaded.tokenizer, ModelShape.of(tiny_loaded.model, 16, ALL_LINEAR).vocab, 8, 4,
                            (4, 12), 0)
    rows = sum(len(p.prompt_ids) + len(p.chosen_ids) + 1 + len(p.rejected_ids) for p in pairs)
    dpo = report["phases"]["dpo"]["passes"]
    assert dpo["reference"]["needed_tokens"] == rows
    assert dpo["steps"]["needed_tokens"] == rows * DPOConfig().epochs  # the app's round: its default epochs
    for phase in report["phases"].values():
        for name, entry in phase["passes"].items():
            if "processed" in entry:  # padding only ever adds tokens
                assert entry["processed"]["tokens"] >= entry["needed_tokens"], name
    # Generation ran exactly the decode steps the rollouts need: the longest rollout of each batch, less one.
    generation_entry = report["phases"]["ppo"]["generation"]
    assert generation_entry["decode_steps"] == generation_entry["decode_steps_needed"] > 0
    assert generation_entry["decode_row_steps"] >= generation_entry["decode_row_steps_needed"]

    assert set(report["profile"]) == {"reward", "ppo", "dpo", "settings"}
    assert set(report["profile"]["dpo"]["seconds"]) == {"products", "lm_head", "attention", "copies_and_casts",
                                                        "optimizer", "other_ops", "outside_ops"}
    assert report["where_the_rest_goes"] and all(isinstance(f, str) for f in report["where_the_rest_goes"])
