"""A lean decode engine for Llama-family causal LMs: the HF forward's logits, with less work per token.

Decoding a pair of replies on a CPU is bound by reading the weights once per step, yet the HF forward
spends a third of each step in Python, small ops and a matmul kernel that reads the weights slowly.
The engine keeps its own copy of the weights (a snapshot: later changes to the HF model are not seen)
in the layout its step wants:

- q/k/v are one matrix and gate/up another, so a layer is four matmuls;
- the rows of the q and k weights are permuted inside each head so that the two dims HF's
  `rotate_half` pairs (i and i + head_dim/2) sit side by side: RoPE is then one complex multiply, and
  attention scores, q.k, are unchanged by a permutation applied to both; the 1/sqrt(head_dim) scale is
  folded into the q weights;
- the KV cache is preallocated for the whole reply, one tensor for all layers (no concatenation);
- the logits are computed for the last position only.

Two backends run the decode step:

- `native` (CPU, float32, x86-64 with AVX-512, a C compiler at hand): the whole step is one call into
  a small C library (native.c in this package, compiled once with `cc -O3 -march=native -fopenmp`
  into ~/.cache/rlhf-playground/native/ and reused, ~1 s; see native.py). The weights live in one
  arena backed by transparent huge pages, each matrix packed in blocks of 8 rows x 16 columns so each
  thread streams memory linearly: this reads the weights at ~90% of `x.sum()`'s bandwidth, where MKL manages 50-70%
  with 2 rows. RoPE, the cache writes and SwiGLU run in the matmuls' epilogues, so a layer is five
  phases, separated by barriers that yield the core when the partner thread is descheduled.
  It also provides `native_sampling_probs` (softmax, temperature and top-p for sample_pair).
- `torch` (everything else: CUDA, bfloat16, other CPUs, or `PLAYGROUND_NATIVE=0`): eager ops, with
  `(W @ x.T).T` for CPU matmuls of a few rows (see fastlinear).

Prefill runs in torch ops, its matmuls on the packed weights up to NATIVE_PREFILL_MAX_ROWS prompt
tokens (MKL on an unpacked copy past that). Both backends agree with the HF forward to ~1e-5 in
float32 (relative to logits of ~30, ~1e-4 absolute on SmolLM2); tests/test_engine.py checks every step.

Usage (rows share one prompt, e.g. the two replies of a pair):

    engine = Engine.from_model(model)
    state, logits = engine.prefill(prompt_ids, rows=2, max_total_len=len(prompt_ids) + max_new)
    logits = engine.decode(state, next_tokens)   # next_tokens: LongTensor [rows]; logits: [rows, V]

Several requests, each at its own position, in one step that reads the weights once for all rows
(continuous batching; native: each request's logits bit-identical to decoding it alone):

    logits = engine.decode_many([state_a, state_b], torch.cat([tokens_a, tokens_b]))

Versions trained as LoRA adapters share one engine (the Punica / S-LoRA idea): `add_adapter` stores an
adapter in the engine's own layout (~3% of the weights at rank 16 on SmolLM2), and each state names its
adapter, so one step reads the base weights once for rows of different versions and adds each row's
low-rank update `B (A x)` to every matrix it targets (native: in the matmuls' epilogues):

    engine.add_adapter("v3", *read_adapter(folder))       # or engine.add_adapter("v3", peft_model)
    state, logits = engine.prefill(prompt_ids, rows=2, max_total_len=n, adapter="v3")
    logits = engine.decode_many([state_v3, state_base], tokens)   # each state keeps its prefill's adapter

The logits at every position of a given sequence (teacher forcing, no cache kept; what a KL between
two versions along one reply needs), rows from `start` on, with prefill's math:

    logits = engine.score(prompt_ids + reply_ids, adapter="v3", start=len(prompt_ids) - 1)  # [len(reply) + 1, V]
    per_reply = engine.score_branches(prompt_ids, [reply_a, reply_b], adapter="v3")  # the prompt once, for both

`supports(model)` says whether the engine reproduces a model exactly; callers fall back to the HF
forward when it is False. An `Engine`'s weights are read-only once built, so threads may decode
different states with it at the same time (each `DecodeState` belongs to one caller; a decode_many call
needs all its states to itself). Adapters may be added and removed meanwhile: a step looks its adapters
up once, at its start, and holds them to its end.
"""

from __future__ import annotations

import ctypes
import re
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from playground.serving.engine import native as _native
from playground.serving.engine.native import (  # noqa: F401 - re-exported: callers import them from here
    NATIVE_CACHE_ENV,
    NATIVE_ENV,
    NATIVE_SOURCE_PATH,
    SAMPLING_THREADS,
    _cpu_flags,
    _Desc,
    _Lora,
    native_library,
    native_sampling_probs,
)

# Model classes whose forward the engine reproduces, given the config checks in `supports`.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
SUPPORTED_DEVICES = ("cpu", "cuda")
# With this many rows or fewer (and at least two), a CPU matmul in torch is written `(W @ x.T).T`.
SKINNY_MIN_ROWS = 2
SKINNY_MAX_ROWS = 64
# Prefill matmuls of up to this many rows run on the packed weights (native backend); longer prompts
# unpack each matrix for MKL. Measured here (SmolLM2-135M, 2 cores): a 46-token prompt prefills in
# 99 ms packed against 147 ms unpacked (HF: 155 ms); they cross over between 300 and 600 tokens.
NATIVE_PREFILL_MAX_ROWS = 384
BLOCK_ROWS, BLOCK_COLS = 8, 16  # the packed layout; must match NB and LANES in native.c

# LoRA: the fused matrices in native.c's LORA_* order, and where each HF module goes in them (its
# segment: which rank-sized slice of t = A x its rows of B multiply).
LORA_FUSED = ("qkv", "o", "gate_up", "down")
LORA_MODULES = {"q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o", 0),
                "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", 0)}
LORA_SEGMENTS = {"qkv": 3, "o": 1, "gate_up": 2, "down": 1}
# LoraConfig fields that change the forward beyond `x + scaling * B A x` on the modules above (or that
# this code does not read): an adapter with any of them set is refused, and the caller merges instead.
LORA_UNSUPPORTED_FIELDS = ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform",
                           "layers_pattern", "modules_to_save", "fan_in_fan_out", "lora_bias", "layer_replication",
                           "trainable_token_indices", "target_parameters", "alora_invocation_tokens", "use_qalora",
                           "velora_config", "monteclora_config", "use_bdlora", "arrow_config", "kasa_config",
                           "megatron_config")
# A PEFT state-dict key: ...layers.<i>.<self_attn|mlp>.<module>.lora_<A|B>[.<adapter name>].weight
_LORA_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(" + "|".join(LORA_MODULES)
                       + r")\.lora_([AB])(?:\.[^.]+)?\.weight$")


def __getattr__(name: str):
    # These read through to native.py at each access: the reason is only known after the first
    # native_library() call, so a copy bound here at import would stay None.
    if name == "_native_error":
        return _native.unavailable_reason()
    if name == "NATIVE_SOURCE":  # the C source used to be a string here
        return _native.native_source()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _rope_type(config) -> str | None:
    """'default' for plain RoPE; None for anything else (scaled, partial, per layer type)."""
    params = getattr(config, "rope_parameters", None)
    scaling = getattr(config, "rope_scaling", None)
    if float(getattr(config, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        return None
    if isinstance(params, dict) and params:
        if any(isinstance(v, dict) for v in params.values()):
            return None
        if float(params.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
            return None
        return params.get("rope_type", params.get("type", "default"))
    if isinstance(scaling, dict) and scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        return "default" if kind == "default" else None
    return "default"


def supports(model) -> bool:
    """True when `Engine` reproduces this model's forward exactly (else use the HF forward)."""
    name = type(model).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        return False  # also refuses wrappers (a PeftModel), whose adapters the engine would miss
    config = getattr(model, "config", None)
    try:
        params = list(model.parameters())
        device = params[0].device
        if device.type not in SUPPORTED_DEVICES or any(p.device != device for p in params):
            return False
        if any(p.dtype not in (torch.float32, torch.float16, torch.bfloat16) for p in params):
            return False  # quantized or mixed weights
        if getattr(model, "hf_quantizer", None) is not None or getattr(config, "quantization_config", None):
            return False
        if getattr(config, "hidden_act", None) not in ("silu", "swish"):
            return False
        if _rope_type(config) != "default" or int(getattr(config, "pretraining_tp", 1) or 1) != 1:
            return False
        inner = model.model
        if float(getattr(inner.rotary_emb, "attention_scaling", 1.0)) != 1.0:
            return False
        hidden, heads = config.hidden_size, config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        if head_dim % 2 or heads % kv_heads:
            return False
        # Sliding-window attention is not implemented: only configs that never use it.
        if name == "MistralForCausalLM" and getattr(config, "sliding_window", None) is not None:
            return False
        if name == "Qwen2ForCausalLM" and getattr(config, "use_sliding_window", False):
            return False
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            return False
        if len(inner.layers) != config.num_hidden_layers:
            return False
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                if not type(norm).__name__.endswith("RMSNorm") or not hasattr(norm, "variance_epsilon"):
                    return False
            if getattr(attn, "sliding_window", None) is not None:
                return False
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                        mlp.down_proj):
                if type(lin) is not torch.nn.Linear:
                    return False  # LoRA layers, quantized linears, ...
            if len({attn.q_proj.bias is None, attn.k_proj.bias is None, attn.v_proj.bias is None}) != 1:
                return False
            if (mlp.gate_proj.bias is None) != (mlp.up_proj.bias is None):
                return False
        if not type(inner.norm).__name__.endswith("RMSNorm"):
            return False
        if type(model.lm_head) is not torch.nn.Linear or model.lm_head.bias is not None:
            return False
        if type(inner.embed_tokens) is not torch.nn.Embedding:
            return False
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "logits_scaling", None):
            return False
    except (AttributeError, IndexError, TypeError, ValueError):
        return False
    return True


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, in] @ w [out, in].T (+ b): the skinny form on a CPU for a few rows (see fastlinear)."""
    rows = x.shape[0]
    if SKINNY_MIN_ROWS <= rows <= SKINNY_MAX_ROWS and x.device.type == "cpu":
        # x must be contiguous: MKL reads w at a third of the speed when x.T is the contiguous one.
        y = torch.mm(w, x.contiguous().T).T
        return y if b is None else y + b
    return F.linear(x, w, b)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As HF's LlamaRMSNorm (in float32, then back); F.rms_norm takes twice as long for 2 rows here.
    if x.dtype == torch.float32:
        return weight * (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps))
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope_permutation(heads: int, head_dim: int) -> torch.Tensor:
    """Row order that puts dims i and i + head_dim/2 of every head side by side (a complex pair)."""
    half = head_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).reshape(-1)
    return (torch.arange(heads)[:, None] * head_dim + within[None, :]).reshape(-1)


def _apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., head_dim] (dims in pair order) by the complex angles `rope` [..., head_dim / 2]."""
    if x.dtype == torch.float32:
        return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rope).flatten(-2)
    # No complex bfloat16: rotate in float32 and round once.
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rope).flatten(-2).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Packed weights (the layout native.c reads)


def _huge_page_arena(numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, view): a CPU view of `numel` elements, 2 MiB aligned, advised to use huge pages.

    Streaming 0.5 GB per step through 4 KiB pages costs a TLB miss every 4 KiB; huge pages read about
    10% faster here. The advice comes before the first write, so the pages are faulted in huge.
    """
    size = torch.empty(0, dtype=dtype).element_size()
    align = (2 << 20) // size
    buffer = torch.empty(numel + align, dtype=dtype)
    start = (-buffer.data_ptr() // size) % align
    view = buffer[start:start + numel]
    try:  # harmless where unsupported (the advice is only advice)
        libc = ctypes.CDLL(None, use_errno=True)
        length = (numel * size + (2 << 20) - 1) // (2 << 20) * (2 << 20)
        libc.madvise(ctypes.c_void_p(view.data_ptr()), ctypes.c_size_t(length), 14)  # MADV_HUGEPAGE
    except (OSError, AttributeError):
        pass
    return buffer, view


def _packed_numel(n: int, k: int) -> int:
    return -(-n // BLOCK_ROWS) * BLOCK_ROWS * k


def _pack_into(dest: torch.Tensor, w: torch.Tensor) -> None:
    """Write w [N, K] into dest as blocks [N/8][K/16][8][16] (N padded with zero rows)."""
    n, k = w.shape
    n_pad = -(-n // BLOCK_ROWS) * BLOCK_ROWS
    blocks = dest.view(n_pad // BLOCK_ROWS, k // BLOCK_COLS, BLOCK_ROWS, BLOCK_COLS)
    if n_pad != n:
        blocks.zero_()
    full = n // BLOCK_ROWS * BLOCK_ROWS
    blocks[: full // BLOCK_ROWS].copy_(
        w[:full].reshape(full // BLOCK_ROWS, BLOCK_ROWS, k // BLOCK_COLS, BLOCK_COLS).transpose(1, 2))
    for row in range(full, n):
        blocks[row // BLOCK_ROWS, :, row % BLOCK_ROWS, :] = w[row].reshape(k // BLOCK_COLS, BLOCK_COLS)


def _interleave_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Rows (or bias entries) 4 gate, 4 up, 4 gate, ...: each packed block of 8 rows is one SwiGLU group."""
    inter = gate.shape[0]
    rest = gate.shape[1:]
    return torch.stack([gate.reshape(inter // 4, 4, *rest), up.reshape(inter // 4, 4, *rest)], dim=1).reshape(
        2 * inter, *rest)


def _unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The row-major [N, K] copy of a packed matrix."""
    n_pad = packed.numel() // k
    blocks = packed.view(n_pad // BLOCK_ROWS, k // BLOCK_COLS, BLOCK_ROWS, BLOCK_COLS)
    return blocks.transpose(1, 2).reshape(n_pad, k)[:n]


# --------------------------------------------------------------------------------------------------
# The engine


@dataclass
class Layer:
    """One decoder layer. The matrices are row-major [N, K] views, or flat packed views (native)."""

    qkv: torch.Tensor  # [(heads + 2 kv_heads) * head_dim, hidden], q and k rows in RoPE pair order
    o: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor
    b_qkv: torch.Tensor | None
    b_o: torch.Tensor | None
    b_gate_up: torch.Tensor | None
    b_down: torch.Tensor | None
    norm_attn: torch.Tensor
    norm_mlp: torch.Tensor


@dataclass
class DecodeState:
    """The KV cache of `rows` sequences that share a prompt, and how many positions are filled."""

    keys: torch.Tensor  # [layers, rows, kv_heads, max_total_len, head_dim]
    values: torch.Tensor
    rows: int
    length: int  # positions filled so far (the next token goes at this position)
    max_total_len: int
    # The engine whose new_state made it: a cache of another model's shape, fed to this one, would be
    # read out of bounds by the native step (and is nonsense to any backend).
    owner: Engine | None = field(default=None, repr=False, compare=False)
    # The LoRA adapter its prefill ran with (None: the base model); decode_many uses it unless told otherwise.
    adapter: str | None = None
    reused: int = 0  # prompt positions its prefill copied from a kept prefix instead of computing


@dataclass
class KVPrefix:
    """The keys and values one row of a finished request computed for `tokens` (its prompt and reply), kept
    so that a later prompt starting with them (the conversation's next turn) prefills only what is new.
    Valid only for the engine and the adapter that computed them."""

    tokens: tuple[int, ...]
    keys: torch.Tensor  # [layers, kv_heads, len(tokens), head_dim]
    values: torch.Tensor
    adapter: str | None
    # A weak reference: a kept prefix must not keep a replaced engine (a copy of the weights) alive.
    owner_ref: object = field(default=None, repr=False, compare=False)

    @property
    def owner(self) -> Engine | None:
        return None if self.owner_ref is None else self.owner_ref()

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def shared(self, prompt_ids: list[int]) -> int:
        """How many leading tokens of prompt_ids these keys and values are for."""
        n = 0
        for a, b in zip(self.tokens, prompt_ids):
            if a != b:
                break
            n += 1
        return n


class AdapterUnsupported(ValueError):
    """The adapter is not a plain LoRA on the engine's matrices: serve it merged into a copy instead."""


@dataclass
class LoraAdapter:
    """One adapter in the engine's layout: per layer, per fused matrix (LORA_FUSED) a pair (A, B) or None.

    A [segments * rank, K] stacks the A of each module fused in that matrix (zeros for one the adapter
    leaves alone); B [N, rank] holds each output row's B row, in the engine's row order for that matrix
    (q and k permuted for RoPE, gate/up interleaved when packed). Row n's update is
    B[n] . t[segment(n) * rank:][:rank] with t = A x times the segment's scale: the LoRA scaling, and for
    q also the 1/sqrt(head_dim) that the engine's q rows carry. A and B keep the adapter's own values (no
    scale folded in), so an adapter whose values are bfloat16 (what the trainers save) is stored as
    bfloat16 exactly, at half the memory of float32; any other is stored in the engine's dtype.
    """

    name: str
    rank: int
    scaling: float
    q_scale: float  # scaling / sqrt(head_dim): the q segment's scale
    targets: frozenset[str]
    mats: list[list[tuple[torch.Tensor, torch.Tensor] | None]]
    _table: torch.Tensor | None = field(default=None, repr=False)  # native: the pointers of mats
    _struct: _Lora | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.mats for pair in layer if pair for t in pair)


def _bf16_exact(found: dict) -> bool:
    """Whether every A and B of a state dict's (float32) tensors is a bfloat16 value, so storing them as
    bfloat16 changes nothing."""
    return all(torch.equal(t, t.to(torch.bfloat16).to(t.dtype)) for pair in found.values() for t in pair)


def _config_field(config, name: str, default=None):
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def _check_lora_config(config) -> tuple[int, float, frozenset[str]]:
    """(rank, scaling, target modules) of a LoraConfig (or its dict) the engine runs; else AdapterUnsupported."""
    peft_type = _config_field(config, "peft_type")
    peft_type = getattr(peft_type, "value", peft_type)
    if peft_type != "LORA":
        raise AdapterUnsupported(f"the engine runs LoRA adapters only, not peft_type={peft_type!r}")
    bias = _config_field(config, "bias", "none")
    if bias != "none":
        raise AdapterUnsupported(f"bias={bias!r}: the engine runs LoRA with bias='none' only")
    set_fields = [f"{name}={_config_field(config, name)!r}" for name in LORA_UNSUPPORTED_FIELDS
                  if _config_field(config, name)]
    if set_fields:
        raise AdapterUnsupported(f"the engine runs plain LoRA (scaling alpha / r); this adapter sets "
                                 f"{', '.join(set_fields)}")
    targets = _config_field(config, "target_modules")
    if isinstance(targets, str) or not targets:
        raise AdapterUnsupported(f"target_modules={targets!r}: the engine needs the module names "
                                 f"(a subset of {sorted(LORA_MODULES)})")
    targets = frozenset(targets)
    if not targets <= LORA_MODULES.keys():
        raise AdapterUnsupported(f"target_modules {sorted(targets - LORA_MODULES.keys())} are not among the "
                                 f"engine's {sorted(LORA_MODULES)}")
    rank, alpha = _config_field(config, "r"), _config_field(config, "lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise AdapterUnsupported(f"r={rank!r}, lora_alpha={alpha!r}: need an integer rank >= 1 and a number")
    return rank, alpha / rank, targets


def read_adapter(folder) -> tuple[dict[str, torch.Tensor], object]:
    """(state dict, config) of a saved PEFT adapter folder, what `Engine.add_adapter` takes."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    return load_peft_weights(str(folder), device="cpu"), PeftConfig.from_pretrained(str(folder))


def _write_matrix(dest: torch.Tensor, parts: list[torch.Tensor], k: int, packed: bool) -> None:
    """Write the row-wise concatenation of `parts` into the flat view `dest` (row-major or packed)."""
    if not packed:
        rows, offset = dest.view(-1, k), 0
        for part in parts:
            rows[offset:offset + len(part)].copy_(part)
            offset += len(part)
        return
    if any(len(part) % BLOCK_ROWS for part in parts[:-1]):
        parts = [torch.cat(parts)]
    offset = 0
    for part in parts:
        size = _packed_numel(len(part), k)
        _pack_into(dest[offset:offset + size], part)
        offset += size


class Engine:
    """Weights of one model version and the prefill/decode steps; see the module docstring."""

    @classmethod
    @torch.no_grad()
    def from_model(cls, model, native: bool | None = None) -> Engine:
        """Copy the weights of a supported HF model (the model itself is left untouched).

        native: None picks the native backend where it can run, False forces torch, True requires it.
        """
        if not supports(model):
            raise ValueError(f"the engine does not support {type(model).__name__} with this config")
        self = cls.__new__(cls)
        self._adapters: dict[str, LoraAdapter] = {}
        self._load(model, native)
        return self

    def _load(self, model, native: bool | None) -> None:
        config, inner = model.config, model.model
        H, heads = config.hidden_size, config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        hd = getattr(config, "head_dim", None) or H // heads
        inter, vocab = config.intermediate_size, config.vocab_size
        self.hidden, self.heads, self.kv_heads, self.head_dim = H, heads, kv_heads, hd
        self.intermediate, self.vocab_size = inter, vocab
        self.eps = float(inner.norm.variance_epsilon)
        embed_w = inner.embed_tokens.weight.detach()
        self.device, self.dtype = embed_w.device, embed_w.dtype
        self.tied = model.lm_head.weight.data_ptr() == embed_w.data_ptr()

        self._lib = None
        if native is not False and self._native_fits():
            self._lib = native_library()
        if native is True and self._lib is None:
            reason = _native.unavailable_reason() or "needs float32 on a CPU"
            raise ValueError(f"the native backend cannot run here: {reason}")
        packed = self.packed = self._lib is not None

        # One arena holds every matrix (huge pages on a CPU: a step streams through all of it).
        nq, nqkv = heads * hd, (heads + 2 * kv_heads) * hd
        shapes = [(nqkv, H), (H, nq), (2 * inter, H), (H, inter)] * len(inner.layers) + [(vocab, H)]
        separate_embed = not self.tied
        if separate_embed:
            shapes.append((vocab, H))

        def numel(n, k):  # each matrix starts 64-byte aligned
            size = _packed_numel(n, k) if packed else n * k
            return -(-size // BLOCK_COLS) * BLOCK_COLS

        total = sum(numel(n, k) for n, k in shapes)
        if self.device.type == "cpu":
            self._arena_buffer, arena = _huge_page_arena(total, self.dtype)
        else:
            arena = self._arena_buffer = torch.empty(total, device=self.device, dtype=self.dtype)
        views, offset = [], 0
        for n, k in shapes:
            size = numel(n, k)
            views.append(arena[offset:offset + size] if packed else arena[offset:offset + n * k].view(n, k))
            offset += size
        views = iter(views)

        scale = hd**-0.5
        perm_q = _rope_permutation(heads, hd).to(self.device)
        perm_k = _rope_permutation(kv_heads, hd).to(self.device)

        def copy(t):
            return None if t is None else t.detach().clone()

        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            gate_up = [mlp.gate_proj.weight, mlp.up_proj.weight]
            if packed:  # blocks of 4 gate rows then the 4 matching up rows: SwiGLU in the kernel's epilogue
                gate_up = [_interleave_gate_up(*gate_up)]
            sources = (
                [attn.q_proj.weight[perm_q] * scale, attn.k_proj.weight[perm_k], attn.v_proj.weight],
                [attn.o_proj.weight],
                gate_up,
                [mlp.down_proj.weight],
            )
            mats = []
            for parts in sources:
                dest = next(views)
                _write_matrix(dest, [p.detach() for p in parts], parts[0].shape[1], packed)
                mats.append(dest)
            b_qkv = b_gate_up = None
            if attn.q_proj.bias is not None:
                b_qkv = torch.cat([attn.q_proj.bias[perm_q] * scale, attn.k_proj.bias[perm_k], attn.v_proj.bias])
            if mlp.gate_proj.bias is not None:
                b_gate_up = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias])
            self.layers.append(Layer(
                *mats, b_qkv=copy(b_qkv), b_o=copy(attn.o_proj.bias), b_gate_up=copy(b_gate_up),
                b_down=copy(mlp.down_proj.bias), norm_attn=copy(layer.input_layernorm.weight),
                norm_mlp=copy(layer.post_attention_layernorm.weight),
            ))
        self.lm_head = next(views)
        _write_matrix(self.lm_head, [model.lm_head.weight.detach()], H, packed)
        if separate_embed:
            self.embed = next(views)[: vocab * H].view(vocab, H)
            _write_matrix(self.embed, [embed_w], H, False)
        else:
            self.embed = None if packed else self.lm_head  # packed: rows are gathered from the lm_head
        self.norm_final = copy(inner.norm.weight)

        # RoPE angles exactly as HF computes them: float32 position * inv_freq, then cos and sin.
        inv_freq = inner.rotary_emb.inv_freq.detach().float()
        positions = torch.arange(int(config.max_position_embeddings), device=inv_freq.device).float()
        freqs = positions[:, None] * inv_freq[None, :]
        self.rope = torch.complex(freqs.cos(), freqs.sin()).to(self.device)  # [max_positions, hd / 2]
        self.max_positions = self.rope.shape[0]
        if packed:
            self._build_desc()

    @property
    def backend(self) -> str:
        return "native" if self._lib is not None else "torch"

    def _native_fits(self) -> bool:
        return (self.device.type == "cpu" and self.dtype == torch.float32
                and self.hidden % BLOCK_COLS == 0 and self.intermediate % BLOCK_COLS == 0
                and self.head_dim % BLOCK_COLS == 0)

    def _build_desc(self) -> None:
        """The C view of the weights (pointers into tensors this engine keeps alive)."""
        self._cos = self.rope.real.contiguous()
        self._sin = self.rope.imag.contiguous()

        def ptr(t):
            return 0 if t is None else t.data_ptr()

        self._b_gate_up_packed = [None if L.b_gate_up is None else _interleave_gate_up(*L.b_gate_up.chunk(2))
                                  for L in self.layers]
        table = []
        for L, b_gu in zip(self.layers, self._b_gate_up_packed):
            table += [ptr(L.qkv), ptr(L.b_qkv), ptr(L.o), ptr(L.b_o), ptr(L.gate_up), ptr(b_gu),
                      ptr(L.down), ptr(L.b_down), ptr(L.norm_attn), ptr(L.norm_mlp)]
        self._table = torch.tensor(table, dtype=torch.int64)
        self._desc = _Desc(
            hidden=self.hidden, heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim,
            inter=self.intermediate, vocab=self.vocab_size, n_layers=len(self.layers), eps=self.eps,
            embed_packed=int(self.embed is None), embed=ptr(self.lm_head if self.embed is None else self.embed),
            lm_head=ptr(self.lm_head), norm_final=ptr(self.norm_final), rope_cos=ptr(self._cos),
            rope_sin=ptr(self._sin), layers=ptr(self._table),
        )

    def _embed_rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            return self.embed[ids]
        blocks = self.lm_head.view(-1, self.hidden // BLOCK_COLS, BLOCK_ROWS, BLOCK_COLS)
        return blocks[ids // BLOCK_ROWS, :, ids % BLOCK_ROWS, :].reshape(len(ids), self.hidden)

    def _native_gemv(self, packed: torch.Tensor, x: torch.Tensor, n: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty(x.shape[0], n, dtype=torch.float32)
        rc = self._lib.engine_gemv(packed.data_ptr(), x.data_ptr(), n, x.shape[1], x.shape[0], out.data_ptr(),
                                   0 if bias is None else bias.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"engine_gemv failed ({rc})")
        return out

    def _matmul(self, x: torch.Tensor, w: torch.Tensor, n: int, b: torch.Tensor | None,
                gate_up: bool = False) -> torch.Tensor:
        """x @ w.T + b for prefill: w row-major, or packed (read as is for a few rows, else unpacked for MKL).

        gate_up: w is the fused gate/up matrix, interleaved by blocks of 4 rows when packed; the
        result is in the plain order [gate | up] either way.
        """
        if not self.packed:
            return _linear(x, w, b)
        rows, k = x.shape
        if rows <= NATIVE_PREFILL_MAX_ROWS:
            if not gate_up:
                return self._native_gemv(w, x, n, b)
            b = None if b is None else _interleave_gate_up(*b.chunk(2))
            return self._native_gemv(w, x, n, b).view(rows, n // 8, 2, 4).transpose(1, 2).reshape(rows, n)
        w = _unpack(w, n, k)
        if gate_up:
            w = w.view(n // 8, 2, 4, k).transpose(0, 1).reshape(n, k)
        return F.linear(x, w, b)

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights one decode step reads (each matrix once; the embedding rows not counted)."""
        tensors = [self.norm_final, self.lm_head]
        for layer in self.layers:
            tensors += [t for t in vars(layer).values() if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---- LoRA adapters

    @torch.no_grad()
    def add_adapter(self, name: str, lora, config=None) -> LoraAdapter:
        """Store a PEFT LoRA adapter under `name`, for prefill(adapter=name) and decode_many.

        lora: a `peft.PeftModel` (its active adapter; config is then read from it), or the adapter's
        state dict (`read_adapter(folder)` gives it, with its config) with config its LoraConfig or that
        config as a dict. The tensors are copied, so the source may change or go afterwards.
        Raises AdapterUnsupported for anything but plain LoRA (scaling alpha / r, bias 'none') on
        q/k/v/o/gate/up/down (serve that one merged), ValueError for a taken name or tensors that do
        not fit this model.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"an adapter needs a non-empty name, got {name!r}")
        if name in self._adapters:
            raise ValueError(f"adapter {name!r} is already loaded; remove_adapter it first")
        if hasattr(lora, "peft_config") and hasattr(lora, "active_adapter"):
            from peft.utils import get_peft_model_state_dict

            active = lora.active_adapter
            config = lora.peft_config[active] if config is None else config
            lora = get_peft_model_state_dict(lora, adapter_name=active)
        if config is None:
            raise ValueError("a state dict needs its LoraConfig (read_adapter(folder) returns both)")
        rank, scaling, targets = _check_lora_config(config)
        found = self._lora_tensors(lora, rank, targets)
        storage = self.dtype
        if self.dtype in (torch.float32, torch.bfloat16) and _bf16_exact(found):
            storage = torch.bfloat16
        mats = [self._lora_layer(found, i, rank, storage) for i in range(len(self.layers))]
        adapter = LoraAdapter(name=name, rank=rank, scaling=float(scaling),
                              q_scale=float(scaling) * self.head_dim**-0.5, targets=targets, mats=mats)
        if self._lib is not None:
            table = []
            for layer in adapter.mats:
                for pair in layer:
                    table += [0, 0] if pair is None else [pair[0].data_ptr(), pair[1].data_ptr()]
            adapter._table = torch.tensor(table, dtype=torch.int64)
            adapter._struct = _Lora(rank=rank, mats=adapter._table.data_ptr(), bf16=int(storage == torch.bfloat16),
                                    scale=adapter.scaling, q_scale=adapter.q_scale)
        self._adapters[name] = adapter
        return adapter

    def remove_adapter(self, name: str) -> None:
        """Forget adapter `name` (steps already running with it finish on it). KeyError if unknown."""
        if name not in self._adapters:
            raise KeyError(f"no adapter {name!r} (loaded: {sorted(self._adapters)})")
        del self._adapters[name]

    @property
    def adapters(self) -> dict[str, LoraAdapter]:
        """The loaded adapters by name (a copy of the table)."""
        return dict(self._adapters)

    def _lora_tensors(self, state: dict, rank: int, targets: frozenset[str]) -> dict:
        """{(layer, module): (A [r, in], B [out, r])} from a PEFT state dict, every key and shape checked."""
        n, hd = len(self.layers), self.head_dim
        shapes = {"q_proj": (self.hidden, self.heads * hd), "k_proj": (self.hidden, self.kv_heads * hd),
                  "v_proj": (self.hidden, self.kv_heads * hd), "o_proj": (self.heads * hd, self.hidden),
                  "gate_proj": (self.hidden, self.intermediate), "up_proj": (self.hidden, self.intermediate),
                  "down_proj": (self.intermediate, self.hidden)}
        halves: dict = {}
        for key, tensor in state.items():
            match = _LORA_KEY.search(key)
            if match is None:
                raise AdapterUnsupported(f"adapter tensor {key!r} is not a LoRA A/B weight of "
                                         f"{sorted(LORA_MODULES)} (DoRA, bias, embedding or saved modules?)")
            layer, module, half = int(match[1]), match[2], match[3]
            if layer >= n or module not in targets:
                raise ValueError(f"adapter tensor {key!r} does not fit: the model has {n} layers and the "
                                 f"config targets {sorted(targets)}")
            k, out = shapes[module]
            want = (rank, k) if half == "A" else (out, rank)
            if tuple(tensor.shape) != want:
                raise ValueError(f"adapter tensor {key!r} is {tuple(tensor.shape)}, expected {want} (rank {rank}): "
                                 "was it trained on another base model?")
            halves.setdefault((layer, module), {})[half] = tensor.detach().to(device=self.device,
                                                                              dtype=torch.float32)
        for where, pair in halves.items():
            if len(pair) != 2:
                raise ValueError(f"adapter has lora_{'A' if 'A' not in pair else 'B'} missing for {where}")
        return {where: (pair["A"], pair["B"]) for where, pair in halves.items()}

    def _lora_layer(self, found: dict, i: int, rank: int, dtype: torch.dtype) -> list:
        """Layer i's (A, B) per fused matrix in the engine's row order (unscaled, stored as dtype), or None
        where nothing is targeted."""
        hd = self.head_dim
        perm_q = _rope_permutation(self.heads, hd).to(self.device)
        perm_k = _rope_permutation(self.kv_heads, hd).to(self.device)
        # The row permutations the base weights got in _load; their scales go on t (LoraAdapter).
        row_map = {"q_proj": lambda b: b[perm_q], "k_proj": lambda b: b[perm_k]}
        mats = []
        for fused in LORA_FUSED:
            modules = [m for m, (f, _) in LORA_MODULES.items() if f == fused]
            if not any((i, m) in found for m in modules):
                mats.append(None)
                continue
            a_parts, b_parts = [], []
            for m in modules:
                if (i, m) in found:
                    a, b = found[(i, m)]
                    b = row_map.get(m, lambda t: t)(b)
                else:  # fused with a targeted module: zero rows leave its outputs as the base's
                    k = next(found[(i, o)][0].shape[1] for o in modules if (i, o) in found)
                    out = {"q_proj": self.heads * hd, "k_proj": self.kv_heads * hd, "v_proj": self.kv_heads * hd,
                           "gate_proj": self.intermediate, "up_proj": self.intermediate}[m]
                    a, b = torch.zeros(rank, k, device=self.device), torch.zeros(out, rank, device=self.device)
                a_parts.append(a)
                b_parts.append(b)
            if fused == "gate_up" and self.packed:
                B = _interleave_gate_up(*b_parts)
            else:
                B = torch.cat(b_parts)
            mats.append((torch.cat(a_parts).to(dtype).contiguous(), B.to(dtype).contiguous()))
        return mats

    def _resolve_adapters(self, names: list[str | None]) -> list[LoraAdapter | None]:
        missing = sorted({n for n in names if n is not None and n not in self._adapters})
        if missing:
            raise ValueError(f"unknown adapter(s) {missing} (loaded: {sorted(self._adapters)})")
        return [None if n is None else self._adapters[n] for n in names]

    def _lora_delta(self, x: torch.Tensor, adapter: LoraAdapter, pair: tuple[torch.Tensor, torch.Tensor],
                    slot: int) -> torch.Tensor:
        """x [rows, K] -> the update [rows, N] of fused matrix LORA_FUSED[slot], its rows in plain order
        (gate before up: what the torch-op paths see)."""
        a, b = (t if t.dtype == x.dtype else t.to(x.dtype) for t in pair)  # bfloat16-stored: widen
        rank = b.shape[1]
        t = _linear(x, a)
        fused = LORA_FUSED[slot]
        if fused == "qkv":  # the q segment also carries the attention's scale (as the engine's q rows)
            t[:, :rank] *= adapter.q_scale
            t[:, rank:] *= adapter.scaling
        else:
            t *= adapter.scaling
        if fused == "gate_up" and self.packed:  # undo the interleave by blocks of 4 rows
            b = b.view(-1, 2, 4, rank).transpose(0, 1).reshape(-1, rank)
        if fused == "qkv":
            q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
            bounds = [0, q, q + kv, q + 2 * kv]
        elif fused == "gate_up":
            bounds = [0, self.intermediate, 2 * self.intermediate]
        else:
            bounds = [0, b.shape[0]]
        parts = [_linear(t[:, s * rank:(s + 1) * rank], b[lo:hi]) for s, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def _add_lora(self, y: torch.Tensor, x: torch.Tensor, groups: list, layer: int, slot: int) -> torch.Tensor:
        """y + each row group's update; groups: [(adapter, rows: slice or index tensor)]."""
        for adapter, rows in groups:
            pair = adapter.mats[layer][slot]
            if pair is None:
                continue
            if isinstance(rows, slice):
                y[rows] += self._lora_delta(x[rows], adapter, pair, slot)
            else:
                y.index_add_(0, rows, self._lora_delta(x[rows], adapter, pair, slot))
        return y

    # ---- decoding

    def new_state(self, rows: int, max_total_len: int) -> DecodeState:
        if max_total_len > self.max_positions:
            raise ValueError(f"{max_total_len} positions asked for; the model has {self.max_positions}")
        shape = (len(self.layers), rows, self.kv_heads, max_total_len, self.head_dim)
        keys = torch.empty(shape, device=self.device, dtype=self.dtype)
        values = torch.empty(shape, device=self.device, dtype=self.dtype)
        return DecodeState(keys=keys, values=values, rows=rows, length=0, max_total_len=max_total_len, owner=self)

    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int], rows: int, max_total_len: int,
                adapter: str | None = None, prefix: KVPrefix | None = None) -> tuple[DecodeState, torch.Tensor]:
        """Run the prompt once and give each of `rows` sequences its cache.

        Returns (state, logits [rows, V] after the prompt's last token); `max_total_len` bounds the
        prompt plus every token decode() will be fed. adapter: the name of a LoRA adapter (add_adapter)
        to run with, None for the base model; the state remembers it for decode_many.

        prefix: keys and values kept from an earlier request (`keep_prefix`) on this engine and adapter;
        the prompt's tokens it shares are copied, not computed (at least the last prompt token is always
        computed, for the logits), and `state.reused` says how many. The result matches a prefill of the
        whole prompt to float rounding (~1e-6 relative), not bit for bit: the kept keys came from other
        matrix shapes (decode steps, a shorter prompt). A prefix of another engine or adapter is refused.
        """
        (lora,) = self._resolve_adapters([adapter])
        ids = self._check_ids(prompt_ids, "prompt")
        n = len(prompt_ids)
        if max_total_len < n:
            raise ValueError(f"max_total_len {max_total_len} is shorter than the prompt ({n})")
        start = 0
        if prefix is not None:
            if prefix.owner is not self or prefix.adapter != adapter:
                raise ValueError(f"that prefix was computed by another engine or adapter ({prefix.adapter!r}, "
                                 f"not {adapter!r})")
            start = min(prefix.shared(prompt_ids), n - 1)
        state = self.new_state(rows, max_total_len)
        if start:
            state.keys[:, :, :, :start] = prefix.keys[:, None, :, :start]
            state.values[:, :, :, :start] = prefix.values[:, None, :, :start]
        h = self._forward(ids[start:], lora, state, start=start)
        state.length = n
        state.adapter = adapter
        state.reused = start
        return state, self._head(h[-1:]).expand(rows, -1).contiguous()

    def keep_prefix(self, state: DecodeState, row: int, tokens: list[int]) -> KVPrefix:
        """A copy of row `row`'s keys and values for its first len(tokens) positions, which must be filled
        (tokens: what was fed there, the prompt then the reply), for `prefill(prefix=...)` later."""
        if state.owner is not self:
            raise ValueError("that state belongs to another engine")
        if not 0 <= row < state.rows or not 0 < len(tokens) <= state.length:
            raise ValueError(f"row {row} of {state.rows}, {len(tokens)} tokens of {state.length} filled")
        n = len(tokens)
        return KVPrefix(tokens=tuple(int(t) for t in tokens), keys=state.keys[:, row, :, :n].clone(),
                        values=state.values[:, row, :, :n].clone(), adapter=state.adapter,
                        owner_ref=weakref.ref(self))

    @torch.inference_mode()
    def score(self, ids: list[int], adapter: str | None = None, start: int = 0) -> torch.Tensor:
        """The logits at every position of `ids` from `start` on (teacher forcing): float32
        [len(ids) - start, V], row i predicting token start + i + 1. The math of `prefill` (which is this
        at the last position only), with no cache kept; adapter as there.

        For comparing distributions along a given sequence (the KL of a version to another on a reply
        sampled from one of them): `start` = the prompt's length - 1 gives the rows that predict the reply.
        """
        (lora,) = self._resolve_adapters([adapter])
        tokens = self._check_ids(ids, "sequence")
        if len(ids) > self.max_positions:
            raise ValueError(f"{len(ids)} tokens; the model has {self.max_positions} positions")
        if not 0 <= start < len(ids):
            raise ValueError(f"start {start} is outside the sequence (0..{len(ids) - 1})")
        return self._head(self._forward(tokens, lora)[start:])

    @torch.inference_mode()
    def score_branches(self, prefix: list[int], branches: list[list[int]],
                       adapter: str | None = None) -> list[torch.Tensor]:
        """`score(prefix + branch, adapter, start=len(prefix) - 1)` for every branch, in one forward: float32
        [len(branch) + 1, V] each. The prefix is computed once and each branch attends to the prefix and to
        its own tokens only (its positions start after the prefix), as if alone.

        For several continuations of one prompt (a probe's samples): the prompt is not recomputed per
        continuation, and the matmuls get more rows at once, which a CPU runs faster per row.
        """
        (lora,) = self._resolve_adapters([adapter])
        tokens = self._check_ids(list(prefix) + [t for b in branches for t in b], "sequence")
        n_prefix = len(prefix)
        if n_prefix == 0:
            raise ValueError("empty prefix")
        longest = n_prefix + max((len(b) for b in branches), default=0)
        if longest > self.max_positions:
            raise ValueError(f"{longest} tokens; the model has {self.max_positions} positions")
        n = len(tokens)
        positions = torch.arange(n, device=self.device)
        # Which row may attend to which: the prefix causally, then each branch to the prefix and to itself.
        mask = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
        offset = n_prefix
        for branch in branches:
            end = offset + len(branch)
            positions[offset:end] = torch.arange(n_prefix, n_prefix + len(branch), device=self.device)
            mask[offset:end, n_prefix:offset] = False
            offset = end
        h = self._forward(tokens, lora, positions=positions, mask=mask)
        logits = self._head(h[n_prefix - 1:])  # the prefix's last row, then every branch row
        out, offset = [], 1
        for branch in branches:
            out.append(torch.cat([logits[:1], logits[offset:offset + len(branch)]]))
            offset += len(branch)
        return out

    def _check_ids(self, ids: list[int], what: str) -> torch.Tensor:
        if len(ids) == 0:
            raise ValueError(f"empty {what}")
        tokens = torch.tensor(ids, dtype=torch.long, device=self.device)
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size:
            raise ValueError(f"a {what} token id is outside the vocabulary")
        return tokens

    def _forward(self, ids: torch.Tensor, lora: LoraAdapter | None, state: DecodeState | None = None,
                 positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                 start: int = 0) -> torch.Tensor:
        """The decoder over ids [n] at positions 0..n-1: the last hidden states [n, hidden], before the
        final norm. With a state, each layer's keys and values go into its cache (every row alike).
        positions and mask (bool [n, n], True: may attend) replace the causal layout (score_branches).
        start: ids sit at positions start.. and attend to the state's first `start` positions too (they
        hold a kept prefix: prefill)."""
        n = len(ids)
        heads, kv_heads, hd = self.heads, self.kv_heads, self.head_dim
        q_size, kv_size = heads * hd, kv_heads * hd
        h = self._embed_rows(ids)  # [n, hidden]
        if start:
            positions = torch.arange(start, start + n, device=self.device)
            # Row j (position start + j) sees every kept position and the new ones up to its own.
            mask = torch.arange(start + n, device=self.device)[None, :] <= positions[:, None]
        rope = self.rope[:n, None, :] if positions is None else self.rope[positions][:, None, :]
        groups = [(lora, slice(None))]
        nqkv, hidden, inter = q_size + 2 * kv_size, self.hidden, self.intermediate
        for i, L in enumerate(self.layers):
            x = _rms_norm(h, L.norm_attn, self.eps)
            qkv = self._matmul(x, L.qkv, nqkv, L.b_qkv).contiguous()
            if lora is not None:
                qkv = self._add_lora(qkv, x, groups, i, 0)
            qk = _apply_rope(qkv[:, : q_size + kv_size].reshape(n, heads + kv_heads, hd), rope)
            q = qk[:, :heads].transpose(0, 1)  # [heads, n, hd]
            k = qk[:, heads:].transpose(0, 1)  # [kv_heads, n, hd]
            v = qkv[:, q_size + kv_size:].reshape(n, kv_heads, hd).transpose(0, 1)
            if state is not None:
                state.keys[i, :, :, start:start + n] = k
                state.values[i, :, :, start:start + n] = v
            if start:  # attend over the kept prefix and the new positions (every row's cache is alike)
                k, v = state.keys[i, 0, :, :start + n], state.values[i, 0, :, :start + n]
            a = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=mask is None,
                                               scale=1.0, enable_gqa=heads != kv_heads)  # the scale is in the q weights
            a = a[0].transpose(0, 1).reshape(n, q_size)
            y = self._matmul(a, L.o, hidden, L.b_o)
            h = h + (y if lora is None else self._add_lora(y, a, groups, i, 1))
            x = _rms_norm(h, L.norm_mlp, self.eps)
            gu = self._matmul(x, L.gate_up, 2 * inter, L.b_gate_up, gate_up=True)
            if lora is not None:
                gu = self._add_lora(gu, x, groups, i, 2)
            g, u = gu.split(inter, dim=-1)
            m = F.silu(g) * u
            y = self._matmul(m, L.down, hidden, L.b_down)
            h = h + (y if lora is None else self._add_lora(y, m, groups, i, 3))
        return h

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm and the LM head over hidden states [rows, hidden]: float32 logits [rows, V]."""
        x = _rms_norm(h, self.norm_final, self.eps)
        if self.packed:
            return self._matmul(x, self.lm_head, self.vocab_size, None)
        return F.linear(x, self.lm_head).float()

    @torch.inference_mode()
    def decode(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (LongTensor [rows]); returns the next logits [rows, V]."""
        return self.decode_many([state], tokens)

    @torch.inference_mode()
    def decode_many(self, states: list[DecodeState], tokens: torch.Tensor,
                    adapters: list[str | None] | None = None) -> torch.Tensor:
        """One decode step for the rows of several states at once, each state at its own position.

        tokens: LongTensor [sum(s.rows for s in states)], the rows of states[0] first, then states[1], ...
        Returns float32 logits [sum rows, vocab] in the same order, and advances each state's length by
        1, as decode(state, its tokens) would for each state alone. The step reads the weights once for
        every row, so it costs little more than decoding one state. The caller must own every state for
        the step (the states are written), and a state appears once.

        native: bit-identical to decoding each state alone (every row is computed by the same
        arithmetic whatever its neighbours). torch: the matmuls run over all rows at once, and a
        matmul's reduction order can change with its row count, so a state's logits match decoding it
        alone to ~1e-5 relative, not bit for bit.

        adapters: one LoRA adapter name (or None: the base model) per state; None runs each state on
        the adapter it was prefilled with (its `adapter`). Rows of different adapters share the step.

        Raises ValueError, with nothing advanced, for an empty list, a state of another engine or
        listed twice, a full cache, tokens of the wrong shape or outside the vocabulary, or an adapter
        list of the wrong length or naming an adapter not loaded.
        """
        self._check_step(states, tokens)
        if adapters is None:
            adapters = [s.adapter for s in states]
        if len(adapters) != len(states):
            raise ValueError(f"{len(adapters)} adapters for {len(states)} states: give one (or None) per state")
        loras = self._resolve_adapters(list(adapters))
        if self._lib is not None:
            logits = self._decode_native(states, tokens, loras)
        else:
            logits = self._decode_torch(states, tokens, loras)
        for s in states:
            s.length += 1
        return logits

    def _check_step(self, states: list[DecodeState], tokens: torch.Tensor) -> None:
        if not states:
            raise ValueError("decode_many needs at least one state")
        if len({id(s) for s in states}) != len(states):
            raise ValueError("a state is listed twice: each state takes one token per row per step")
        for i, s in enumerate(states):
            if getattr(s, "owner", None) is not self:
                raise ValueError(f"state {i} was not made by this engine (use this engine's prefill or new_state)")
            if s.length >= s.max_total_len:
                raise ValueError(f"state {i}: the cache is full ({s.max_total_len} positions)")
            # The native step writes through raw pointers: the caches must still be what new_state made.
            expected = (len(self.layers), s.rows, self.kv_heads, s.max_total_len, self.head_dim)
            for t in (s.keys, s.values):
                if tuple(t.shape) != expected or not t.is_contiguous() or t.dtype != self.dtype:
                    raise ValueError(f"state {i}: its cache is not the {list(expected)} {self.dtype} "
                                     "tensor new_state made")
        total = sum(s.rows for s in states)
        integer = not (tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool)
        if tokens.shape != (total,) or not integer:
            raise ValueError(f"expected {total} token ids (LongTensor [{total}]), got {tokens.dtype} "
                             f"of shape {tuple(tokens.shape)}")
        low, high = (int(v) for v in torch.aminmax(tokens))
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")

    def _decode_native(self, states: list[DecodeState], tokens: torch.Tensor,
                       loras: list[LoraAdapter | None]) -> torch.Tensor:
        """One engine_step_rows call: per row its position, the layer-0 address of its cache, the
        distance between layers, its tmax (states differ in rows and max_total_len) and its adapter."""
        tokens = tokens.to(device="cpu", dtype=torch.int64).contiguous()
        total = tokens.shape[0]
        pos, strides, tmax, keys, values = [], [], [], [], []
        for s in states:
            row = self.kv_heads * s.max_total_len * self.head_dim  # floats in one row of one layer
            pos += [s.length] * s.rows
            strides += [s.rows * row] * s.rows
            tmax += [s.max_total_len] * s.rows
            k, v, size = s.keys.data_ptr(), s.values.data_ptr(), s.keys.element_size()
            keys += [k + r * row * size for r in range(s.rows)]
            values += [v + r * row * size for r in range(s.rows)]
        lora_rows = None  # NULL: no row has an adapter (`loras` keeps the adapters alive for the call)
        if any(a is not None for a in loras):
            lora_rows = torch.tensor([0 if a is None else ctypes.addressof(a._struct)
                                      for a, s in zip(loras, states) for _ in range(s.rows)], dtype=torch.int64)
        rows = torch.tensor([pos, strides, tmax, keys, values], dtype=torch.int64)
        logits = torch.empty(total, self.vocab_size, dtype=torch.float32)
        rc = self._lib.engine_step_rows(ctypes.addressof(self._desc), tokens.data_ptr(), total, rows[0].data_ptr(),
                                        rows[3].data_ptr(), rows[4].data_ptr(), rows[1].data_ptr(),
                                        rows[2].data_ptr(), None if lora_rows is None else lora_rows.data_ptr(),
                                        logits.data_ptr(), torch.get_num_threads())
        if rc != 0:
            reason = {-2: "a token id is outside the vocabulary", -3: "out of memory"}.get(rc, "bad arguments")
            raise RuntimeError(f"engine_step_rows failed ({rc}): {reason}")
        return logits

    def _decode_torch(self, states: list[DecodeState], tokens: torch.Tensor,
                      loras: list[LoraAdapter | None]) -> torch.Tensor:
        """The step in torch ops: matmuls over all rows at once, then attention state by state.

        Attention runs per state over a view of its own cache: padding every state to the longest
        length would copy the caches each layer, a loop reads them in place (one state: as before).
        LoRA updates run per adapter, over that adapter's rows at once.
        """
        heads, kv_heads, hd = self.heads, self.kv_heads, self.head_dim
        q_size, kv_size = heads * hd, kv_heads * hd
        group = heads // kv_heads
        eps = self.eps
        total = tokens.shape[0]
        h = self._embed_rows(tokens.to(self.device))  # [total, hidden]
        if len(states) == 1:
            rope = self.rope[states[0].length]
        else:  # each row rotated by its own position's angles: [total, 1 (heads), hd / 2]
            positions = torch.tensor([s.length for s in states for _ in range(s.rows)], device=self.device)
            rope = self.rope[positions][:, None, :]
        spans, start = [], 0
        by_adapter: dict[str, tuple[LoraAdapter, list[int]]] = {}
        for s, lora in zip(states, loras):
            spans.append((s, start, start + s.rows))
            if lora is not None:
                by_adapter.setdefault(lora.name, (lora, []))[1].extend(range(start, start + s.rows))
            start += s.rows
        groups = []  # (adapter, its rows: a slice where they are contiguous)
        for lora, idx in by_adapter.values():
            contiguous = idx == list(range(idx[0], idx[-1] + 1))
            groups.append((lora, slice(idx[0], idx[-1] + 1) if contiguous else torch.tensor(idx, device=self.device)))
        for i, L in enumerate(self.layers):
            x = _rms_norm(h, L.norm_attn, eps)
            qkv = _linear(x, L.qkv, L.b_qkv).contiguous()
            qkv = self._add_lora(qkv, x, groups, i, 0)
            qk = _apply_rope(qkv[:, : q_size + kv_size].reshape(total, heads + kv_heads, hd), rope)
            v_new = qkv[:, q_size + kv_size:].reshape(total, kv_heads, hd)
            parts = []
            for s, lo, hi in spans:
                pos, rows = s.length, s.rows
                K, V = s.keys[i, :, :, :pos + 1], s.values[i, :, :, :pos + 1]
                K[:, :, pos] = qk[lo:hi, heads:]
                V[:, :, pos] = v_new[lo:hi]
                q = qk[lo:hi, :heads].reshape(rows, kv_heads, group, hd)
                scores = torch.matmul(q, K.transpose(-1, -2))  # [rows, kv_heads, group, pos + 1]
                probs = scores.softmax(-1, dtype=torch.float32).to(scores.dtype)  # float32, as HF
                parts.append(torch.matmul(probs, V).reshape(rows, q_size))
            a = parts[0] if len(parts) == 1 else torch.cat(parts)
            h = h + self._add_lora(_linear(a, L.o, L.b_o), a, groups, i, 1)
            x = _rms_norm(h, L.norm_mlp, eps)
            gu = self._add_lora(_linear(x, L.gate_up, L.b_gate_up), x, groups, i, 2)
            g, u = gu.split(self.intermediate, dim=-1)
            m = F.silu(g) * u
            h = h + self._add_lora(_linear(m, L.down, L.b_down), m, groups, i, 3)
        x = _rms_norm(h, self.norm_final, eps)
        return _linear(x, self.lm_head).float()
