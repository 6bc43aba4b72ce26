"""The reward model: the loss by hand, where the score is read, that it learns (and that chance is not
usable), what a round changes, the published folder's round trip and refusals, and divergence."""

from __future__ import annotations

import copy
import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from bench.fixtures import random_pairs
from playground.serving.adapters import AdapterError, check_files, publish
from trainers.dpo import TrainingAborted
from trainers.pairs import PreferencePair
from trainers.reward import (
    MIN_REWARD_PAIRS,
    REWARD_REQUIRED_FILES,
    SCORE_HEAD_FILE,
    RewardAborted,
    RewardConfig,
    bradley_terry_loss,
    config_dict,
    decoder_of,
    end_of_turn_ids,
    load_reward_model,
    pad_rows,
    reward_pad_id,
    reward_scores,
    save_reward_model,
    train_reward,
)

LN2 = math.log(2)
# The 64-wide random test model needs a larger step than SmolLM2 (RewardConfig.learning_rate); float32
# products so the numbers do not depend on whether this CPU has fast bf16.
FAST = dict(learning_rate=3e-3, lora_r=4, lora_alpha=8, seed=0, matmul_dtype="float32")


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def toy_pairs(vocab: int, n: int, seed: int) -> list[PreferencePair]:
    """Random prompts and replies; the chosen reply holds a marker token, the rejected one never does."""
    rng = random.Random(seed)
    marker = vocab - 1

    def reply(with_marker: bool) -> tuple[int, ...]:
        tokens = [rng.randrange(3, vocab - 1) for _ in range(rng.randint(3, 8))]
        if with_marker:
            tokens.insert(rng.randrange(len(tokens) + 1), marker)
        return tuple(tokens)

    return [PreferencePair(tuple(rng.randrange(3, vocab - 1) for _ in range(rng.randint(3, 10))),
                           reply(True), reply(False)) for _ in range(n)]


# --- the loss, by hand ------------------------------------------------------------------------------------


def test_bradley_terry_loss_by_hand():
    # Margin 0: no preference, ln 2. Margin +1: log(1 + e^-1). Margin -1: log(1 + e). Margin 4: log(1 + e^-4).
    losses = bradley_terry_loss(t(0.3, 1.0, -2.0, 2.0), t(0.3, 0.0, -1.0, -2.0))
    assert losses.tolist() == pytest.approx([LN2, 0.3132617, 1.3132617, 0.0181499], abs=1e-6)
    # The centring term: coef * (r_chosen + r_rejected)^2 per pair, so their mean is TRL's
    # coef * mean((r_w + r_l)^2). Pair 1 sums to 1 (+0.01), pair 2 to 0 (+0), pair 3 to -3 (+0.09).
    centred = bradley_terry_loss(t(1.0, 2.0, -2.0), t(0.0, -2.0, -1.0), center_rewards_coefficient=0.01)
    assert centred.tolist() == pytest.approx([0.3132617 + 0.01, 0.0181499, 1.3132617 + 0.09], abs=1e-6)
    # Only the difference matters without it: shifting both scores changes nothing.
    assert bradley_terry_loss(t(5.0), t(4.0)).item() == pytest.approx(0.3132617, abs=1e-6)


def test_config_names_the_bad_value():
    for kwargs, words in [
        ({"learning_rate": 0}, "learning_rate"), ({"epochs": 1.5}, "1.5"), ({"batch_size": 0}, "batch_size"),
        ({"center_rewards_coefficient": -0.1}, "-0.1"), ({"matmul_dtype": "fp8"}, "'fp8'"),
        ({"lr_schedule": "cosine"}, "'cosine'"), ({"target_modules": ()}, "target_modules"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
    ]:
        with pytest.raises(ValueError, match=words):
            RewardConfig(**kwargs)
    config = RewardConfig(target_modules="q_proj")
    assert config.target_modules == ("q_proj",) and config.epochs == 1
    assert json.loads(json.dumps(config_dict(config)))["target_modules"] == ["q_proj"]


# --- where the score is read ------------------------------------------------------------------------------


def test_the_score_is_read_at_the_last_real_token_whichever_side_is_padded(tiny_loaded):
    model = tiny_loaded.model
    torch.manual_seed(0)
    head = torch.nn.Linear(model.config.hidden_size, 1)
    decoder = decoder_of(model)
    pad = reward_pad_id(model)
    assert pad not in end_of_turn_ids(model) and end_of_turn_ids(model) == {tiny_loaded.tokenizer.eos_token_id}
    rows = [[5, 6, 7, 8, 9, 10, 11, 2], [12, 13, 2], [20, 21, 22, 23, 2]]
    with torch.no_grad():
        alone = torch.cat([reward_scores(decoder, head, *pad_rows([row], pad, "cpu")) for row in rows])
        right = reward_scores(decoder, head, *pad_rows(rows, pad, "cpu"))
        left = reward_scores(decoder, head, *pad_rows(rows, pad, "cpu", left=True))
        # The state read is the final (normed) hidden state at the row's last token, as the full model has it.
        full = model(input_ids=torch.tensor([rows[1]]), output_hidden_states=True).hidden_states[-1][0, -1]
    assert torch.allclose(right, alone, atol=1e-5) and torch.allclose(left, alone, atol=1e-5)
    assert head(full).item() == pytest.approx(alone[1].item(), abs=1e-5)
    assert len(set(alone.tolist())) == 3  # three different rows, three different scores: not a constant
    ids, mask = pad_rows(rows, pad, "cpu", left=True)
    assert ids[1].tolist() == [pad] * 5 + rows[1] and mask[1].tolist() == [0] * 5 + [1] * 3


def test_the_pad_id_is_never_end_of_turn():
    def model(pad, eos, unk, bos, generation_eos):
        config = SimpleNamespace(pad_token_id=pad, eos_token_id=eos, unk_token_id=unk, bos_token_id=bos,
                                 vocab_size=10)
        return SimpleNamespace(config=config, generation_config=SimpleNamespace(eos_token_id=generation_eos))

    # SmolLM2's config pads with its end of turn (<|im_end|>, 2): padding takes another id.
    assert reward_pad_id(model(pad=2, eos=2, unk=0, bos=1, generation_eos=2)) == 0
    # Several end-of-turn ids (a list in the generation config), all the usual candidates among them.
    many = model(pad=0, eos=0, unk=None, bos=1, generation_eos=[1, 0])
    assert end_of_turn_ids(many) == {0, 1} and reward_pad_id(many) == 2


# --- a round on the tiny model ----------------------------------------------------------------------------


def test_a_toy_preference_is_learned_and_chance_is_not_usable(tiny_loaded):
    model = tiny_loaded.model
    vocab = model.config.vocab_size
    seen = []
    result = train_reward(model, toy_pairs(vocab, 64, seed=1), toy_pairs(vocab, 32, seed=2), RewardConfig(**FAST),
                          on_step=seen.append)
    held = result.held_out
    assert held["n"] == 32 and held["accuracy_lo"] > 0.5 and held["margin"] > 0, held
    assert held["accuracy_lo"] <= held["accuracy"] <= held["accuracy_hi"]
    assert result.usable and result.train["n"] == 64 and result.train["accuracy"] > 0.7
    assert result.std > 0 and math.isfinite(result.mean)
    # 64 pairs in batches of 4, one epoch: 16 steps, each reported as it finishes.
    assert [s["step"] for s in seen] == list(range(1, 17)) and seen == result.steps
    for key in ("total_steps", "loss", "accuracy", "margin", "learning_rate", "grad_norm"):
        assert all(math.isfinite(s[key]) for s in seen), key
    assert seen[0]["learning_rate"] == FAST["learning_rate"] and seen[-1]["learning_rate"] < seen[0]["learning_rate"]

    # Random labels: nothing to learn, and the held-out interval says so.
    noise = train_reward(model, random_pairs(vocab, 64, seed=3), random_pairs(vocab, 32, seed=4),
                         RewardConfig(**FAST))
    assert noise.held_out["n"] == 32 and noise.held_out["accuracy_lo"] <= 0.5 and not noise.usable
    # No held-out pairs: nothing shows it beats chance, so it is not usable either.
    blind = train_reward(model, toy_pairs(vocab, 8, seed=5), [], RewardConfig(**FAST))
    assert blind.held_out["n"] == 0 and blind.held_out["accuracy"] is None and not blind.usable


def test_a_round_changes_only_the_lora_and_head_weights(tiny_loaded, monkeypatch):
    import peft

    model = tiny_loaded.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    initial = {}

    def recording_get_peft_model(*args, **kwargs):
        policy = real_get_peft_model(*args, **kwargs)
        initial.update({k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(policy).items()})
        return policy

    import trainers.reward

    heads = []

    def recording_new_head(*args, **kwargs):
        head = real_new_head(*args, **kwargs)
        heads.append({k: v.detach().clone() for k, v in head.state_dict().items()})
        return head

    real_get_peft_model, real_new_head = peft.get_peft_model, trainers.reward._new_head
    monkeypatch.setattr(peft, "get_peft_model", recording_get_peft_model)
    monkeypatch.setattr(trainers.reward, "_new_head", recording_new_head)
    result = train_reward(model, random_pairs(model.config.vocab_size, 8, seed=1), [], RewardConfig(**FAST))
    assert len(result.steps) == 2

    # The caller's model is untouched and still a plain model.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("lora" in name for name, _ in model.named_modules())
    # In the trained copy, every base weight is the original and every LoRA weight moved (B after step 1,
    # A after step 2, since A's first gradient passes through B = 0).
    trained = result.model.state_dict()
    base_keys = [k for k in trained if "lora_" not in k]
    assert base_keys and all(torch.equal(trained[k], before[k.replace("base_model.model.", "").replace(
        ".base_layer", "")]) for k in base_keys)
    lora = peft.get_peft_model_state_dict(result.model)
    assert set(lora) == set(initial) and any("lora_A" in k for k in lora)
    unmoved = [k for k, v in lora.items() if torch.equal(v, initial[k])]
    assert not unmoved, f"LoRA weights that did not move: {unmoved}"
    # The head is trained too. Its bias has no Bradley-Terry gradient (it cancels in the difference), and
    # with no centring term it stays where it started.
    assert len(heads) == 1 and result.head.weight.shape == (1, model.config.hidden_size)
    assert not torch.equal(result.head.weight, heads[0]["weight"])
    assert torch.equal(result.head.bias, heads[0]["bias"])


def test_the_centring_term_trains_the_head_bias(tiny_loaded):
    # The bias is frozen without the centring term (round-off in the cancelled gradient would otherwise
    # move it by AdamW's full step); with the term it is the loss's only way to pull scores to 0.
    result = train_reward(tiny_loaded.model, random_pairs(tiny_loaded.model.config.vocab_size, 8, seed=1), [],
                          RewardConfig(**FAST, center_rewards_coefficient=0.5))
    assert result.head.bias.item() != 0.0


def test_too_few_or_too_long_pairs(tiny_loaded):
    model = tiny_loaded.model
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=f"at least {MIN_REWARD_PAIRS} training pairs"):
        train_reward(model, toy_pairs(vocab, MIN_REWARD_PAIRS - 1, seed=6), [], RewardConfig(**FAST))
    long = random_pairs(vocab, 3, seed=7, prompt=(30, 40), reply=(20, 30))
    short = toy_pairs(vocab, MIN_REWARD_PAIRS, seed=8)
    result = train_reward(model, short + long, long[:1] + short[:2], RewardConfig(**dict(FAST, max_length=25)))
    assert result.trained == MIN_REWARD_PAIRS and result.skipped_too_long == 4 and result.held_out["n"] == 2
    with pytest.raises(ValueError, match="got 7 \\(3 of 10 too long\\)"):
        train_reward(model, short[:-1] + long, [], RewardConfig(**dict(FAST, max_length=25)))


# --- the published folder ---------------------------------------------------------------------------------


def published(result, loaded, folder, name="r1", model_id=None):
    model_id = model_id or loaded.model_id
    manifest = {"base_model_id": model_id, "algo": "reward", "config": config_dict(result.config),
                "metrics": result.stats()}
    return publish(folder, name, lambda tmp: save_reward_model(result, tmp), manifest,
                   verify=lambda tmp: load_reward_model(loaded.model, tmp, model_id), required=REWARD_REQUIRED_FILES)


def test_save_publish_load_scores_the_same(tiny_loaded, tmp_path):
    from trainers.data import PairSpec, tokenize

    model, tokenizer = tiny_loaded.model, tiny_loaded.tokenizer
    vocab = model.config.vocab_size
    result = train_reward(model, toy_pairs(vocab, 16, seed=9), toy_pairs(vocab, 8, seed=10), RewardConfig(**FAST))
    folder = published(result, tiny_loaded, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r1"]  # no temporary folder left
    manifest = check_files(folder, tiny_loaded.model_id, required=REWARD_REQUIRED_FILES)
    assert set(REWARD_REQUIRED_FILES) <= set(manifest["files"])
    stats = json.loads((folder / "reward_stats.json").read_text())
    assert stats["mean"] == result.mean and stats["std"] == result.std and stats["usable"] == result.usable
    assert stats["held_out"]["n"] == 8 and stats["held_out"]["accuracy_lo"] == result.held_out["accuracy_lo"]

    scorer = load_reward_model(model, folder, tiny_loaded.model_id)
    assert scorer.name == "r1" and scorer.manifest["files"] == manifest["files"]
    assert (scorer.mean, scorer.std, scorer.usable) == (result.mean, result.std, result.usable)
    pairs = [(p.prompt_ids, reply) for p in toy_pairs(vocab, 12, seed=11) for reply in (p.chosen_ids, p.rejected_ids)]
    assert scorer.score(pairs) == pytest.approx(result.scorer().score(pairs), abs=1e-5)
    # Normalised by the training replies' statistics, clipped.
    raw = [scorer.mean, scorer.mean + 2 * scorer.std, scorer.mean - 100 * scorer.std]
    assert scorer.normalise(raw) == pytest.approx([0.0, 2.0, -5.0])
    assert scorer.normalise(raw, clip=1.0) == pytest.approx([0.0, 1.0, -1.0])

    # Chat replies as text score exactly as the training data path tokenises them.
    context = (("user", "What is the capital of France?"),)
    spec = PairSpec(context, "Paris.", "Hello!", "choice", 1, 1, None, None, None, (1,))
    pair = tokenize(tokenizer, spec)
    by_ids = scorer.score([(pair.prompt_ids, pair.chosen_ids), (pair.prompt_ids, pair.rejected_ids)])
    assert scorer.score_texts(tokenizer, [{"role": "user", "content": context[0][1]}], ["Paris.", "Hello!"]) == by_ids
    assert scorer.score_texts(tokenizer, context, ["Paris."]) == pytest.approx(by_ids[:1], abs=1e-6)  # batch of 1
    assert pair.chosen_ids[-2] == tokenizer.eos_token_id  # the reply ends with the template's end of turn

    # The base model is untouched by loading, and an adapter folder check without `required` still passes.
    assert not any("lora" in name for name, _ in model.named_modules())
    check_files(folder, tiny_loaded.model_id)


def test_a_damaged_or_foreign_reward_model_is_refused(tiny_loaded, tmp_path):
    model = tiny_loaded.model
    vocab = model.config.vocab_size
    result = train_reward(model, toy_pairs(vocab, 8, seed=12), [], RewardConfig(**FAST))
    folder = published(result, tiny_loaded, tmp_path)
    with pytest.raises(AdapterError, match="trained on"):
        load_reward_model(model, folder, "someone/else")
    head = folder / SCORE_HEAD_FILE
    head.write_bytes(head.read_bytes()[:40])
    with pytest.raises(AdapterError, match="does not match its hash"):
        load_reward_model(model, folder, tiny_loaded.model_id)

    # A policy adapter folder (published without the reward files) is not a reward model.
    from trainers.dpo import DPOConfig, save_adapter, train_dpo

    dpo = train_dpo(model, random_pairs(vocab, 4, seed=13), [], DPOConfig(epochs=1, lora_r=4, lora_alpha=8,
                                                                         matmul_dtype="float32"))
    adapter = publish(tmp_path, "v1", lambda tmp: save_adapter(dpo, tmp), {"base_model_id": tiny_loaded.model_id})
    with pytest.raises(AdapterError, match=f"lacks {SCORE_HEAD_FILE}"):
        load_reward_model(model, adapter, tiny_loaded.model_id)

    # A head that scores NaN is refused when publishing, and nothing is put in place.
    with torch.no_grad():
        result.head.weight[0, 0] = float("nan")
    with pytest.raises(AdapterError, match="non-finite"):
        published(result, tiny_loaded, tmp_path / "bad")
    assert list((tmp_path / "bad").iterdir()) == []


# --- divergence -------------------------------------------------------------------------------------------


def test_a_nan_loss_aborts_the_round(tiny_loaded, tmp_path):
    """A reward model holding a NaN (a corrupted file, a diverged round) makes the loss NaN: the round stops."""
    model = tiny_loaded.model
    pairs = toy_pairs(model.config.vocab_size, 8, seed=14)
    result = train_reward(model, pairs, [], RewardConfig(**FAST))
    with torch.no_grad():
        result.head.weight[0, 0] = float("nan")
    save_reward_model(result, tmp_path / "bad")
    with pytest.raises(RewardAborted, match="loss is nan") as caught:
        train_reward(model, pairs, [], RewardConfig(**FAST), init_dir=tmp_path / "bad")
    assert caught.value.step == 1 and caught.value.steps == []
    assert isinstance(caught.value, TrainingAborted)  # a runner that records aborted DPO rounds catches it too
    assert str(caught.value).startswith("reward model round aborted at step 1")


def test_the_gradient_norm_threshold_aborts_before_the_step(tiny_loaded):
    pairs = toy_pairs(tiny_loaded.model.config.vocab_size, 8, seed=15)
    with pytest.raises(RewardAborted, match="gradient norm") as caught:
        train_reward(tiny_loaded.model, pairs, [], RewardConfig(**dict(FAST, max_grad_norm_abort=1e-9)))
    assert caught.value.step == 1 and caught.value.steps == []


def test_a_warm_start_continues_from_the_saved_reward_model(tiny_loaded, tmp_path):
    model = tiny_loaded.model
    vocab = model.config.vocab_size
    train, held = toy_pairs(vocab, 8, seed=16), toy_pairs(vocab, 8, seed=17)
    first = train_reward(model, train, held, RewardConfig(**FAST))
    save_reward_model(first, tmp_path / "r1")
    # One step at a vanishing learning rate: the second round ends where the first did.
    second = train_reward(model, train, held, RewardConfig(**dict(FAST, learning_rate=1e-12, batch_size=8)),
                          init_dir=tmp_path / "r1")
    assert second.held_out["margin"] == pytest.approx(first.held_out["margin"], abs=1e-5)
    assert second.mean == pytest.approx(first.mean, abs=1e-5)


def test_a_round_on_bf16_weights(tiny_loaded, tmp_path):
    # What a GPU serves (bf16 weights), on the CPU: LoRA and head stay float32, the hidden state is cast up
    # for the head, and the published folder loads back onto the bf16 model.
    model = copy.deepcopy(tiny_loaded.model).to(torch.bfloat16)
    vocab = model.config.vocab_size
    result = train_reward(model, toy_pairs(vocab, 8, seed=18), toy_pairs(vocab, 4, seed=19), RewardConfig(**FAST))
    assert all(math.isfinite(s["loss"]) for s in result.steps) and math.isfinite(result.std)
    assert result.head.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for n, p in result.model.named_parameters() if "lora_" in n)
    folder = published(result, SimpleNamespace(model=model, model_id=tiny_loaded.model_id), tmp_path)
    pairs = [(p.prompt_ids, p.chosen_ids) for p in toy_pairs(vocab, 4, seed=20)]
    loaded = load_reward_model(model, folder, tiny_loaded.model_id).score(pairs)
    assert loaded == pytest.approx(result.scorer().score(pairs), abs=1e-5)
    assert next(model.parameters()).dtype == torch.bfloat16
