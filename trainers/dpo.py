"""DPO on the votes: a LoRA adapter trained against a fixed reference policy, one round at a time.

    from trainers.dpo import DPOConfig, save_adapter, train_dpo
    result = train_dpo(loaded.model, pairs_train, pairs_eval, DPOConfig())
    save_adapter(result, "adapters/v3")  # adapter_config.json + adapter_model.safetensors

`PYTHONPATH=. python bench/dpo_vs_trl.py` times a round of 32 chat pairs against TRL's DPOTrainer.

Every forward scores pairs packed one per row: prompt, chosen, the prompt's last token again, rejected.
The rejected half is masked off the chosen half and its positions restart after the prompt, so the
prompt is encoded once for both replies and one forward scores both. Rows are bucketed by length, so
little of a batch is padding, and only reply positions go through the LM head (`trainers.logprobs`).

A round, in the order `train_dpo` runs it:
1. Copy the model and wrap the copy with LoRA (or load the previous round's adapter, trainable). The
   live chat keeps generating with the original while a round runs, so training never touches it; a
   copy of a 135M model is half a GB and a fraction of a second, and nothing needs unloading after.
2. Reference log-probs once per round, without grad: the base model with the adapter switched off
   (ref='base', pi_0 fixed across rounds as in iterative DPO), or the adapter as loaded at the start of
   the round (ref='previous'). The reference never changes during a round, so one pass is enough.
3. Held-out implicit-reward accuracy and margin, before training; the starting policy's log-probs of the
   training pairs the caller asks for (`score_start`: the round's staleness metrics).
4. The loop: AdamW on the LoRA weights, linear decay, gradient clipping. A NaN/inf loss or a gradient
   norm above `max_grad_norm_abort` raises TrainingAborted before that step touches the weights.
5. The same held-out metrics after training.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Collection, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from trainers.defaults import DEFAULT_EDIT_SFT_WEIGHT, DEFAULT_LABEL_SMOOTHING
from trainers.fastlora import fast_lora
from trainers.logprobs import segment_logprobs
from trainers.pairs import PreferencePair
from trainers.runtime import (ALL_LINEAR, MATMUL_DTYPES, MatmulDtype, device_dtype, matmul_dtype,
                              round_adapter_to_bf16, seeded)

LossType = Literal["sigmoid", "ipo"]
RefType = Literal["base", "previous"]
LOSS_TYPES = ("sigmoid", "ipo")
REF_TYPES = ("base", "previous")
LR_SCHEDULES = ("linear", "constant")
# Rows of a no-grad pass (reference, held-out metrics): no activations are kept, so bigger batches fit.
# With length-sorted rows bigger batches waste little padding.
SCORE_BATCH_PAIRS = 8
# Length bucketing sorts this many batches' worth of shuffled pairs by length before cutting batches:
# enough to keep padding low, few enough that batches still mix across epochs.
BUCKET_BATCHES = 4


class TrainingAborted(RuntimeError):
    """A round stopped because training diverged (NaN/inf loss, exploding gradient norm).

    The reward-model and PPO trainers raise subclasses, so a runner records every aborted round alike."""

    what, unit = "DPO round", "step"  # how the message names the round and its steps

    def __init__(self, reason: str, step: int, steps: list[dict] | None = None):
        super().__init__(f"{self.what} aborted at {self.unit} {step}: {reason}")
        self.reason = reason
        self.step = step
        self.steps = steps or []  # the metrics of the steps that did finish, to show what led up to it


@dataclass
class DPOConfig:
    """One DPO round. The defaults are set for ~32 chat pairs on SmolLM2-135M on a 2-core CPU: one pass of
    8 steps in well under a minute (bench/dpo_vs_trl.py), at a LoRA-sized learning rate."""

    beta: float = 0.1  # pull towards the reference: higher keeps the policy closer (for 'ipo' it is tau)
    loss: LossType = "sigmoid"  # 'sigmoid' = DPO, 'ipo' = IPO (squared, per-token normalised, as TRL 1.16)
    # Assumed chance that a vote is flipped (noisy clicks): the conservative-DPO (cDPO) form,
    # -(1-e) logsig(beta*d) - e logsig(-beta*d). 0 trusts every click. 'sigmoid' only: None (the default)
    # is DEFAULT_LABEL_SMOOTHING for 'sigmoid' and 0 for 'ipo', which has no such term.
    label_smoothing: float | None = None
    # Whether an edit's pairs (the person's own better reply against each sampled one) are smoothed too.
    # Label smoothing stands for clicks that went the wrong way; a reply someone typed is no click, so by
    # default its pairs are trusted (smoothing 0) while the round's votes keep label_smoothing.
    smooth_edits: bool = False
    # Weight of a supervised term on an edit's own text: its mean negative log-likelihood per token, added
    # to its two pairs' loss (TRL's "sft" loss next to "sigmoid", as in RPO, Pang et al. 2024; here on edits
    # only). A typed reply is a demonstration: DPO alone only makes it likelier *relative* to the samples,
    # and a reply the model would never write (a list, from a model that writes prose) can stay unlikely
    # while both fall. 0 adds nothing; the default is measured (trainers/defaults.py).
    edit_sft_weight: float = DEFAULT_EDIT_SFT_WEIGHT
    # LoRA wants a far larger step than full fine-tuning (TRL's 1e-6 default would not move a 32-pair round).
    learning_rate: float = 2e-4
    # Passes over the round's pairs. One. Two won the label-efficiency sweep's 2-round screen (concise
    # significant at 128 labels, KL 2.98, where one needed 192), but the loop does not stop there: in 4
    # rounds of 64 labels two epochs drifted to 7.2 nats after 192 labels and 12.0 after 256, ending
    # significantly below v0 (-0.048 [-0.088, -0.009]), while one epoch was +0.089 [+0.041, +0.140] at
    # 2.0 nats (docs/BENCHMARKS.md, the sweep's last subsection). Two also makes a round 1.5x as long.
    epochs: int = 1
    batch_size: int = 4  # pairs per forward: 4 rows of ~250 tokens already keep a CPU's matmuls busy
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # clip the LoRA gradient to this norm (the noise of a 4-pair batch is large)
    # A pre-clip gradient norm above this means divergence: abort the round. Healthy rounds on SmolLM2 see
    # 1-4, so 1e3 never fires by chance.
    max_grad_norm_abort: float = 1e3
    lr_schedule: Literal["linear", "constant"] = "linear"  # 'linear' decays to 0 at the last step (HF's default)
    weight_decay: float = 0.0  # AdamW weight decay on the LoRA weights
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scale is alpha / r
    lora_dropout: float = 0.0  # 0: policy and reference differ only by the adapter (TRL also disables dropout)
    target_modules: tuple[str, ...] = ALL_LINEAR  # module names LoRA wraps
    max_length: int = 1024  # pairs with prompt + longer reply above this many tokens are skipped (counted)
    seed: int = 0  # LoRA init, batch order and dropout
    # 'base': reference = the base model with the adapter disabled (pi_0 fixed across rounds, as iterative
    # DPO does); 'previous': the adapter the round starts from (init_adapter_dir), frozen.
    ref: RefType = "base"
    # The dtype of the frozen base model's matrix products (trainers/fastlora.py). 'bfloat16' rounds their
    # inputs to bf16 (float32 accumulation; LoRA, activations and optimizer stay float32): each product is
    # 2-3x faster on a CPU with AVX512-BF16. The reference is scored on the first epoch's own batches
    # (score_pairs), so the rounding is the same on both sides and step 1 is still exactly ln 2; it only
    # adds noise of bf16 size to the gradients, as any bf16 training does. 'auto' picks bf16 where it is
    # fast and the weights are float32, float32 elsewhere; 'float32' keeps every product exact.
    matmul_dtype: MatmulDtype = "auto"

    def __post_init__(self):
        if isinstance(self.target_modules, str):  # one name, not its characters
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        positive = {"beta": self.beta, "learning_rate": self.learning_rate, "max_grad_norm": self.max_grad_norm,
                    "max_grad_norm_abort": self.max_grad_norm_abort}
        for name, value in positive.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        counts = {"epochs": self.epochs, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                  "lora_r": self.lora_r, "lora_alpha": self.lora_alpha, "max_length": self.max_length}
        for name, value in counts.items():
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.loss not in LOSS_TYPES:
            raise ValueError(f"loss {self.loss!r} is not one of {LOSS_TYPES}")
        if self.ref not in REF_TYPES:
            raise ValueError(f"ref {self.ref!r} is not one of {REF_TYPES}")
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise ValueError(f"matmul_dtype {self.matmul_dtype!r} is not one of {MATMUL_DTYPES}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r} is not one of {LR_SCHEDULES}")
        if self.label_smoothing is None:
            self.label_smoothing = DEFAULT_LABEL_SMOOTHING if self.loss == "sigmoid" else 0.0
        # Finite: an infinite weight makes every edit's loss infinite, a round that can only fail.
        if not (isinstance(self.edit_sft_weight, (int, float)) and math.isfinite(self.edit_sft_weight)
                and self.edit_sft_weight >= 0):
            raise ValueError(f"edit_sft_weight must be a finite number, 0 or more, got {self.edit_sft_weight!r}")
        if not (isinstance(self.label_smoothing, (int, float)) and 0.0 <= self.label_smoothing < 0.5):
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")
        if self.loss == "ipo" and self.label_smoothing:
            raise ValueError(f"label_smoothing {self.label_smoothing!r} has no meaning for loss 'ipo'; use 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"target_modules must name at least one module, got {self.target_modules!r}")


def pair_label_smoothing(pairs: Sequence[PreferencePair], config: DPOConfig, device=None) -> float | torch.Tensor:
    """Each pair's assumed flip chance, for dpo_loss: config.label_smoothing for a vote's pair, 0 for an
    edit's unless config.smooth_edits. A plain float when every pair gets the same (no smoothing, IPO)."""
    smoothing = config.label_smoothing or 0.0
    if not smoothing or config.smooth_edits or all(p.source != "edit" for p in pairs):
        return smoothing
    return torch.tensor([0.0 if p.source == "edit" else smoothing for p in pairs], device=device)


def pair_sft_weight(pairs: Sequence[PreferencePair], config: DPOConfig, device=None) -> float | torch.Tensor:
    """Each pair's weight of the supervised term on its chosen reply, for dpo_loss: config.edit_sft_weight
    for an edit's pairs, 0 for a vote's. A plain 0.0 when no pair has one."""
    if not config.edit_sft_weight or all(p.source != "edit" for p in pairs):
        return 0.0
    return torch.tensor([config.edit_sft_weight if p.source == "edit" else 0.0 for p in pairs], device=device)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: LossType = "sigmoid",
    label_smoothing: float | torch.Tensor = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    sft_weight: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and implicit rewards, from summed reply log-probs: ([n], [n], [n]).

    'sigmoid' is TRL 1.16's formula; label_smoothing > 0 gives cDPO (TRL 1.16's 'sigmoid' ignores
    label_smoothing; its 'aot' loss on a single pair is this exact form): one value for every pair, or
    a [n] tensor of each pair's own (pair_label_smoothing). 'ipo' divides each reply's log
    ratio by its token count (chosen_lengths / rejected_lengths), exactly as TRL 1.16 does.
    sft_weight (one value, or a [n] tensor: pair_sft_weight) adds that many times the chosen reply's mean
    negative log-likelihood per token (policy_chosen_logps / chosen_lengths) to each pair's loss.
    Rewards are beta * (policy - reference) log-probs, detached.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        delta = beta * (chosen_logratios - rejected_logratios)
        losses = -F.logsigmoid(delta) * (1 - label_smoothing) - F.logsigmoid(-delta) * label_smoothing
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the 'ipo' loss needs chosen_lengths and rejected_lengths (reply token counts)")
        if torch.as_tensor(label_smoothing).any():
            raise ValueError(f"label_smoothing {label_smoothing!r} has no meaning for the 'ipo' loss")
        delta = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type {loss_type!r} is not one of {LOSS_TYPES}")
    if torch.as_tensor(sft_weight).any():
        if chosen_lengths is None:
            raise ValueError("a supervised term (sft_weight) needs chosen_lengths (reply token counts)")
        losses = losses - sft_weight * policy_chosen_logps / chosen_lengths.clamp(min=1)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


@dataclass
class DPOResult:
    # A PeftModel around a private copy of the base model, adapter trained: generate with it, or save the
    # adapter and drop it (it holds a full copy of the base weights).
    model: torch.nn.Module
    config: DPOConfig
    steps: list[dict] = field(default_factory=list)  # what on_step received, one dict per optimizer step
    eval_before: dict = field(default_factory=dict)  # held-out {'n', 'accuracy', 'margin', 'loss'}
    eval_after: dict = field(default_factory=dict)
    trained: int = 0  # training pairs used
    skipped_too_long: int = 0  # training + held-out pairs over config.max_length
    seconds: float = 0.0
    # Summed (chosen, rejected) log-probs under the policy the round started from, for the indices of
    # pairs_train that train_dpo's score_start named (and that fit max_length).
    start_logps: dict[int, tuple[float, float]] = field(default_factory=dict)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model)


def save_adapter(result: DPOResult, folder: str | Path) -> Path:
    """Write the adapter in PEFT's format (adapter_config.json + adapter_model.safetensors)."""
    folder = Path(folder)
    result.model.save_pretrained(folder)
    return folder


# --- packing: one row per pair --------------------------------------------------------------------------


@dataclass
class PackedRows:
    """Pairs packed one per row: prompt, chosen, the prompt's last token again, rejected, padding."""

    input_ids: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L]: the rejected half restarts after the prompt
    attention_mask: torch.Tensor  # [B, 1, L, L] additive: causal, and the rejected half never sees the chosen
    target_mask: torch.Tensor  # [B, L]: the reply tokens that are scored
    segment_ids: torch.Tensor  # [B, L]: 2b for row b's chosen tokens, 2b + 1 for its rejected tokens
    chosen_lengths: torch.Tensor  # [B]
    rejected_lengths: torch.Tensor  # [B]


def pack_pairs(pairs: Sequence[PreferencePair], pad_id: int, device, dtype: torch.dtype) -> PackedRows:
    """The rejected reply is predicted from a copy of the prompt's last token (same token, same position,
    same visible context as the original), so 'position t-1 predicts token t' holds for both replies."""
    PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3
    width = max(len(p.prompt_ids) + len(p.chosen_ids) + 1 + len(p.rejected_ids) for p in pairs)
    n = len(pairs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    block = torch.full((n, width), PAD, dtype=torch.long)
    segment = torch.zeros((n, width), dtype=torch.long)
    target = torch.zeros((n, width), dtype=torch.bool)
    last_prompt = torch.zeros(n, dtype=torch.long)
    for b, pair in enumerate(pairs):
        p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        row = list(pair.prompt_ids) + list(pair.chosen_ids) + [pair.prompt_ids[-1]] + list(pair.rejected_ids)
        ids[b, : len(row)] = torch.tensor(row)
        pos[b, : p + c] = torch.arange(p + c)
        pos[b, p + c : len(row)] = torch.arange(p - 1, p + r)
        block[b, :p], block[b, p : p + c], block[b, p + c : len(row)] = PROMPT, CHOSEN, REJECTED
        segment[b, p : p + c] = 2 * b
        segment[b, p + c + 1 : len(row)] = 2 * b + 1
        target[b, p : p + c] = target[b, p + c + 1 : len(row)] = True
        last_prompt[b] = p - 1
    index = torch.arange(width)
    query, key = block[:, :, None], block[:, None, :]
    allowed = index[None, None, :] <= index[None, :, None]  # causal
    # The rejected half sees the prompt minus its last token (the copy stands in for it), never the chosen.
    hidden_from_rejected = (key == CHOSEN) | (index[None, None, :] == last_prompt[:, None, None])
    allowed = allowed & ~((query == REJECTED) & hidden_from_rejected)
    # Padding is invisible to real tokens; a padding query sees itself, so no softmax row is empty (NaN).
    allowed = allowed & ((key != PAD) | torch.eye(width, dtype=torch.bool)[None])
    mask = torch.zeros((n, 1, width, width), dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    lengths = torch.tensor([[len(p.chosen_ids), len(p.rejected_ids)] for p in pairs], dtype=torch.float32)
    return PackedRows(
        input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=mask.to(device),
        target_mask=target.to(device), segment_ids=segment.to(device), chosen_lengths=lengths[:, 0].to(device),
        rejected_lengths=lengths[:, 1].to(device),
    )


def pair_logps(model, rows: PackedRows) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's chosen and rejected reply: ([B], [B])."""
    n = rows.input_ids.shape[0]
    sums = segment_logprobs(model, rows.input_ids, rows.target_mask, rows.segment_ids, 2 * n,
                            rows.attention_mask, rows.position_ids)
    return sums[0::2], sums[1::2]


def length_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffled pairs, sorted by length within buckets of BUCKET_BATCHES batches, batches in random order."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    bucket = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), bucket):
        chunk = sorted(order[start : start + bucket], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


@torch.no_grad()
def score_pairs(model, pairs: Sequence[PreferencePair], pad_id: int, batch_pairs: int = SCORE_BATCH_PAIRS,
                batches: Sequence[Sequence[int]] | None = None):
    """Summed chosen and rejected log-probs of every pair, in the order given: ([n], [n]).

    batches: the pair indices of each forward (every pair once). By default pairs go length-sorted,
    batch_pairs at a time. The round scores its reference on the first epoch's own training batches:
    the same rows, padding and matrix shapes as the step that uses them, so the policy's first forward
    reproduces the reference bit for bit and step 1 is exactly ln 2 even with bf16 products.
    """
    device, dtype = device_dtype(model)
    chosen = torch.zeros(len(pairs), device=device)
    rejected = torch.zeros(len(pairs), device=device)
    if batches is None:
        order = sorted(range(len(pairs)), key=lambda i: _row_length(pairs[i]))  # length-sorted: little padding
        batches = [order[start : start + batch_pairs] for start in range(0, len(order), batch_pairs)]
    if sorted(i for index in batches for i in index) != list(range(len(pairs))):
        raise ValueError(f"batches must hold each of the {len(pairs)} pair indices exactly once")
    for index in batches:
        index = list(index)
        c, r = pair_logps(model, pack_pairs([pairs[i] for i in index], pad_id, device, dtype))
        chosen[index], rejected[index] = c, r
    return chosen, rejected


def _row_length(pair: PreferencePair) -> int:
    return len(pair.prompt_ids) + len(pair.chosen_ids) + 1 + len(pair.rejected_ids)


def _held_out(logps, ref_logps, pairs, config: DPOConfig) -> dict:
    """Implicit-reward accuracy (margin > 0), mean margin and loss over held-out pairs."""
    if not pairs:
        return {"n": 0, "accuracy": None, "margin": None, "loss": None}
    device = logps[0].device
    lengths = torch.tensor([[len(p.chosen_ids), len(p.rejected_ids)] for p in pairs], device=device)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        *logps, *ref_logps, config.beta, config.loss, pair_label_smoothing(pairs, config, device),
        lengths[:, 0], lengths[:, 1], pair_sft_weight(pairs, config, device),
    )
    margins = chosen_rewards - rejected_rewards
    return {"n": len(pairs), "accuracy": (margins > 0).float().mean().item(), "margin": margins.mean().item(),
            "loss": losses.mean().item()}


def _pad_id(model) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(model.config, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0  # padding is masked out and never scored: any valid id will do


# --- the round --------------------------------------------------------------------------------------------


def train_dpo(
    model: torch.nn.Module,
    pairs_train: Sequence[PreferencePair],
    pairs_eval: Sequence[PreferencePair],
    config: DPOConfig | None = None,
    init_adapter_dir: str | Path | None = None,
    on_step: Callable[[dict], None] | None = None,
    score_start: Collection[int] = (),
) -> DPOResult:
    """Train a LoRA adapter with DPO on pairs_train; held-out metrics on pairs_eval before and after.

    model: a plain HF causal LM; it is copied, never modified. init_adapter_dir: a saved adapter to
    continue from (warm start; its rank and targets replace the config's lora_* fields). on_step gets a
    dict of metrics after every optimizer step. score_start: indices of pairs_train whose summed reply
    log-probs under the starting policy (the initial adapter, or the base model for a fresh one) come
    back in `DPOResult.start_logps` (the staleness metrics compare them with the sampler's): where the
    starting policy is the reference they are the reference pass's own numbers, otherwise one no-grad pass
    over just those pairs. Raises TrainingAborted when training diverges.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    config = config or DPOConfig()
    started = time.perf_counter()
    if isinstance(model, PeftModel):
        raise TypeError("train_dpo takes the base model; pass a previous adapter's folder as init_adapter_dir")
    attention = getattr(model.config, "_attn_implementation", "sdpa")
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"packed DPO rows need a 4D attention mask: use 'sdpa' or 'eager', not {attention!r}")
    fit_index = [i for i, p in enumerate(pairs_train) if p.length <= config.max_length]
    fits = [pairs_train[i] for i in fit_index]
    eval_fits = [p for p in pairs_eval if p.length <= config.max_length]
    skipped = len(pairs_train) - len(fits) + len(pairs_eval) - len(eval_fits)
    if not fits:
        raise ValueError(f"none of the {len(pairs_train)} training pairs fits max_length={config.max_length}")
    device, dtype = device_dtype(model)
    pad_id = _pad_id(model)

    # 1. A private copy with the adapter. Base-model dropout is switched off in the copy: with it the policy
    # and the reference would disagree by noise before any step.
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
    policy.eval()
    trainable = [p for p in policy.parameters() if p.requires_grad]

    # The round runs with the LoRA layers' faster forward (and bf16 base products where those are fast);
    # the returned model is back on PEFT's own forward.
    with fast_lora(policy, matmul_dtype(config, device, dtype)):
        # Every epoch's batches are drawn up front, so the reference can be scored on the first epoch's.
        generator = torch.Generator().manual_seed(config.seed)
        lengths = [_row_length(p) for p in fits]
        epoch_batches = [length_batches(lengths, config.batch_size, generator) for _ in range(config.epochs)]

        # 2. Reference log-probs, once. A fresh adapter starts as the identity (LoRA B = 0), and with
        # ref='previous' the reference is the adapter as loaded: in both cases the policy before the first step
        # is the reference, so its held-out log-probs come from the same pass.
        reference = policy.disable_adapter() if config.ref == "base" else nullcontext()
        with reference:
            ref_train = score_pairs(policy, fits, pad_id, batches=epoch_batches[0])
            ref_eval = score_pairs(policy, eval_fits, pad_id)
        policy_is_ref = config.ref == "previous" or init_adapter_dir is None
        eval_before = _held_out(ref_eval if policy_is_ref else score_pairs(policy, eval_fits, pad_id), ref_eval,
                                eval_fits, config)  # 3.
        wanted = set(score_start)
        start_at = [k for k, i in enumerate(fit_index) if i in wanted]  # positions in fits
        if policy_is_ref or not start_at:
            start_c, start_r = ref_train[0][start_at], ref_train[1][start_at]
        else:
            start_c, start_r = score_pairs(policy, [fits[k] for k in start_at], pad_id)
        start_logps = {fit_index[k]: (c, r) for k, c, r in zip(start_at, start_c.tolist(), start_r.tolist())}

        # 4. The loop.
        batches_per_epoch = math.ceil(len(fits) / config.batch_size)
        steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
        total_steps = steps_per_epoch * config.epochs
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        steps: list[dict] = []
        step = 0
        policy.train()
        with seeded(config.seed, device):  # LoRA dropout draws from the global generator
            for epoch, batches in enumerate(epoch_batches):
                for first in range(0, len(batches), config.grad_accum):
                    micro_batches = batches[first : first + config.grad_accum]
                    n_pairs = sum(len(b) for b in micro_batches)
                    lr = config.learning_rate * (1 - step / total_steps if config.lr_schedule == "linear" else 1.0)
                    for param_group in optimizer.param_groups:
                        param_group["lr"] = lr
                    sums = {k: 0.0 for k in ("loss", "chosen", "rejected", "correct", "logps_c", "logps_r")}
                    for index in micro_batches:
                        batch = [fits[i] for i in index]
                        rows = pack_pairs(batch, pad_id, device, dtype)
                        chosen, rejected = pair_logps(policy, rows)
                        losses, chosen_rewards, rejected_rewards = dpo_loss(
                            chosen, rejected, ref_train[0][index], ref_train[1][index], config.beta, config.loss,
                            pair_label_smoothing(batch, config, device), rows.chosen_lengths, rows.rejected_lengths,
                            pair_sft_weight(batch, config, device),
                        )
                        loss = losses.sum() / n_pairs  # the step's loss is the mean over all its pairs
                        if not torch.isfinite(loss):
                            raise TrainingAborted(f"loss is {loss.item()}", step + 1, steps)
                        loss.backward()
                        sums["loss"] += loss.item()
                        sums["chosen"] += chosen_rewards.sum().item()
                        sums["rejected"] += rejected_rewards.sum().item()
                        sums["correct"] += (chosen_rewards > rejected_rewards).sum().item()
                        sums["logps_c"] += chosen.detach().sum().item()
                        sums["logps_r"] += rejected.detach().sum().item()
                    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm).item()
                    if not math.isfinite(grad_norm) or grad_norm > config.max_grad_norm_abort:
                        raise TrainingAborted(
                            f"gradient norm {grad_norm:.4g} (abort threshold {config.max_grad_norm_abort:g})",
                            step + 1, steps,
                        )
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    metrics = {
                        "step": step, "total_steps": total_steps, "epoch": epoch + 1, "loss": sums["loss"],
                        "rewards/chosen": sums["chosen"] / n_pairs, "rewards/rejected": sums["rejected"] / n_pairs,
                        "rewards/margins": (sums["chosen"] - sums["rejected"]) / n_pairs,
                        "rewards/accuracies": sums["correct"] / n_pairs,
                        "logps/chosen": sums["logps_c"] / n_pairs, "logps/rejected": sums["logps_r"] / n_pairs,
                        "grad_norm": grad_norm, "learning_rate": lr, "pairs": n_pairs,
                        "elapsed_s": time.perf_counter() - started,
                    }
                    steps.append(metrics)
                    if on_step is not None:
                        on_step(metrics)
        policy.eval()
        round_adapter_to_bf16(policy)  # what ships (and is scored below) is what the engine keeps exactly

        # 5. Held-out metrics after training, against the same reference.
        eval_after = _held_out(score_pairs(policy, eval_fits, pad_id), ref_eval, eval_fits, config)
        return DPOResult(
            model=policy, config=config, steps=steps, eval_before=eval_before, eval_after=eval_after,
            trained=len(fits), skipped_too_long=skipped, seconds=time.perf_counter() - started,
            start_logps=start_logps,
        )


def config_dict(config: DPOConfig) -> dict:
    """The config as plain JSON-able values (for provenance and the bench's output)."""
    values = asdict(config)
    values["target_modules"] = list(config.target_modules)
    return values
