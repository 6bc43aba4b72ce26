"""A reward model on the votes: the base model with LoRA and a scalar score head, trained with the
Bradley-Terry loss on the same pairs DPO trains on, published like an adapter, loaded to score replies.

    from playground.serving.adapters import publish
    from trainers.reward import (REWARD_REQUIRED_FILES, RewardConfig, config_dict, load_reward_model,
                                 save_reward_model, train_reward)
    result = train_reward(loaded.model, pairs_train, pairs_eval, RewardConfig())
    manifest = {"base_model_id": model_id, "algo": "reward", "config": config_dict(result.config),
                "metrics": result.stats()}
    folder = publish(reward_models_dir, "r1", lambda tmp: save_reward_model(result, tmp), manifest,
                     verify=lambda tmp: load_reward_model(loaded.model, tmp, model_id),
                     required=REWARD_REQUIRED_FILES)
    scorer = load_reward_model(loaded.model, folder, model_id)  # AdapterError for a bad folder
    rewards = scorer.normalise(scorer.score_texts(loaded.tokenizer, context_messages, ["one reply", "another"]))

The score of a (prompt, reply) row is `score_head(h)`, h the decoder's last hidden state at the row's
last real token: the last token of the chat template's tail after the reply (for SmolLM2 the newline after
`<|im_end|>`), so the head reads a state that has seen the whole reply and its end of turn. The LM head never runs (it is most of a causal LM's cost at a real vocabulary). Rows are
padded with an id that is not end-of-turn, and the last real token is found from the attention mask, with
positions counted over real tokens only, so left and right padding give the unpadded row's score.

A round, in the order `train_reward` runs it:
1. Copy the model, wrap the copy with LoRA and add a fresh score head (or load a previous reward model's
   LoRA and head, trainable). The caller's model is never modified.
2. The loop: each step scores the chosen and the rejected reply of its pairs as two rows each, in one
   forward; the loss is -log sigmoid(r_chosen - r_rejected) (+ the optional centring term); AdamW on the
   LoRA and head weights, linear decay, clipping. A NaN/inf loss or a gradient norm above
   `max_grad_norm_abort` raises RewardAborted before that step touches the weights.
3. After training, with the same forward the loaded scorer uses: loss, accuracy and margin on the
   training pairs and on the held-out ones (accuracy with its n and 95% Wilson interval), and the mean
   and standard deviation of the training replies' scores, which `RewardScorer.normalise` uses (PPO's
   rewards). `usable` is True only when the held-out interval's lower bound is above chance.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from playground.metrics.intervals import wilson
from playground.serving.adapters import PROBE_TOKENS, REQUIRED_FILES, AdapterError, check_files
from playground.serving.prompting import render
# The DPO round's own helpers: the same seeding, bf16 choice and length bucketing, not copies of them.
from trainers.dpo import LR_SCHEDULES, TrainingAborted, length_batches
from trainers.fastlora import fast_lora
from trainers.pairs import PreferencePair
from trainers.runtime import ALL_LINEAR, MATMUL_DTYPES, MatmulDtype, device_dtype, matmul_dtype, seeded

SCORE_HEAD_FILE = "score_head.safetensors"
REWARD_STATS_FILE = "reward_stats.json"
# A published reward model: the standard PEFT adapter, plus the head and the statistics that normalise it.
REWARD_REQUIRED_FILES = (*REQUIRED_FILES, SCORE_HEAD_FILE, REWARD_STATS_FILE)
# The layout of reward_stats.json; a loader refuses one it does not know rather than guess at its fields.
REWARD_FORMAT = 1
# A round with fewer training pairs than this can learn little but their noise: it is refused, with the
# count, rather than trained.
MIN_REWARD_PAIRS = 8
# Rows (replies) per no-grad scoring forward: no activations are kept, and rows go length-sorted, so a
# bigger batch wastes little padding.
SCORE_BATCH_ROWS = 16
# Normalised rewards are clipped to +-this many standard deviations: one reply far outside what the
# reward model was trained on should not dominate a PPO batch.
NORMALISE_CLIP = 5.0
# A spread below this (every reply scored alike) would blow normalised rewards up: divide by this instead.
MIN_REWARD_STD = 1e-6
# A reward model is usable when the lower end of its held-out accuracy interval is above this: chance.
CHANCE_ACCURACY = 0.5


class RewardAborted(TrainingAborted):
    """A reward round stopped because training diverged (NaN/inf loss, exploding gradient norm).

    A TrainingAborted, so a runner that already records aborted DPO rounds records these the same way."""

    what = "reward model round"


@dataclass
class RewardConfig:
    """One reward model round. The defaults are set for a round of ~32-64 chat pairs, like DPOConfig's."""

    # LoRA-sized, measured on SmolLM2-135M (64 chat pairs whose chosen reply holds one given word, one
    # epoch of 16 steps): 1e-4 reached 91% held-out accuracy at a mean margin of 0.16; 1e-3 saturated in 6
    # steps (training loss 0.00, margin 12: on real, noisy votes that is memorising them); 3e-4 reached
    # 100% at margin 2.2, its loss still falling. The 64-wide random test model needs ~10x more.
    learning_rate: float = 3e-4
    # Passes over the pairs. One: reward models overfit fast (InstructGPT trains its reward models for a
    # single epoch for that reason).
    epochs: int = 1
    batch_size: int = 4  # pairs per forward (two rows each: chosen and rejected)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # clip the LoRA + head gradient to this norm
    # A pre-clip gradient norm above this means divergence: abort the round (as DPOConfig).
    max_grad_norm_abort: float = 1e3
    lr_schedule: Literal["linear", "constant"] = "linear"  # 'linear' decays to 0 at the last step
    weight_decay: float = 0.0  # AdamW weight decay on the LoRA and head weights
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scale is alpha / r
    lora_dropout: float = 0.0  # 0: the same reply scores the same in training and when served
    target_modules: tuple[str, ...] = ALL_LINEAR  # module names LoRA wraps
    max_length: int = 1024  # pairs with prompt + longer reply above this many tokens are skipped (counted)
    seed: int = 0  # LoRA and head init, batch order and dropout
    # TRL's center_rewards_coefficient: adds coef * mean((r_chosen + r_rejected)^2), pulling scores towards
    # 0. Off: the stored mean and std already normalise the scores PPO sees, so the offset is harmless.
    center_rewards_coefficient: float = 0.0
    # The dtype of the frozen base model's matrix products while training (see DPOConfig.matmul_dtype).
    # The statistics and held-out metrics are scored afterwards in the weights' own dtype, as the loaded
    # scorer scores.
    matmul_dtype: MatmulDtype = "auto"

    def __post_init__(self):
        if isinstance(self.target_modules, str):  # one name, not its characters
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        positive = {"learning_rate": self.learning_rate, "max_grad_norm": self.max_grad_norm,
                    "max_grad_norm_abort": self.max_grad_norm_abort}
        for name, value in positive.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        counts = {"epochs": self.epochs, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                  "lora_r": self.lora_r, "lora_alpha": self.lora_alpha, "max_length": self.max_length}
        for name, value in counts.items():
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise ValueError(f"matmul_dtype {self.matmul_dtype!r} is not one of {MATMUL_DTYPES}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r} is not one of {LR_SCHEDULES}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        coef = self.center_rewards_coefficient
        if not (isinstance(coef, (int, float)) and math.isfinite(coef) and coef >= 0):
            raise ValueError(f"center_rewards_coefficient must be a finite number >= 0, got {coef!r}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"target_modules must name at least one module, got {self.target_modules!r}")


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       center_rewards_coefficient: float = 0.0) -> torch.Tensor:
    """Per-pair losses [n]: -log sigmoid(r_chosen - r_rejected) + coef * (r_chosen + r_rejected)^2.

    Their mean is TRL's RewardTrainer loss, centring term included."""
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return losses


# --- scoring rows -----------------------------------------------------------------------------------------


def end_of_turn_ids(model) -> set[int]:
    """The ids that end a turn: the config's and the generation config's eos_token_id."""
    ids: set[int] = set()
    for config in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        value = getattr(config, "eos_token_id", None)
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None:
                ids.add(int(token))
    return ids


def reward_pad_id(model) -> int:
    """A padding id that is not an end-of-turn token (SmolLM2 pads with <|im_end|>, its end of turn).

    The score position here comes from the attention mask, so padding cannot move it. The id still matters
    to code that finds the last token by the pad id instead, as transformers' *ForSequenceClassification
    heads (TRL's reward models) do: with pad = end of turn they read before the reply's end-of-turn tokens.
    """
    end = end_of_turn_ids(model)
    for name in ("pad_token_id", "unk_token_id", "bos_token_id"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value not in end:
            return value
    return next(i for i in range(model.config.vocab_size) if i not in end)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, device, left: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded to one width: (input_ids [B, L], attention_mask [B, L]); right-padded unless left."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[b, span] = torch.tensor(list(row), dtype=torch.long)
        mask[b, span] = 1
    return ids.to(device), mask.to(device)


def reward_scores(decoder, head: torch.nn.Linear, input_ids: torch.Tensor, attention_mask: torch.Tensor
                  ) -> torch.Tensor:
    """Each row's score at its last real token: [B], in the head's dtype (float32).

    decoder: the causal LM's decoder stack (`decoder_of`), so no LM-head logits are computed.
    """
    mask = attention_mask.long()
    # Positions count real tokens only: a left-padded row gets the positions, hence the hidden states, of
    # the row unpadded (HF's default positions would start at the first padding token).
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = decoder(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state
    index = torch.arange(mask.shape[1], device=mask.device)
    last = (mask * index).argmax(-1)  # the last position the mask marks real, whichever side the padding is
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return head(picked.to(head.weight.dtype))[:, 0]


def decoder_of(model):
    """The decoder stack of a causal LM, or of the model inside a PeftModel (LoRA layers included)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is base:
        decoder = getattr(base, "model", None)
    if decoder is None:
        raise TypeError(f"{type(base).__name__} has no decoder stack to read hidden states from")
    return decoder


@torch.no_grad()
def score_rows(decoder, head: torch.nn.Linear, pad_id: int, rows: Sequence[Sequence[int]],
               batch_rows: int = SCORE_BATCH_ROWS) -> list[float]:
    """The score of every row (prompt + reply tokens), in the order given; length-sorted batches."""
    device = head.weight.device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    scores = [0.0] * len(rows)
    for start in range(0, len(order), batch_rows):
        index = order[start : start + batch_rows]
        ids, mask = pad_rows([rows[i] for i in index], pad_id, device)
        for i, value in zip(index, reward_scores(decoder, head, ids, mask).tolist()):
            scores[i] = value
    return scores


def _new_head(hidden_size: int, std: float, device) -> torch.nn.Linear:
    # As transformers' sequence-classification heads start: normal(0, initializer_range). Scores start small
    # (std 0.17 on the tiny model, 0.37 on SmolLM2, over random-token replies), so the first steps' sigmoid
    # is not saturated. The bias gets no Bradley-Terry gradient (it cancels in the difference); it is there
    # for the centring term to absorb the offset.
    head = torch.nn.Linear(hidden_size, 1, dtype=torch.float32)
    torch.nn.init.normal_(head.weight, std=std)
    torch.nn.init.zeros_(head.bias)
    return head.to(device)


def _read_head(folder: Path, hidden_size: int, device) -> torch.nn.Linear:
    from safetensors.torch import load_file

    tensors = load_file(str(Path(folder) / SCORE_HEAD_FILE))
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if shapes != {"weight": (1, hidden_size), "bias": (1,)}:
        raise AdapterError(f"{Path(folder).name}/{SCORE_HEAD_FILE} holds {shapes}, not a head for hidden size "
                           f"{hidden_size}")
    head = torch.nn.Linear(hidden_size, 1, dtype=torch.float32)
    head.load_state_dict({k: v.float() for k, v in tensors.items()})
    return head.to(device)


def _message(message) -> dict[str, str]:
    if isinstance(message, dict):
        return {"role": message["role"], "content": message["content"]}
    role, content = message  # the (role, content) tuples of trainers.data.PairSpec.context
    return {"role": role, "content": content}


class RewardScorer:
    """A reward model ready to score: raw scores, normalised ones, and chat replies as text."""

    def __init__(self, model, head: torch.nn.Linear, mean: float, std: float, usable: bool,
                 name: str | None = None, manifest: dict | None = None, stats: dict | None = None):
        self.model = model.eval()
        self.head = head.eval()
        self.decoder = decoder_of(model)
        self.pad_id = reward_pad_id(model)
        self.mean = float(mean)
        self.std = float(std)
        self.usable = bool(usable)
        self.name = name  # the published folder's name ('r1'); None for one not published
        self.manifest = manifest or {}
        self.stats = stats or {}  # reward_stats.json as read

    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[float]:
        """Raw scores of (prompt_ids, reply_ids) pairs, in the order given, without grad."""
        rows = []
        for prompt_ids, reply_ids in pairs:
            if not reply_ids:
                raise ValueError("a reward is read at a reply's last token: every reply needs at least one token")
            rows.append(tuple(prompt_ids) + tuple(reply_ids))
        return score_rows(self.decoder, self.head, self.pad_id, rows)

    def normalise(self, scores: Sequence[float], clip: float = NORMALISE_CLIP) -> list[float]:
        """(score - mean) / std over the training replies, clipped to +-clip."""
        std = max(self.std, MIN_REWARD_STD)
        return [min(clip, max(-clip, (s - self.mean) / std)) for s in scores]

    def score_texts(self, tokenizer, context_messages: Sequence, replies: Sequence[str]) -> list[float]:
        """Raw scores of replies to a conversation, rendered exactly as the training pairs are
        (`trainers.data.tokenize`): the prompt with the generation prompt, each reply as the rendered
        conversation's remainder. context_messages: dicts with role and content, or (role, content)."""
        return self.score_chats(tokenizer, [(context_messages, text) for text in replies])

    def score_chats(self, tokenizer, chats: Sequence[tuple[Sequence, str]]) -> list[float]:
        """Raw scores of (context messages, reply text) items, each rendered as `score_texts` does, all
        scored in one batched pass (PPO's rollouts: one reply to each of many contexts)."""
        pairs = []
        prompts: dict[int, list[int]] = {}
        for context_messages, text in chats:
            messages = [_message(m) for m in context_messages]
            key = id(context_messages)
            prompt = prompts.get(key)
            if prompt is None:
                prompt = prompts[key] = render(tokenizer, messages)
            full = render(tokenizer, messages + [{"role": "assistant", "content": text}], add_generation_prompt=False)
            # The score is read at the last token of the whole rendered row, so where prompt ends and reply
            # begins does not change it; only training labels need the prompt to be an exact prefix. A
            # reply whose text merges with the prompt's last token when rendered (a sampled reply starting
            # mid-word, say) is scored on its rendering all the same.
            split = len(prompt) if full[: len(prompt)] == prompt and len(full) > len(prompt) else len(full) - 1
            pairs.append((full[:split], full[split:]))
        return self.score(pairs)

    def ppo_reward(self, tokenizer, contexts: Mapping[tuple, Sequence]) -> Callable[[list, list], list[float]]:
        """PPO's reward function over this model: `contexts` maps each rollout prompt's token ids (a tuple) to
        its context messages. A rollout is scored as the reward model was trained: its text rendered after
        its context with the chat template (end of turn and all; PPO hands over the sampled ids without the
        stop token), normalised by the training scores' mean and std."""
        def reward_fn(prompt_ids_list, reply_ids_list) -> list[float]:
            chats = [(contexts[tuple(p)], tokenizer.decode(r, skip_special_tokens=True))
                     for p, r in zip(prompt_ids_list, reply_ids_list)]
            return self.normalise(self.score_chats(tokenizer, chats))

        return reward_fn


# --- the result and its folder -------------------------------------------------------------------------


@dataclass
class RewardResult:
    # A PeftModel around a private copy of the base model, LoRA trained; with `head` it is the reward model.
    model: torch.nn.Module
    head: torch.nn.Linear  # hidden_size -> 1, float32
    config: RewardConfig
    steps: list[dict] = field(default_factory=list)  # what on_step received, one dict per optimizer step
    train: dict = field(default_factory=dict)  # {'n', 'correct', 'accuracy', 'margin', 'loss'} after training
    held_out: dict = field(default_factory=dict)  # the same, plus 'accuracy_lo'/'accuracy_hi' (95% Wilson)
    mean: float = 0.0  # mean score of the training pairs' replies (chosen and rejected) after training
    std: float = 1.0  # their standard deviation
    usable: bool = False  # the held-out accuracy interval lies above chance
    trained: int = 0  # training pairs used
    skipped_too_long: int = 0  # training + held-out pairs over config.max_length
    seconds: float = 0.0

    def scorer(self) -> RewardScorer:
        """This reward model as a scorer, in memory (the same forward a loaded one runs)."""
        return RewardScorer(self.model, self.head, self.mean, self.std, self.usable, stats=self.stats())

    def stats(self) -> dict:
        """What reward_stats.json holds."""
        return {"format": REWARD_FORMAT, "mean": self.mean, "std": self.std, "usable": self.usable,
                "held_out": dict(self.held_out), "train": dict(self.train), "trained": self.trained,
                "skipped_too_long": self.skipped_too_long, "hidden_size": self.head.in_features}


def save_reward_model(result: RewardResult, folder: str | Path) -> Path:
    """Write the LoRA in PEFT's format (adapter_config.json + adapter_model.safetensors), the score head
    (score_head.safetensors: 'weight' [1, hidden], 'bias' [1]) and reward_stats.json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    result.model.save_pretrained(folder)
    head = {k: v.detach().float().cpu().contiguous() for k, v in result.head.state_dict().items()}
    save_file(head, str(folder / SCORE_HEAD_FILE))
    (folder / REWARD_STATS_FILE).write_text(json.dumps(result.stats(), indent=2, sort_keys=True, allow_nan=False))
    return folder


# --- the round --------------------------------------------------------------------------------------------


def _pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, config: RewardConfig, interval: bool = False
                  ) -> dict:
    """Loss, accuracy (chosen scored above rejected) and mean margin over pairs' scores."""
    n = chosen.shape[0]
    if n == 0:
        empty = {"n": 0, "correct": 0, "accuracy": None, "margin": None, "loss": None}
        return empty | ({"accuracy_lo": None, "accuracy_hi": None} if interval else {})
    correct = int((chosen > rejected).sum())
    metrics = {"n": n, "correct": correct, "accuracy": correct / n, "margin": (chosen - rejected).mean().item(),
               "loss": bradley_terry_loss(chosen, rejected, config.center_rewards_coefficient).mean().item()}
    if interval:
        metrics["accuracy_lo"], metrics["accuracy_hi"] = wilson(correct, n)
    return metrics


def _pair_scores(decoder, head, pad_id: int, pairs: Sequence[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    scores = torch.tensor(score_rows(decoder, head, pad_id, rows), dtype=torch.float64)
    return scores[: len(pairs)], scores[len(pairs):]


def train_reward(
    model: torch.nn.Module,
    pairs_train: Sequence[PreferencePair],
    pairs_eval: Sequence[PreferencePair],
    config: RewardConfig | None = None,
    init_dir: str | Path | None = None,
    on_step: Callable[[dict], None] | None = None,
) -> RewardResult:
    """Train a LoRA reward model with a score head on pairs_train; metrics on it and on pairs_eval after.

    model: a plain HF causal LM; it is copied, never modified. init_dir: a saved reward model to continue
    from (its LoRA rank and targets replace the config's lora_* fields). on_step gets a dict of metrics
    after every optimizer step. Raises ValueError with fewer than MIN_REWARD_PAIRS training pairs within
    max_length, and RewardAborted when training diverges.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    config = config or RewardConfig()
    started = time.perf_counter()
    if isinstance(model, PeftModel):
        raise TypeError("train_reward takes the base model; pass a previous reward model's folder as init_dir")
    fits = [p for p in pairs_train if p.length <= config.max_length]
    eval_fits = [p for p in pairs_eval if p.length <= config.max_length]
    skipped = len(pairs_train) - len(fits) + len(pairs_eval) - len(eval_fits)
    if len(fits) < MIN_REWARD_PAIRS:
        raise ValueError(
            f"a reward model needs at least {MIN_REWARD_PAIRS} training pairs within max_length="
            f"{config.max_length}; got {len(fits)} ({len(pairs_train) - len(fits)} of {len(pairs_train)} too long)"
        )
    device, dtype = device_dtype(model)
    pad_id = reward_pad_id(model)

    # 1. A private copy with LoRA and a head. Base-model dropout is off in the copy: a reply should get
    # the same score in training as when it is scored afterwards.
    base = copy.deepcopy(model)
    for module in base.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    hidden_size = base.config.hidden_size
    with seeded(config.seed, device):
        if init_dir is not None:
            policy = PeftModel.from_pretrained(base, str(init_dir), is_trainable=True)
            head = _read_head(Path(init_dir), hidden_size, device)
        else:
            lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                              target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")
            policy = get_peft_model(base, lora)
            head = _new_head(hidden_size, getattr(base.config, "initializer_range", 0.02), device)
    decoder = decoder_of(policy)
    # The bias's Bradley-Terry gradient is a sum of +g and -g terms that cancels only up to round-off, and
    # AdamW scales a 1e-9 gradient into a full learning-rate step: without the centring term (the only
    # loss that reaches it) the bias is frozen, so it stays where it started, as the loss says it should.
    head.bias.requires_grad_(bool(config.center_rewards_coefficient))
    trainable = [p for p in [*policy.parameters(), *head.parameters()] if p.requires_grad]

    # 2. The loop, on the LoRA layers' faster forward (and bf16 base products where those are fast).
    generator = torch.Generator().manual_seed(config.seed)
    lengths = [p.length for p in fits]
    batches_per_epoch = math.ceil(len(fits) / config.batch_size)
    total_steps = math.ceil(batches_per_epoch / config.grad_accum) * config.epochs
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps: list[dict] = []
    step = 0
    policy.train()
    with fast_lora(policy, matmul_dtype(config, device, dtype)), seeded(config.seed, device):
        for epoch in range(config.epochs):
            batches = length_batches(lengths, config.batch_size, generator)
            for first in range(0, len(batches), config.grad_accum):
                micro_batches = batches[first : first + config.grad_accum]
                n_pairs = sum(len(b) for b in micro_batches)
                lr = config.learning_rate * (1 - step / total_steps if config.lr_schedule == "linear" else 1.0)
                for param_group in optimizer.param_groups:
                    param_group["lr"] = lr
                sums = {"loss": 0.0, "correct": 0, "margin": 0.0}
                for index in micro_batches:
                    pairs = [fits[i] for i in index]
                    # Chosen rows then rejected rows, one forward: the prompt is encoded twice, which costs
                    # less than keeping two replies apart in one packed row would complicate.
                    rows = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids
                                                                           for p in pairs]
                    ids, mask = pad_rows(rows, pad_id, device)
                    scores = reward_scores(decoder, head, ids, mask)
                    chosen, rejected = scores[: len(pairs)], scores[len(pairs):]
                    losses = bradley_terry_loss(chosen, rejected, config.center_rewards_coefficient)
                    loss = losses.sum() / n_pairs  # the step's loss is the mean over all its pairs
                    if not torch.isfinite(loss):
                        raise RewardAborted(f"loss is {loss.item()}", step + 1, steps)
                    loss.backward()
                    sums["loss"] += loss.item()
                    sums["correct"] += int((chosen > rejected).sum())
                    sums["margin"] += (chosen - rejected).detach().sum().item()
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm).item()
                if not math.isfinite(grad_norm) or grad_norm > config.max_grad_norm_abort:
                    raise RewardAborted(
                        f"gradient norm {grad_norm:.4g} (abort threshold {config.max_grad_norm_abort:g})",
                        step + 1, steps,
                    )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                metrics = {
                    "step": step, "total_steps": total_steps, "epoch": epoch + 1, "loss": sums["loss"],
                    "accuracy": sums["correct"] / n_pairs, "margin": sums["margin"] / n_pairs,
                    "grad_norm": grad_norm, "learning_rate": lr, "pairs": n_pairs,
                    "elapsed_s": time.perf_counter() - started,
                }
                steps.append(metrics)
                if on_step is not None:
                    on_step(metrics)
    policy.eval()
    head.eval()

    # 3. Metrics and statistics, on PEFT's own forward in the weights' dtype: what a loaded scorer computes.
    train_chosen, train_rejected = _pair_scores(decoder, head, pad_id, fits)
    eval_chosen, eval_rejected = _pair_scores(decoder, head, pad_id, eval_fits)
    replies = torch.cat([train_chosen, train_rejected])
    mean, std = replies.mean().item(), replies.std(unbiased=False).item()
    if not (math.isfinite(mean) and math.isfinite(std)):
        raise RewardAborted(f"the trained model scores non-finite rewards (mean {mean}, std {std})", step, steps)
    held_out = _pair_metrics(eval_chosen, eval_rejected, config, interval=True)
    usable = held_out["n"] > 0 and held_out["accuracy_lo"] > CHANCE_ACCURACY
    return RewardResult(
        model=policy, head=head, config=config, steps=steps,
        train=_pair_metrics(train_chosen, train_rejected, config), held_out=held_out, mean=mean, std=std,
        usable=usable, trained=len(fits), skipped_too_long=skipped, seconds=time.perf_counter() - started,
    )


# --- loading a published reward model --------------------------------------------------------------------


def _read_stats(folder: Path) -> dict:
    try:
        stats = json.loads((folder / REWARD_STATS_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{folder.name}/{REWARD_STATS_FILE} is unreadable: {exc}") from exc
    if not isinstance(stats, dict) or stats.get("format") != REWARD_FORMAT:
        found = stats.get("format") if isinstance(stats, dict) else None
        raise AdapterError(f"{folder.name}/{REWARD_STATS_FILE} has format {found!r}; this code reads {REWARD_FORMAT}")
    for key in ("mean", "std"):
        value = stats.get(key)
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise AdapterError(f"{folder.name}/{REWARD_STATS_FILE} has {key} {value!r}, not a finite number")
    return stats


def load_reward_model(base_model, folder: str | Path, base_model_id: str) -> RewardScorer:
    """Verify a published reward model and return its scorer; raises AdapterError for a folder that is
    missing, half-written, corrupt, for another base model, or whose score of a probe is not finite.

    The LoRA goes onto a copy of base_model, unmerged: merging would round the update into the base
    weights' dtype (bf16 on a GPU), and the stored mean and std were measured on the unmerged forward.
    """
    from peft import PeftModel

    folder = Path(folder)
    manifest = check_files(folder, base_model_id, required=REWARD_REQUIRED_FILES)
    stats = _read_stats(folder)
    device, _ = device_dtype(base_model)
    try:
        model = PeftModel.from_pretrained(copy.deepcopy(base_model), str(folder))
        head = _read_head(folder, base_model.config.hidden_size, device)
    except AdapterError:
        raise
    except Exception as exc:  # peft and safetensors raise many kinds: size mismatch, bad config, bad bytes
        raise AdapterError(f"{folder.name} does not load onto this base model: {exc}") from exc
    scorer = RewardScorer(model, head, stats["mean"], stats["std"], bool(stats.get("usable")), name=folder.name,
                          manifest=manifest, stats=stats)
    vocab = base_model.config.vocab_size
    probe = [1 + i % (vocab - 1) for i in range(PROBE_TOKENS)]
    if not all(math.isfinite(s) for s in scorer.score([(probe[:-1], probe[-1:])])):
        raise AdapterError(f"{folder.name} scores a probe as non-finite")
    return scorer


def config_dict(config: RewardConfig) -> dict:
    """The config as plain JSON-able values (for provenance)."""
    values = asdict(config)
    values["target_modules"] = list(config.target_modules)
    return values
