"""PPO against a reward function: a LoRA adapter, a value head on its hidden states, the base model as reference.

    from trainers.ppo import PPOConfig, save_adapter, train_ppo
    result = train_ppo(loaded.model, loaded.tokenizer, prompts, reward_fn, PPOConfig())
    save_adapter(result, "adapters/v4")  # the same adapter files train_dpo's rounds write

`prompts` are token ids of chat contexts rendered with the chat template, ending with the assistant's
generation prompt (`trainers.data.rollout_prompts`). `reward_fn(prompt_ids_list, reply_ids_list)` returns
one score per rollout: a reward model's normalised score in a round (trainers/ppo_round.py), a scripted
function of the reply in the tests. The reply ids it gets are the reply's own tokens, without the
end-of-turn token that stopped it (what a person would read); PPO trains on that stop token too, since
when to stop is part of what the policy learns.

TRL removed its PPO trainer; this one follows the recipe of Ziegler et al. 2019 ("Fine-Tuning Language
Models from Human Preferences") as TRL's PPOv2 and OpenRLHF implement it: a per-token KL penalty to the
reference, the score on the last token, GAE, whitened advantages, the clipped surrogate and a clipped
value loss. The critic is a linear head on the policy's own last hidden states (TRL's original
`AutoModelForCausalLMWithValueHead`): one forward gives both the log-probs and the values, and a
135M model does not fit twice into a CPU round's time.

A round, in the order `train_ppo` runs it:
1. Copy the model and wrap the copy with LoRA (or load the previous round's adapter, trainable), as
   train_dpo does; a fresh value head, nn.Linear(hidden, 1) with a small init. The reference is the same
   model with the adapter switched off (`with policy.disable_adapter():`), never a second copy.
2. Each of `config.iterations` iterations:
   a. Prompts: the next `rollouts_per_iteration` of a seeded shuffle of the given prompts (reshuffled
      when they run out, so a round of 32 prompts in 2 x 16 rollouts uses each once).
   b. Rollouts from the current policy: HF `generate` on the PeftModel, left-padded batches, temperature 1
      with no top-k/top-p (the log-probs PPO uses are of the distribution sampled from, through the same
      matrix products), cut at the first stop token, seeded. Every rollout empty: PPOAborted.
   c. Scores: reward_fn, clipped to +-score_clip, plus truncation_penalty for rollouts that hit
      max_new_tokens without ending. A NaN/inf score: PPOAborted.
   d. One no-grad scoring pass, on the first epoch's minibatches: reference and policy logits of every
      reply token (full next-token distributions, so the logged KL to the reference and the entropy are
      exact, not one-sample estimates), the sampled tokens' log-probs and the values. Mean KL above
      max_kl: PPOAborted before the iteration trains.
   e. Per-token rewards -kl_coef * (log pi - log pi_ref), the score added on the last token; GAE;
      advantages whitened over the iteration's reply tokens.
   f. ppo_epochs passes over shuffled minibatches: clipped surrogate + vf_coef x clipped value loss,
      AdamW on the LoRA and value-head weights, gradient clipping. A NaN/inf loss or gradient norm:
      PPOAborted before that step touches the weights.
   g. With adaptive_kl, the coefficient moves towards kl_target (Ziegler's controller); on_step gets the
      iteration's metrics.
3. The PeftModel (back on PEFT's own forward), the value head, the per-iteration metrics and the time
   spent generating and training.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from trainers import dpo
# The round's setup is DPO's: the same LoRA targets, matmul-dtype choice and seeding.
from trainers.fastlora import fast_lora
from trainers.logprobs import token_logprobs
from trainers.runtime import (ALL_LINEAR, MATMUL_DTYPES, MatmulDtype, device_dtype, matmul_dtype,
                              round_adapter_to_bf16, seeded)

RewardFn = Callable[[list[list[int]], list[list[int]]], Sequence[float]]

# Tokens that end an assistant turn besides the tokenizer's eos: ChatML's end of turn (SmolLM2, Qwen).
END_OF_TURN_TOKENS = ("<|im_end|>",)
# Rows decoded together: each decode step reads the weights once for all of them, and 64 bounds one
# batch's KV cache and left padding (a round's 16 rollouts are one batch).
MAX_GENERATE_ROWS = 64
# The value head starts near zero, so the first iteration's advantages are close to the returns
# themselves (whitened: a mean baseline) instead of the noise of a random critic; a zero weight would
# also block its gradient into the shared trunk, which a small one does not.
VALUE_HEAD_INIT_STD = 1e-3
# Keeps whitening finite when every advantage is the same (a constant reward, one-token replies).
WHITEN_EPS = 1e-8


class PPOAborted(dpo.TrainingAborted):
    """A round stopped: all rollouts empty, a NaN/inf score or loss, or the KL to the reference past max_kl."""

    what, unit = "PPO round", "iteration"


@dataclass
class PPOConfig:
    """One PPO round. The defaults are sized for a round of 32 prompts on SmolLM2-135M on a 2-core CPU:
    2 iterations of 16 rollouts (each prompt once); measured 102 s on this project's shared 2-core CPU,
    42 s of it generating and 58 s scoring and training."""

    # LoRA-sized. Measured on SmolLM2, the first iteration of a default round (a scripted score): 1e-4
    # clipped 4% of the tokens (approx_kl 0.004), 2e-4 10% (0.014), 5e-4 20% (0.069, past the 0.02-0.05
    # at which PPO implementations stop an epoch early). 2e-4 is also DPO's step for the same adapter. The
    # tiny random test model needs 3e-2 (tests/test_ppo.py measures why): its numbers do not transfer.
    learning_rate: float = 2e-4
    # Rollout/update cycles. Two of 16: each batch is big enough for whitened advantages to mean something,
    # and the second is sampled from the policy the first one trained (4 x 8 costs the same with half the
    # batch; 1 x 32 would take every update from samples drawn before any of them).
    iterations: int = 2
    rollouts_per_iteration: int = 16  # prompts (one rollout each) per iteration
    minibatch_size: int = 4  # rollouts per optimizer step: 4 rows of prompt + reply keep a CPU's matmuls busy
    # Passes over an iteration's rollouts. TRL's default is 4; 2 keeps the round's training part about as
    # long as its generating part, and the approx_kl between old and new policy stays small.
    ppo_epochs: int = 2
    # Reply length limit: the loop samples with 96 (docs/BENCHMARKS.md, "The loop"), so PPO sees replies
    # as long as the ones people vote on.
    max_new_tokens: int = 96
    # Sampling temperature of the rollouts. Only 1.0: PPO's ratio and KL are of the policy's own
    # distribution, and the shared log-prob helper scores untempered logits.
    temperature: float = 1.0
    # Initial per-token KL coefficient beta. TRL's PPO default: a reply drifting 20 nats from the
    # reference costs one unit of normalised score.
    kl_coef: float = 0.05
    # Fixed beta by default: a round has tens of rollouts, and Ziegler's controller with its horizon of
    # 10k samples moves beta by < 0.1% per round, while a horizon short enough to matter inside a round
    # makes beta chase the noise of a 16-rollout KL estimate. A fixed beta also keeps every round's
    # objective the same, so rounds compare. Turn it on to carry beta across rounds (PPOResult.kl_coef).
    adaptive_kl: bool = False
    kl_target: float = 6.0  # the adaptive controller's target KL per reply, nats (Ziegler's and TRL's)
    kl_horizon: int = 10000  # the controller's horizon in rollouts (Ziegler's and TRL's)
    gamma: float = 1.0  # discount: 1, the reply is one episode scored at its end
    lam: float = 0.95  # GAE lambda: trades the critic's bias against the variance of the returns
    clip_eps: float = 0.2  # the surrogate's ratio clip
    value_clip: float = 0.2  # how far a value may move from its rollout-time value before its loss is clipped
    # Weight of the value loss: the critic shares the policy's trunk (the LoRA weights), so its gradient
    # is kept small next to the policy's (TRL's value-head PPO used 0.1).
    vf_coef: float = 0.1
    max_grad_norm: float = 1.0  # clip the LoRA + value-head gradient to this norm
    # The caller's score is clipped to +-this: a normalised reward model's outliers past 5 sigma say more
    # about the reward model than the reply, and one of them would dominate a 16-rollout batch.
    score_clip: float = 5.0
    # Added to the score of a rollout that hit max_new_tokens without ending: a reply cut off mid-way is
    # not one a person would read, and the reward model cannot see what is missing.
    truncation_penalty: float = -1.0
    # How far (mean nats per reply) this round may move the KL to the reference past where it started
    # before it aborts. Relative to the start: a round warm-starts from the live version, which earlier
    # rounds may already have moved 2-15 nats from v0 (docs/BENCHMARKS.md); an absolute ceiling would stop
    # every later round at its first iteration. 20 nats more means the round has run away.
    max_kl: float = 20.0
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scale is alpha / r
    # 0: the PPO ratio compares the same network twice; with dropout it would be noise (TRL turns it off).
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ALL_LINEAR  # module names LoRA wraps
    seed: int = 0  # LoRA and value-head init, prompt order, sampling, minibatch order
    # The dtype of the frozen base model's products in the scoring and training passes, as DPOConfig's:
    # the rollouts are sampled, scored and trained on through the same rounding, reference included.
    matmul_dtype: MatmulDtype = "auto"
    # Stop tokens; None: the tokenizer's eos_token_id plus <|im_end|> when the vocabulary has it.
    eos_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        if isinstance(self.target_modules, str):  # one name, not its characters
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if self.eos_ids is not None:
            self.eos_ids = tuple(self.eos_ids)
            if not self.eos_ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                           for i in self.eos_ids):
                raise ValueError(f"eos_ids must be token ids >= 0 (or None), got {self.eos_ids!r}")
        positive = {"learning_rate": self.learning_rate, "kl_target": self.kl_target, "clip_eps": self.clip_eps,
                    "value_clip": self.value_clip, "max_grad_norm": self.max_grad_norm,
                    "score_clip": self.score_clip, "max_kl": self.max_kl}
        for name, value in positive.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        non_negative = {"kl_coef": self.kl_coef, "vf_coef": self.vf_coef}
        for name, value in non_negative.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        counts = {"iterations": self.iterations, "rollouts_per_iteration": self.rollouts_per_iteration,
                  "minibatch_size": self.minibatch_size, "ppo_epochs": self.ppo_epochs,
                  "max_new_tokens": self.max_new_tokens, "kl_horizon": self.kl_horizon, "lora_r": self.lora_r,
                  "lora_alpha": self.lora_alpha}
        for name, value in counts.items():
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.minibatch_size > self.rollouts_per_iteration:
            raise ValueError(f"minibatch_size {self.minibatch_size} is more than rollouts_per_iteration "
                             f"{self.rollouts_per_iteration}")
        if self.temperature != 1.0:
            raise ValueError(f"temperature must be 1.0 (PPO scores the policy's own distribution), got "
                             f"{self.temperature!r}")
        if not (isinstance(self.truncation_penalty, (int, float)) and math.isfinite(self.truncation_penalty)):
            raise ValueError(f"truncation_penalty must be a finite number, got {self.truncation_penalty!r}")
        for name, value in {"gamma": self.gamma, "lam": self.lam}.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise ValueError(f"matmul_dtype {self.matmul_dtype!r} is not one of {MATMUL_DTYPES}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"target_modules must name at least one module, got {self.target_modules!r}")


def config_dict(config: PPOConfig) -> dict:
    """The config as plain JSON-able values (for provenance and the bench's output)."""
    values = asdict(config)
    values["target_modules"] = list(config.target_modules)
    values["eos_ids"] = None if config.eos_ids is None else list(config.eos_ids)
    return values


# --- the pure parts: every tensor is [batch, T], reply tokens first in each row, padding after ----------


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the True entries of mask (0 when there are none)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the masked entries (population variance); 0 outside the mask."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + WHITEN_EPS) * mask.to(x.dtype)


def token_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                  beta: float) -> torch.Tensor:
    """Per-token rewards [B, T]: -beta * (log pi - log pi_ref) at every reply token, plus the rollout's
    score [B] on its last reply token; 0 on padding. Every row needs at least one reply token."""
    mask = mask.to(logp.dtype)
    rewards = -beta * (logp - ref_logp) * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    return rewards.index_put((torch.arange(rewards.shape[0], device=rewards.device), last),
                             scores.to(rewards.dtype), accumulate=True)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns, both [B, T] and 0 on padding.

    delta_t = r_t + gamma V_{t+1} - V_t, with V = 0 after a row's last reply token (the episode ends there);
    A_t = delta_t + gamma lam A_{t+1}; returns = A + V (the value loss's targets).
    """
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    width = values.shape[1]
    for t in reversed(range(width)):
        if t + 1 < width:
            next_mask, next_value = mask[:, t + 1], values[:, t + 1] * mask[:, t + 1]
        else:
            next_mask = next_value = torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * next_mask * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, as a loss (mean over reply tokens), and the share of tokens where the
    clipped term is the one in force."""
    ratio = torch.exp(logp_new - logp_old)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).to(logp_new.dtype), mask).detach()


def value_loss(values_new: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> torch.Tensor:
    """0.5 x the larger of the squared errors of the new value and of the new value clipped to
    old +- clip, mean over reply tokens (the critic cannot jump far from its rollout-time estimate)."""
    clipped = values_old + (values_new - values_old).clamp(-clip, clip)
    losses = torch.maximum((values_new - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(losses, mask)


def adaptive_kl_coef(beta: float, kl: float, target: float, horizon: int, n: int) -> float:
    """Ziegler et al.'s controller: beta x (1 + clip(kl / target - 1, -0.2, 0.2) x n / horizon), after a
    batch of n rollouts whose mean KL was kl."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n / horizon)


# --- rollouts ---------------------------------------------------------------------------------------------


def stop_token_ids(tokenizer, eos_ids: Sequence[int] | None = None, model=None) -> tuple[int, ...]:
    """The ids that end a rollout: eos_ids when given, else every id the chat stops at (the model's
    generation config's eos ids and the tokenizer's: `playground.serving.generation.stop_token_ids`, so
    PPO never trains on continuations the chat would not write) plus <|im_end|> if the vocabulary has it."""
    from playground.serving.generation import stop_token_ids as chat_stop_ids

    if eos_ids is not None:
        return tuple(dict.fromkeys(int(i) for i in eos_ids))
    ids = sorted(chat_stop_ids(tokenizer, model))
    eos = tokenizer.eos_token_id
    ids += list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
    vocab = tokenizer.get_vocab()
    ids += [vocab[name] for name in END_OF_TURN_TOKENS if name in vocab]
    if not ids:
        raise ValueError("the tokenizer has no eos token and no <|im_end|>: pass PPOConfig(eos_ids=...)")
    return tuple(dict.fromkeys(int(i) for i in ids))


def _pad_id(tokenizer, stops: Sequence[int], vocab_size: int) -> int:
    """A padding id that is no stop token, so a padded position never reads as an ended reply (SmolLM2
    pads with its <|im_end|>). Padding is masked out and never scored, so any such id will do; when every
    id is a stop token, every rollout ends at its first token and the padding is never read."""
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id):
        if candidate is not None and candidate not in stops:
            return int(candidate)
    return next((i for i in range(vocab_size) if i not in stops), 0)


@dataclass
class Rollouts:
    prompts: list[list[int]]
    replies: list[list[int]]  # the reply's own tokens, stop token excluded: what reward_fn scores
    tokens: list[list[int]]  # what PPO trains on: the reply plus the stop token when it ended
    truncated: list[bool]  # hit max_new_tokens without a stop token

    def mask(self, device=None) -> torch.Tensor:
        """[R, T] True at each rollout's trained tokens (reply first, padding after); T the longest."""
        lengths = torch.tensor([len(t) for t in self.tokens])
        return (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).to(device)


@torch.no_grad()
def generate_rollouts(policy, prompts: Sequence[Sequence[int]], max_new_tokens: int, stops: Sequence[int],
                      pad_id: int, seed: int) -> Rollouts:
    """One sample per prompt at temperature 1, no top-k/top-p, cut at the first stop token; seeded."""
    from transformers import GenerationConfig

    device = next(policy.parameters()).device
    # Every sampling knob set to its neutral value: generate fills unset ones from the model's own
    # generation_config (SmolLM2's suggests a low temperature and top-p), which would change what PPO samples.
    settings = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0, epsilon_cutoff=0.0,
        eta_cutoff=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
        max_new_tokens=max_new_tokens, eos_token_id=list(stops), pad_token_id=pad_id, num_beams=1,
    )
    out = Rollouts([], [], [], [])
    stop_set = set(stops)
    with seeded(seed, device):
        for start in range(0, len(prompts), MAX_GENERATE_ROWS):
            chunk = [list(p) for p in prompts[start : start + MAX_GENERATE_ROWS]]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, prompt in enumerate(chunk):  # left padding: every row's next token is at the same column
                ids[row, width - len(prompt) :] = torch.tensor(prompt)
                attention[row, width - len(prompt) :] = 1
            sequences = policy.generate(input_ids=ids.to(device), attention_mask=attention.to(device),
                                        generation_config=settings)
            for prompt, new in zip(chunk, sequences[:, width:].tolist()):
                end = next((i for i, token in enumerate(new) if token in stop_set), None)
                out.prompts.append(prompt)
                out.replies.append(new[:end] if end is not None else new[:max_new_tokens])
                out.tokens.append(new[: end + 1] if end is not None else new[:max_new_tokens])
                out.truncated.append(end is None)
    return out


# --- scoring and training passes --------------------------------------------------------------------------


@dataclass
class _Rows:
    """Rollouts packed right-padded, one per row: prompt, the reply's tokens, padding."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    target_mask: torch.Tensor  # [B, L]: the reply tokens
    predicted: torch.Tensor  # [B, L]: the positions that predict them (the value head reads these too)


def _pack(prompts: Sequence[Sequence[int]], tokens: Sequence[Sequence[int]], pad_id: int, device) -> _Rows:
    width = max(len(p) + len(t) for p, t in zip(prompts, tokens))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    target = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, (prompt, reply) in enumerate(zip(prompts, tokens)):
        ids[row, : len(prompt) + len(reply)] = torch.tensor(list(prompt) + list(reply))
        attention[row, : len(prompt) + len(reply)] = 1
        target[row, len(prompt) : len(prompt) + len(reply)] = True
    predicted = torch.zeros_like(target)
    predicted[:, :-1] = target[:, 1:]  # position t-1 predicts token t
    return _Rows(ids.to(device), attention.to(device), target.to(device), predicted.to(device))


@contextmanager
def _last_hidden(policy):
    """While open, box['hidden'] holds the decoder's last hidden states [B, L, H] of the latest forward
    (with grad when the forward has it): the value head reads the same pass the log-probs come from."""
    decoder = policy.get_base_model().get_decoder()
    box: dict[str, torch.Tensor] = {}
    handle = decoder.register_forward_hook(lambda module, args, output: box.__setitem__("hidden", output[0]))
    try:
        yield box
    finally:
        handle.remove()


def _reply_logits(model, rows: _Rows) -> torch.Tensor:
    """Float32 logits [N, V] of the positions that predict reply tokens, row-major."""
    logits = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, logits_to_keep=rows.predicted,
                   use_cache=False).logits
    if logits.dim() == 3:  # a model that ignores a boolean logits_to_keep
        logits = logits[rows.predicted]
    return logits.float()


def _grid(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-major values of the reply tokens [N] laid out as [B, T] (0 on padding)."""
    return torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat)


@torch.no_grad()
def score_rollouts(policy, value_head, rollouts: Rollouts, batches: Sequence[Sequence[int]],
                   pad_id: int) -> dict[str, torch.Tensor]:
    """The scoring pass, no grad: [R, T] (rollouts.mask's layout) log-probs of the sampled tokens under the
    policy ('logp') and the reference ('ref_logp'), the values, and the exact per-token KL(policy ||
    reference) ('kl') and policy entropy ('entropy') from the full next-token distributions.

    batches: the rollout indices of each forward (every rollout once).
    """
    device = next(value_head.parameters()).device
    mask = rollouts.mask(device)
    if sorted(i for index in batches for i in index) != list(range(mask.shape[0])):
        raise ValueError(f"batches must hold each of the {mask.shape[0]} rollout indices exactly once")
    out = {k: torch.zeros(mask.shape, device=device) for k in ("logp", "ref_logp", "values", "kl", "entropy")}
    for index in batches:
        index = list(index)
        rows = _pack([rollouts.prompts[i] for i in index], [rollouts.tokens[i] for i in index], pad_id, device)
        targets = rows.input_ids[:, 1:][rows.target_mask[:, 1:]]
        with policy.disable_adapter():
            ref = torch.log_softmax(_reply_logits(policy, rows), dim=-1)
        with _last_hidden(policy) as box:
            logp = torch.log_softmax(_reply_logits(policy, rows), dim=-1)
        values = value_head(box["hidden"][rows.predicted].float())[:, 0]
        p = logp.exp()
        sub = mask[index]
        for name, flat in (("logp", logp.gather(1, targets[:, None])[:, 0]),
                           ("ref_logp", ref.gather(1, targets[:, None])[:, 0]), ("values", values),
                           ("kl", (p * (logp - ref)).sum(-1)), ("entropy", -(p * logp).sum(-1))):
            out[name][index] = _grid(flat, sub)
    return out


def _policy_pass(policy, value_head, rows: _Rows, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """With grad: [B, T] log-probs of the reply tokens (the shared helper) and values, from one forward."""
    with _last_hidden(policy) as box:
        flat, _ = token_logprobs(policy, rows.input_ids, rows.target_mask, rows.attention_mask)
    values = value_head(box["hidden"][rows.predicted].float())[:, 0]
    return _grid(flat, mask), _grid(values, mask)


def _minibatches(n: int, size: int, generator: torch.Generator) -> list[list[int]]:
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + size] for i in range(0, n, size)]


# --- the result -------------------------------------------------------------------------------------------


@dataclass
class PPOResult:
    # A PeftModel around a private copy of the base model, adapter trained: generate with it, or save the
    # adapter and drop it (it holds a full copy of the base weights).
    model: torch.nn.Module
    value_head: torch.nn.Module  # the critic, nn.Linear(hidden, 1) on the policy's last hidden states
    config: PPOConfig
    steps: list[dict] = field(default_factory=list)  # what on_step received, one dict per iteration
    seconds: float = 0.0  # the whole round
    generate_seconds: float = 0.0  # sampling the rollouts
    reward_seconds: float = 0.0  # inside reward_fn
    train_seconds: float = 0.0  # the scoring passes and the PPO epochs
    kl_coef: float = 0.0  # beta at the end of the round (moved only with adaptive_kl): the next round's start

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model)


def save_adapter(result: PPOResult, folder: str | Path) -> Path:
    """Write the adapter exactly as a DPO round's (trainers.dpo.save_adapter: adapter_config.json +
    adapter_model.safetensors), so publishing, hot-swap and rollback need nothing new. The value head is
    not saved: each round starts a fresh critic for its own policy."""
    return dpo.save_adapter(result, folder)  # it reads only result.model


# --- the round --------------------------------------------------------------------------------------------


def train_ppo(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    reward_fn: RewardFn,
    config: PPOConfig | None = None,
    init_adapter_dir: str | Path | None = None,
    on_step: Callable[[dict], None] | None = None,
) -> PPOResult:
    """Train a LoRA adapter with PPO on rollouts from `prompts`, scored by `reward_fn`.

    model: a plain HF causal LM; it is copied, never modified. tokenizer: gives the stop and padding ids.
    init_adapter_dir: a saved adapter to continue from (its rank and targets replace the config's lora_*
    fields); the reference stays the base model. on_step gets a dict of metrics after every iteration.
    Raises PPOAborted (nothing to publish), ValueError for bad arguments or a reward_fn that returns the
    wrong number of scores.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    config = config or PPOConfig()
    started = time.perf_counter()
    if isinstance(model, PeftModel):
        raise TypeError("train_ppo takes the base model; pass a previous adapter's folder as init_adapter_dir")
    vocab_size = model.get_input_embeddings().num_embeddings
    window = getattr(model.config, "max_position_embeddings", None)
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise ValueError("train_ppo needs at least one prompt")
    for i, prompt in enumerate(prompts):
        if not prompt or not all(isinstance(t, int) and 0 <= t < vocab_size for t in prompt):
            raise ValueError(f"prompt {i} must be a non-empty list of token ids in [0, {vocab_size})")
        if window is not None and len(prompt) + config.max_new_tokens > window:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens: with max_new_tokens={config.max_new_tokens} "
                             f"it overflows the model's {window}-token window")
    stops = stop_token_ids(tokenizer, config.eos_ids, model)
    start_kl = None  # the first iteration's KL to the reference: max_kl is measured from it
    pad_id = _pad_id(tokenizer, stops, vocab_size)
    device, dtype = device_dtype(model)

    # 1. A private copy with the adapter (base dropout off: the ratio and the KL must not be noise), and
    # the critic.
    base = copy.deepcopy(model)
    for module in base.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with seeded(config.seed, device):
        if init_adapter_dir is not None:
            policy = PeftModel.from_pretrained(base, str(init_adapter_dir), is_trainable=True)
        else:
            lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                              target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")
            policy = get_peft_model(base, lora)
        value_head = torch.nn.Linear(model.config.hidden_size, 1, device=device, dtype=torch.float32)
        torch.nn.init.normal_(value_head.weight, std=VALUE_HEAD_INIT_STD)
        torch.nn.init.zeros_(value_head.bias)
    policy.eval()
    trainable = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    matmul = matmul_dtype(config, device, dtype)

    generator = torch.Generator().manual_seed(config.seed)  # prompt order, sampling seeds, minibatch order
    order: list[int] = []
    beta = float(config.kl_coef)
    steps: list[dict] = []
    timing = {"generate": 0.0, "reward": 0.0, "train": 0.0}
    n = config.rollouts_per_iteration
    # The round runs on the LoRA layers' faster forward (and bf16 base products where those are fast),
    # decoding included: the rollouts are sampled through the same products the scoring pass then scores
    # them with, and decoding 16 rows of SmolLM2 took 0.18 s a step this way against 0.25 s on PEFT's own
    # forward (bf16; float32 0.24 s). The returned model is back on PEFT's forward.
    with seeded(config.seed, device), fast_lora(policy, matmul):  # dropout, if any, draws from the global RNG
        for step in range(1, config.iterations + 1):
            # 2a. The next prompts of the seeded shuffle.
            while len(order) < n:
                order += torch.randperm(len(prompts), generator=generator).tolist()
            chosen, order = order[:n], order[n:]
            sample_seed = int(torch.randint(2**62, (1,), generator=generator))
            epoch_batches = [_minibatches(n, config.minibatch_size, generator) for _ in range(config.ppo_epochs)]

            # 2b. Rollouts from the current policy.
            clock = time.perf_counter()
            rollouts = generate_rollouts(policy, [prompts[i] for i in chosen], config.max_new_tokens, stops,
                                         pad_id, sample_seed)
            timing["generate"] += time.perf_counter() - clock
            if not any(rollouts.replies):
                raise PPOAborted(f"all {n} rollouts were empty (every one stopped at its first token)", step,
                                 steps)

            # 2c. Scores. A wrong count is the caller's bug (ValueError); a NaN/inf is a fault of this
            # round's data - a reward model blowing up on some reply - and is handled like any divergence.
            clock = time.perf_counter()
            raw = list(reward_fn([list(p) for p in rollouts.prompts], [list(r) for r in rollouts.replies]))
            timing["reward"] += time.perf_counter() - clock
            if len(raw) != n:
                raise ValueError(f"reward_fn returned {len(raw)} scores for {n} rollouts")
            try:
                raw_scores = torch.tensor([float(s) for s in raw], dtype=torch.float32)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"reward_fn must return numbers, got {raw!r}") from exc
            bad = [i for i, s in enumerate(raw_scores.tolist()) if not math.isfinite(s)]
            if bad:
                raise PPOAborted(f"reward_fn returned {raw[bad[0]]} for rollout {bad[0]} "
                                 f"({len(bad)} non-finite of {n})", step, steps)
            truncated = torch.tensor(rollouts.truncated)
            scores = raw_scores.clamp(-config.score_clip, config.score_clip)
            scores = (scores + config.truncation_penalty * truncated.float()).to(device)

            clock = time.perf_counter()
            mask = rollouts.mask(device)
            # 2d. The scoring pass, on the first epoch's minibatches: the same rows and shapes as the
            # first training steps, so their ratio starts at 1.
            scored = score_rollouts(policy, value_head, rollouts, epoch_batches[0], pad_id)
            kl_per_rollout = scored["kl"].sum(1)
            kl = kl_per_rollout.mean().item()
            if start_kl is None:
                start_kl = kl if math.isfinite(kl) else 0.0
            if not math.isfinite(kl) or kl - start_kl > config.max_kl:
                raise PPOAborted(f"mean KL to the reference {kl:.4g} nats is more than max_kl={config.max_kl:g} past "
                                 f"the {start_kl:.4g} the round started at", step, steps)

            # 2e. Rewards, advantages, returns.
            rewards = token_rewards(scores, scored["logp"], scored["ref_logp"], mask, beta)
            advantages, returns = gae(rewards, scored["values"], mask, config.gamma, config.lam)
            advantages = whiten(advantages, mask)

            # 2f. PPO epochs.
            sums = {k: 0.0 for k in ("policy_loss", "value_loss", "loss", "clip_fraction", "approx_kl",
                                     "grad_norm")}
            updates = 0
            policy.train()
            for batches in epoch_batches:
                for index in batches:
                    sub = mask[index]
                    rows = _pack([rollouts.prompts[i] for i in index], [rollouts.tokens[i] for i in index],
                                 pad_id, device)
                    logp, values = _policy_pass(policy, value_head, rows, sub)
                    old = scored["logp"][index]
                    pg, clip_fraction = policy_loss(logp, old, advantages[index], sub, config.clip_eps)
                    vf = value_loss(values, scored["values"][index], returns[index], sub, config.value_clip)
                    loss = pg + config.vf_coef * vf
                    if not (torch.isfinite(pg) and torch.isfinite(vf)):
                        raise PPOAborted(f"policy loss {pg.item()}, value loss {vf.item()}", step, steps)
                    loss.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm).item()
                    if not math.isfinite(grad_norm):
                        raise PPOAborted(f"gradient norm {grad_norm}", step, steps)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    updates += 1
                    sums["policy_loss"] += pg.item()
                    sums["value_loss"] += vf.item()
                    sums["loss"] += loss.item()
                    sums["clip_fraction"] += clip_fraction.item()
                    sums["approx_kl"] += masked_mean(0.5 * (logp.detach() - old) ** 2, sub).item()
                    sums["grad_norm"] += grad_norm
            policy.eval()
            timing["train"] += time.perf_counter() - clock

            # 2g. The KL coefficient, the metrics.
            used_beta = beta
            if config.adaptive_kl:
                beta = adaptive_kl_coef(beta, kl, config.kl_target, config.kl_horizon, n)
            metrics = {
                "step": step, "total_steps": config.iterations,
                "score/mean": scores.mean().item(),  # what PPO optimised: clipped, with the truncation penalty
                "score/raw_mean": raw_scores.mean().item(),  # reward_fn's own scores
                "kl": kl,  # exact KL(policy || reference), summed over the reply, mean over rollouts (nats)
                "entropy": masked_mean(scored["entropy"], mask).item(),  # policy entropy per reply token (nats)
                "reply_length": sum(len(r) for r in rollouts.replies) / n,  # tokens, stop token excluded
                "truncated_share": truncated.float().mean().item(),
                "kl_coef": used_beta,
                "value/mean": masked_mean(scored["values"], mask).item(),
                "returns/mean": masked_mean(returns, mask).item(),
                **{k: v / updates for k, v in sums.items()},  # means over the iteration's optimizer steps
                "rollouts": n,
                "elapsed_s": time.perf_counter() - started,
            }
            steps.append(metrics)
            if on_step is not None:
                on_step(metrics)

    round_adapter_to_bf16(policy)  # what ships is what the serving engine keeps exactly (trainers.runtime)
    return PPOResult(
        model=policy, value_head=value_head, config=config, steps=steps, seconds=time.perf_counter() - started,
        generate_seconds=timing["generate"], reward_seconds=timing["reward"], train_seconds=timing["train"],
        kl_coef=beta,
    )

