"""DPO: the loss on numbers checked by hand and against TRL, packing, what a round changes, and that it learns."""

from __future__ import annotations

import copy
import math
import random
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from trainers.dpo import (
    DPOConfig,
    TrainingAborted,
    dpo_loss,
    pack_pairs,
    pair_label_smoothing,
    pair_sft_weight,
    pair_logps,
    save_adapter,
    train_dpo,
)
from trainers.logprobs import reply_mask, sequence_logprobs
from trainers.pairs import PreferencePair
from bench.fixtures import random_pairs

LN2 = math.log(2)
# A few steps at a tiny-model learning rate: the tests check plumbing and direction, not convergence.
# float32 products: the exact-value tests below must not depend on whether this CPU has fast bf16.
FAST = dict(epochs=1, batch_size=4, learning_rate=1e-2, lora_r=4, lora_alpha=8, seed=0, matmul_dtype="float32")




def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# --- the loss, by hand ------------------------------------------------------------------------------------


def test_sigmoid_loss_by_hand():
    # Pair 1: chosen log ratio +1, rejected -1, beta 0.5 -> beta * delta = 1 -> loss = log(1 + e^-1).
    # Pair 2: chosen log ratio 0, rejected +2 -> beta * delta = -1 -> loss = log(1 + e).
    losses, chosen, rejected = dpo_loss(t(-10.0, -5.0), t(-12.0, -3.0), t(-11.0, -5.0), t(-11.0, -5.0), beta=0.5)
    assert losses.tolist() == pytest.approx([0.3132617, 1.3132617], abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.5, 0.0]) and rejected.tolist() == pytest.approx([-0.5, 1.0])
    # Policy equal to the reference: no preference either way.
    losses, chosen, rejected = dpo_loss(t(-7.0), t(-9.0), t(-7.0), t(-9.0), beta=0.1)
    assert losses.item() == pytest.approx(LN2) and chosen.item() == 0 and rejected.item() == 0


def test_label_smoothing_is_conservative_dpo_by_hand():
    # beta * delta = 1, e = 0.1: 0.9 log(1 + e^-1) + 0.1 log(1 + e) = log(1 + e^-1) + 0.1, since
    # log(1 + e) - log(1 + e^-1) = 1.
    losses, _, _ = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.5, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.4132617, abs=1e-6)
    # A flipped vote now costs less than it would unsmoothed: log(1 + e) - 0.1.
    losses, _, _ = dpo_loss(t(-12.0), t(-10.0), t(-11.0), t(-11.0), beta=0.5, label_smoothing=0.1)
    assert losses.item() == pytest.approx(1.2132617, abs=1e-6)


def test_each_pair_can_have_its_own_smoothing():
    # A [n] tensor of flip chances is each pair's own scalar smoothing, row by row.
    args = (t(-10.0, -12.0), t(-12.0, -10.0), t(-11.0, -11.0), t(-11.0, -11.0))
    losses, _, _ = dpo_loss(*args, beta=0.5, label_smoothing=t(0.0, 0.1))
    one, _, _ = dpo_loss(*(a[:1] for a in args), beta=0.5, label_smoothing=0.0)
    two, _, _ = dpo_loss(*(a[1:] for a in args), beta=0.5, label_smoothing=0.1)
    assert losses.tolist() == pytest.approx([one.item(), two.item()])
    assert losses.tolist() == pytest.approx([0.3132617, 1.2132617], abs=1e-6)  # as the two tests above
    with pytest.raises(ValueError, match="ipo"):
        dpo_loss(*args, beta=0.5, loss_type="ipo", label_smoothing=t(0.0, 0.1), chosen_lengths=t(3.0, 3.0),
                 rejected_lengths=t(3.0, 3.0))


def test_an_edit_is_not_a_click_and_is_not_smoothed_unless_asked():
    vote = PreferencePair((1, 2), (3,), (4,), source="choice")
    rated = PreferencePair((1, 2), (3,), (5,), source="ratings")
    edit = PreferencePair((1, 2), (6,), (4,), source="edit")
    smoothing = pair_label_smoothing([vote, edit, rated], DPOConfig(label_smoothing=0.25))
    assert smoothing.tolist() == [0.25, 0.0, 0.25]
    # One value for all when all get the same: no edits, edits smoothed too, nothing to smooth.
    assert pair_label_smoothing([vote, rated], DPOConfig(label_smoothing=0.25)) == 0.25
    assert pair_label_smoothing([vote, edit], DPOConfig(label_smoothing=0.25, smooth_edits=True)) == 0.25
    assert pair_label_smoothing([vote, edit], DPOConfig(label_smoothing=0.0)) == 0.0
    assert pair_label_smoothing([vote, edit], DPOConfig(loss="ipo")) == 0.0


def test_a_round_of_edits_trains_as_if_nothing_were_smoothed(tiny_loaded):
    """Through the real loop: pairs that are all edits, at label smoothing 0.25, take exactly the steps of
    label smoothing 0; smoothing the edits too (smooth_edits) takes other steps."""
    pairs = [PreferencePair(p.prompt_ids, p.chosen_ids, p.rejected_ids, source="edit")
             for p in random_pairs(tiny_loaded.model.config.vocab_size, 8, seed=3)]
    runs = {name: train_dpo(tiny_loaded.model, pairs, pairs[:2], DPOConfig(**FAST, **config))
            for name, config in {"trusted": dict(label_smoothing=0.25), "zero": dict(label_smoothing=0.0),
                                 "smoothed": dict(label_smoothing=0.25, smooth_edits=True)}.items()}
    losses = {name: [step["loss"] for step in run.steps] for name, run in runs.items()}
    assert losses["trusted"] == losses["zero"] and losses["smoothed"] != losses["zero"]
    assert runs["trusted"].eval_after == runs["zero"].eval_after


def test_the_supervised_term_is_the_chosen_replys_mean_nll_per_token_by_hand():
    # Pair 1 as in the first test (loss log(1 + e^-1)), its chosen reply 4 tokens summing to -10: + 0.5 * 10 / 4.
    # Pair 2 has no supervised term.
    args = (t(-10.0, -5.0), t(-12.0, -3.0), t(-11.0, -5.0), t(-11.0, -5.0))
    losses, chosen, _ = dpo_loss(*args, beta=0.5, chosen_lengths=t(4.0, 2.0), rejected_lengths=t(3.0, 3.0),
                                 sft_weight=t(0.5, 0.0))
    assert losses.tolist() == pytest.approx([0.3132617 + 1.25, 1.3132617], abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.5, 0.0])  # the implicit rewards are DPO's alone
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(*args, beta=0.5, sft_weight=0.5)
    for bad in (-1, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="edit_sft_weight"):
            DPOConfig(edit_sft_weight=bad)


def test_only_an_edits_pairs_get_the_supervised_term():
    vote = PreferencePair((1, 2), (3,), (4,), source="choice")
    edit = PreferencePair((1, 2), (6,), (4,), source="edit")
    assert pair_sft_weight([vote, edit], DPOConfig(edit_sft_weight=0.5)).tolist() == [0.0, 0.5]
    assert pair_sft_weight([vote, vote], DPOConfig(edit_sft_weight=0.5)) == 0.0
    assert pair_sft_weight([vote, edit], DPOConfig(edit_sft_weight=0)) == 0.0
    from trainers.defaults import DEFAULT_EDIT_SFT_WEIGHT

    assert pair_sft_weight([vote, edit], DPOConfig()) == DEFAULT_EDIT_SFT_WEIGHT == 0.0  # off unless asked (measured)


def test_the_supervised_term_makes_an_edit_likelier_than_dpo_alone(tiny_loaded):
    """Through the real loop: the same round of edits, with and without the term; with it the policy ends
    with a higher log-prob of the edits' own text."""
    pairs = [PreferencePair(p.prompt_ids, p.chosen_ids, p.rejected_ids, source="edit")
             for p in random_pairs(tiny_loaded.model.config.vocab_size, 8, seed=4)]
    from trainers.dpo import score_pairs

    chosen = {}
    for weight in (0.0, 1.0):
        result = train_dpo(tiny_loaded.model, pairs, [], DPOConfig(**FAST, label_smoothing=0.0, edit_sft_weight=weight))
        chosen[weight] = score_pairs(result.model, pairs, 0)[0].sum().item()
    assert chosen[1.0] > chosen[0.0]


def test_ipo_loss_by_hand():
    # Chosen log ratio +1 over 2 tokens = 0.5, rejected -1 over 4 tokens = -0.25: delta 0.75; beta 0.5 puts
    # the target at 1 / (2 beta) = 1, so the loss is (0.75 - 1)^2.
    losses, chosen, rejected = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.5, loss_type="ipo",
                                        chosen_lengths=t(2.0), rejected_lengths=t(4.0))
    assert losses.item() == pytest.approx(0.0625)
    assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(t(-1.0), t(-1.0), t(-1.0), t(-1.0), beta=0.5, loss_type="ipo")


def test_config_names_the_bad_value():
    for kwargs, words in [
        ({"beta": 0}, "beta"), ({"loss": "hinge"}, "'hinge'"), ({"label_smoothing": 0.5}, "0.5"),
        ({"loss": "ipo", "label_smoothing": 0.1}, "ipo"), ({"batch_size": 0}, "batch_size"),
        ({"ref": "sft"}, "'sft'"), ({"learning_rate": float("nan")}, "learning_rate"),
        ({"target_modules": ()}, "target_modules"), ({"epochs": 1.5}, "1.5"),
    ]:
        with pytest.raises(ValueError, match=words):
            DPOConfig(**kwargs)


def test_the_default_assumes_noisy_clicks_for_dpo_and_nothing_for_ipo():
    from trainers.defaults import DEFAULT_LABEL_SMOOTHING

    assert 0 < DEFAULT_LABEL_SMOOTHING < 0.5 and DPOConfig().label_smoothing == DEFAULT_LABEL_SMOOTHING
    assert DPOConfig(label_smoothing=None).label_smoothing == DEFAULT_LABEL_SMOOTHING  # JSON null: the default
    assert DPOConfig(loss="ipo").label_smoothing == 0.0  # IPO has no such term: not an error, no smoothing
    assert DPOConfig(label_smoothing=0).label_smoothing == 0  # trusting every click is kept, not defaulted
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOConfig(label_smoothing="0.1")


# --- the loss, against TRL 1.16 ---------------------------------------------------------------------------


def trl_loss(loss_type: str, beta: float, label_smoothing: float, logps, lengths) -> dict:
    """TRL's DPOTrainer._compute_loss on given summed log-probs, through a minimal stand-in trainer and model.

    The stand-in model returns per-token log-probs whose sum over each completion is the given value (all of
    it on the first completion token), which is all `_compute_loss` reads from it on the loss path.
    """
    from trl import DPOTrainer

    chosen, rejected, ref_chosen, ref_rejected = logps
    chosen_lengths, rejected_lengths = lengths
    n = chosen.shape[0]
    width = 1 + int(max(chosen_lengths.max(), rejected_lengths.max()))
    completion_mask = torch.zeros(2 * n, width, dtype=torch.long)
    for row, length in enumerate(torch.cat([chosen_lengths, rejected_lengths]).long().tolist()):
        completion_mask[row, 1 : 1 + length] = 1
    per_token = torch.zeros(2 * n, width - 1)
    per_token[:, 0] = torch.cat([chosen, rejected])

    def model(**kwargs):
        zeros = torch.zeros(2 * n, width - 1)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    model.training = True
    identity = lambda x: x  # noqa: E731 - one process: gathering is the identity
    trainer = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=identity,
                                                 gather=identity),
        aux_loss_enabled=False, precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(),
    )
    inputs = {"input_ids": torch.ones(2 * n, width, dtype=torch.long),
              "attention_mask": torch.ones(2 * n, width, dtype=torch.long), "completion_mask": completion_mask,
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return {"loss": loss.item(), **metrics}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_matches_trl(loss_type):
    pytest.importorskip("trl")
    gen = torch.Generator().manual_seed(0)
    n, beta = 6, 0.2
    logps = [-40 * torch.rand(n, generator=gen) - 5 for _ in range(4)]
    lengths = [torch.randint(1, 30, (n,), generator=gen).float() for _ in range(2)]
    ours, chosen, rejected = dpo_loss(*logps, beta, loss_type, 0.0, *lengths)
    theirs = trl_loss(loss_type, beta, 0.0, logps, lengths)
    assert ours.mean().item() == pytest.approx(theirs["loss"], abs=1e-5)
    assert chosen.mean().item() == pytest.approx(theirs["rewards/chosen"], abs=1e-5)
    assert rejected.mean().item() == pytest.approx(theirs["rewards/rejected"], abs=1e-5)
    assert (chosen - rejected).mean().item() == pytest.approx(theirs["rewards/margins"], abs=1e-5)
    assert (chosen > rejected).float().mean().item() == pytest.approx(theirs["rewards/accuracies"])
    for i in range(n):  # and pair by pair, not only on average
        one = trl_loss(loss_type, beta, 0.0, [x[i : i + 1] for x in logps], [x[i : i + 1] for x in lengths])
        assert ours[i].item() == pytest.approx(one["loss"], abs=1e-5)


def test_one_batch_matches_trl_trainer_end_to_end(tiny_loaded, tmp_path):
    """Packing, log-probs and loss together: our loss and LoRA gradient on one batch equal TRL's compute_loss
    on its own padded batch, from the same non-trivial adapter (the bench runs the same check on SmolLM2)."""
    pytest.importorskip("trl")
    from bench.dpo_vs_trl import initial_adapter, same_batch_check

    config = DPOConfig(**FAST, label_smoothing=0.0)  # TRL 1.16's 'sigmoid' ignores label smoothing
    pairs = random_pairs(tiny_loaded.model.config.vocab_size, 4, seed=11)
    adapter = initial_adapter(tiny_loaded.model, config, tmp_path / "init")
    check = same_batch_check(tiny_loaded, pairs, config, adapter, tmp_path / "check", b_scale=0.5)
    assert check["loss_ours"] != pytest.approx(LN2, abs=1e-4)  # the adapter really moved the policy
    assert check["loss_ours"] == pytest.approx(check["loss_trl"], abs=1e-5)
    assert check["grad_norm_ours"] == pytest.approx(check["grad_norm_trl"], rel=1e-4)


def test_label_smoothing_matches_trl_cdpo_form():
    # TRL 1.16's 'sigmoid' ignores label_smoothing; the cDPO form lives in its 'aot' loss, which on a single
    # pair (nothing to sort) is exactly -(1-e) logsig(beta d) - e logsig(-beta d).
    pytest.importorskip("trl")
    gen = torch.Generator().manual_seed(1)
    logps = [-40 * torch.rand(5, generator=gen) - 5 for _ in range(4)]
    lengths = [torch.full((5,), 7.0), torch.full((5,), 9.0)]
    ours, _, _ = dpo_loss(*logps, 0.3, "sigmoid", 0.2)
    for i in range(5):
        one = trl_loss("aot", 0.3, 0.2, [x[i : i + 1] for x in logps], [x[i : i + 1] for x in lengths])
        assert ours[i].item() == pytest.approx(one["loss"], abs=1e-5)


# --- packing ----------------------------------------------------------------------------------------------


def test_packed_rows_score_like_separate_sequences(tiny_loaded):
    model = tiny_loaded.model
    pairs = random_pairs(model.config.vocab_size, 5, seed=3, prompt=(1, 15), reply=(1, 12))
    rows = pack_pairs(pairs, pad_id=0, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        chosen, rejected = pair_logps(model, rows)
        for i, pair in enumerate(pairs):
            for reply, got in ((pair.chosen_ids, chosen[i]), (pair.rejected_ids, rejected[i])):
                ids = torch.tensor([pair.prompt_ids + reply])
                expected = sequence_logprobs(model, ids, reply_mask(len(pair.prompt_ids), ids.shape[1]))[0]
                assert got.item() == pytest.approx(expected.item(), abs=1e-4)
    assert rows.chosen_lengths.tolist() == [len(p.chosen_ids) for p in pairs]


# --- a round on the tiny model ----------------------------------------------------------------------------


def test_round_changes_only_the_lora_weights(tiny_loaded, monkeypatch):
    import peft

    model = tiny_loaded.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    initial = {}  # the fresh adapter as train_dpo made it, before any step

    def recording_get_peft_model(*args, **kwargs):
        policy = real_get_peft_model(*args, **kwargs)
        initial.update({k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(policy).items()})
        return policy

    real_get_peft_model = peft.get_peft_model
    monkeypatch.setattr(peft, "get_peft_model", recording_get_peft_model)
    pairs = random_pairs(model.config.vocab_size, 8, seed=1)
    seen = []
    result = train_dpo(model, pairs, pairs[:4], DPOConfig(**FAST), on_step=seen.append)

    # The caller's model is untouched and still a plain model.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("lora" in name for name, _ in model.named_modules())
    # In the trained copy, the base weights are the original ones and every LoRA weight moved.
    trained = result.model.state_dict()
    base_keys = [k for k in trained if "lora_" not in k]
    assert base_keys and all(torch.equal(trained[k], before[k.replace("base_model.model.", "").replace(
        ".base_layer", "")]) for k in base_keys)
    # PEFT starts B at zero, so step 1 moves only B (A's gradient passes through B: zero); FAST's second
    # step moves A too. Every A and every B, in every adapted layer.
    lora = result.adapter_state_dict()
    assert set(lora) == set(initial) and all(not initial[k].any() for k in lora if "lora_B" in k)
    a_keys = {k for k in lora if "lora_A" in k}
    assert a_keys and {k.replace("lora_A", "lora_B") for k in a_keys} == set(lora) - a_keys
    unmoved = [k for k, v in lora.items() if torch.equal(v, initial[k])]
    assert not unmoved, f"LoRA weights that did not move: {unmoved}"

    assert [s["step"] for s in seen] == [1, 2] and seen == result.steps
    first = seen[0]
    for key in ("total_steps", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm", "learning_rate"):
        assert key in first and math.isfinite(first[key]), key
    # A fresh adapter is the reference: the first step has no preference yet.
    assert first["loss"] == pytest.approx(LN2, abs=1e-6) and first["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert result.eval_before == {"n": 4, "accuracy": 0.0, "margin": 0.0, "loss": pytest.approx(LN2)}
    assert result.trained == 8 and result.skipped_too_long == 0


def test_toy_preference_is_learned(tiny_loaded):
    """Chosen replies contain a marker token, rejected ones never do: held-out accuracy must beat chance."""
    model = tiny_loaded.model
    vocab = model.config.vocab_size
    marker = vocab - 1
    rng = random.Random(7)

    def reply(with_marker: bool) -> tuple[int, ...]:
        tokens = [rng.randrange(3, vocab - 1) for _ in range(rng.randint(3, 8))]
        if with_marker:
            tokens.insert(rng.randrange(len(tokens) + 1), marker)
        return tuple(tokens)

    def pairs(n):
        return [PreferencePair(tuple(rng.randrange(3, vocab - 1) for _ in range(rng.randint(3, 10))),
                               reply(True), reply(False)) for _ in range(n)]

    train, held_out = pairs(64), pairs(24)
    config = DPOConfig(epochs=4, batch_size=8, learning_rate=2e-2, lora_r=8, lora_alpha=16, seed=0)
    result = train_dpo(model, train, held_out, config)
    assert result.eval_before["accuracy"] == 0.0  # margins are exactly 0 before training
    assert result.eval_after["n"] == 24
    assert result.eval_after["accuracy"] > 0.7, result.eval_after
    assert result.eval_after["margin"] > 0


def test_exploding_learning_rate_aborts_the_round(tiny_loaded):
    model = tiny_loaded.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pairs = random_pairs(model.config.vocab_size, 16, seed=2)
    with pytest.raises(TrainingAborted) as caught:
        # An absurd step size: the LoRA weights blow up after one step and the next gradient explodes.
        train_dpo(model, pairs, [], DPOConfig(**dict(FAST, epochs=4, learning_rate=1e5)))
    assert caught.value.step >= 2 and ("loss is" in caught.value.reason or "gradient norm" in caught.value.reason)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gradient_norm_threshold_aborts_before_the_step(tiny_loaded):
    pairs = random_pairs(tiny_loaded.model.config.vocab_size, 4, seed=4)
    with pytest.raises(TrainingAborted, match="gradient norm") as caught:
        train_dpo(tiny_loaded.model, pairs, [], DPOConfig(**dict(FAST, max_grad_norm_abort=1e-9)))
    assert caught.value.step == 1 and caught.value.steps == []


def test_nan_loss_aborts(tiny_loaded, tmp_path):
    """An adapter holding a NaN (a corrupted file, a diverged round) makes the loss NaN: the round stops."""
    model = tiny_loaded.model
    pairs = random_pairs(model.config.vocab_size, 4, seed=5)
    result = train_dpo(model, pairs, [], DPOConfig(**FAST))
    name, weight = next((n, p) for n, p in result.model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        weight[0, 0] = float("nan")
    save_adapter(result, tmp_path / "bad")
    with pytest.raises(TrainingAborted, match="loss is nan"):
        train_dpo(model, pairs, [], DPOConfig(**FAST), init_adapter_dir=tmp_path / "bad")


def test_warm_start_continues_from_the_saved_adapter(tiny_loaded, tmp_path):
    from peft import PeftModel

    model = tiny_loaded.model
    pairs = random_pairs(model.config.vocab_size, 8, seed=6)
    held_out = random_pairs(model.config.vocab_size, 6, seed=16)
    first = train_dpo(model, pairs, held_out, DPOConfig(**FAST))
    folder = save_adapter(first, tmp_path / "v1")
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()

    # The files load with plain PEFT and hold exactly the trained weights.
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), str(folder))
    saved = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    trained = {k: v for k, v in first.model.state_dict().items() if "lora_" in k}
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    # Rounded to bfloat16 values (so the serving engine keeps them as bfloat16 exactly), and trained.
    assert all(torch.equal(v, v.to(torch.bfloat16).float()) for v in saved.values())
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)

    # Round 2 starts from those weights: before its first step it scores the held-out pairs exactly as
    # round 1 ended (same reference, the base model), and it trains on from there.
    second = train_dpo(model, pairs, held_out, DPOConfig(**FAST), init_adapter_dir=folder)
    assert second.eval_before["margin"] == pytest.approx(first.eval_after["margin"], abs=1e-5)
    assert second.eval_before["accuracy"] == first.eval_after["accuracy"]
    assert second.steps[0]["rewards/margins"] != pytest.approx(0, abs=1e-6)  # not a fresh adapter

    # With ref='previous' the saved adapter is the reference: round 2 starts with no preference.
    third = train_dpo(model, pairs, held_out, DPOConfig(**dict(FAST, ref="previous")), init_adapter_dir=folder)
    assert third.steps[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert third.eval_before["margin"] == 0.0


def test_ipo_round_and_too_long_pairs(tiny_loaded):
    model = tiny_loaded.model
    short = random_pairs(model.config.vocab_size, 4, seed=8, prompt=(3, 5), reply=(1, 5))
    long = random_pairs(model.config.vocab_size, 3, seed=9, prompt=(30, 40), reply=(20, 30))
    result = train_dpo(model, short + long, long[:1], DPOConfig(**dict(FAST, loss="ipo", max_length=20)))
    assert result.trained == 4 and result.skipped_too_long == 4
    assert result.steps[0]["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2)  # delta 0: (0 - 1/(2 beta))^2
    with pytest.raises(ValueError, match="max_length=20"):
        train_dpo(model, long, [], DPOConfig(**dict(FAST, max_length=20)))


def test_bf16_base_products_train_close_to_float32(tiny_loaded):
    # bf16 base products: the same round trains, and its first step is still exactly no preference (the
    # reference was scored on the same rows with the same rounding); the returned model is back on PEFT's
    # own forward.
    model = tiny_loaded.model
    pairs = random_pairs(model.config.vocab_size, 8, seed=11)
    exact = train_dpo(model, pairs, [], DPOConfig(**FAST))
    rounded = train_dpo(model, pairs, [], DPOConfig(**dict(FAST, matmul_dtype="bfloat16")))
    assert exact.steps[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert rounded.steps[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert rounded.steps[0]["rewards/margins"] == 0.0 and rounded.steps[0]["rewards/chosen"] == 0.0
    assert rounded.steps[-1]["loss"] == pytest.approx(exact.steps[-1]["loss"], abs=5e-2)
    assert all(math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]) for s in rounded.steps)
    assert not any(hasattr(m, "_fast_weight") for m in rounded.model.modules())
    with pytest.raises(ValueError, match="matmul_dtype"):
        DPOConfig(matmul_dtype="fp8")


def test_score_pairs_on_given_batches_matches_its_own_order_and_refuses_a_partial_cover(tiny_loaded):
    # The round scores its reference on the first epoch's batches; any cover of the pairs gives the
    # same numbers (to float rounding), and one that misses or repeats a pair is refused, not half-scored.
    from trainers.dpo import score_pairs

    model = tiny_loaded.model
    pairs = random_pairs(model.config.vocab_size, 6, seed=12)
    pad = model.config.eos_token_id
    default = score_pairs(model, pairs, pad)
    shuffled = score_pairs(model, pairs, pad, batches=[[5, 0], [3], [1, 4, 2]])
    for ours, theirs in zip(default, shuffled):
        assert torch.allclose(ours, theirs, atol=1e-4)
    for bad in ([[0, 1, 2], [3, 4]], [[0, 1, 2], [3, 4, 5, 5]]):
        with pytest.raises(ValueError, match="exactly once"):
            score_pairs(model, pairs, pad, batches=bad)


def test_a_round_on_bf16_weights_trains_its_float32_lora(tiny_loaded):
    # What a GPU serves (app.py --device auto loads bf16 weights), on the CPU: PEFT keeps the LoRA weights
    # in float32, so the fast LoRA forward must cast between the two (it once raised a dtype error).
    model = copy.deepcopy(tiny_loaded.model).to(torch.bfloat16)
    pairs = random_pairs(model.config.vocab_size, 8, seed=13)
    result = train_dpo(model, pairs, pairs[:2], DPOConfig(**FAST))
    assert result.steps[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert all(math.isfinite(s["loss"]) for s in result.steps)
    lora = [p for n, p in result.model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert next(model.parameters()).dtype == torch.bfloat16  # the served model is left as it was
