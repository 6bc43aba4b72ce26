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
  a small C library (`NATIVE_SOURCE` below, compiled once with `cc -O3 -march=native -fopenmp` into
  ~/.cache/rlhf-playground/native/ and reused; ~1 s). The weights live in one arena backed by
  transparent huge pages, each matrix packed in blocks of 8 rows x 16 columns so each thread streams
  memory linearly: this reads the weights at ~90% of `x.sum()`'s bandwidth, where MKL manages 50-70%
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

`supports(model)` says whether the engine reproduces a model exactly; callers fall back to the HF
forward when it is False. An `Engine` is read-only once built, so threads may decode different states
with it at the same time (each `DecodeState` belongs to one caller).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

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
NATIVE_ENV = "PLAYGROUND_NATIVE"  # '0' turns the native backend off
NATIVE_CACHE_ENV = "PLAYGROUND_NATIVE_CACHE"  # where the compiled library goes (default ~/.cache/...)
BLOCK_ROWS, BLOCK_COLS = 8, 16  # the packed layout; must match NB and LANES in NATIVE_SOURCE
# The sampling distributions take ~0.1 ms a row on one thread: not worth an OpenMP barrier, which
# stalls for a scheduler tick when another process holds the second core.
SAMPLING_THREADS = 1


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
# Native backend

NATIVE_SOURCE = r"""
// One decode step of a Llama-family model for a few rows: float32, AVX-512, OpenMP.
// Weights are packed in blocks of NB rows x LANES columns ([N/NB][K/LANES][NB][LANES]) so that each
// thread streams them linearly. A layer is five phases with a barrier after each: q/k/v (with RoPE and
// the cache writes in the epilogue), attention, o (added to the residual), gate/up (SwiGLU in the
// epilogue: each block holds 4 gate rows then the 4 matching up rows), down (added to the residual).
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NB 8
#define LANES 16

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter, vocab, n_layers;
    float eps;
    int64_t embed_packed;    // 1: embedding rows are read from the packed lm_head (tied weights)
    const float* embed;      // [vocab, hidden] row-major, or the packed lm_head
    const float* lm_head;    // packed
    const float* norm_final;
    const float* rope_cos;   // [max_positions, head_dim / 2]
    const float* rope_sin;
    const float* const* layers;  // per layer: wqkv, bqkv, wo, bo, wgu, bgu, wdown, bdown, norm_attn, norm_mlp
} Desc;

enum { EPI_STORE = 0, EPI_ADD = 1, EPI_QKV = 2, EPI_SWIGLU = 3 };

typedef struct {
    int mode;
    float* y;  // output [R, ldy] (STORE, ADD, SWIGLU: [R, ldy] with ldy the intermediate size)
    int64_t ldy, N;
    const float* bias;
    // EPI_QKV
    int64_t nq, nk, head_dim, kv_heads, tmax, pos;
    const float *cosv, *sinv;
    float *keys, *values;  // this layer's caches [R, kv_heads, tmax, head_dim]
} Epi;

int engine_abi(void) { return 5; }

// exp(x) for 16 floats: Cephes' expf polynomial (within 2 ulp of expf), 2^n applied by scalef.
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-103.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500E-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507E-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073E-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894E-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459E-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201E-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
}

// sum of exp(scale * x[j] - shift) over j < n, each term also stored in out (when out is not NULL).
static double sum_exp(const float* x, int64_t n, float scale, float shift, float* out) {
    __m512 acc = _mm512_setzero_ps();
    double total = 0.0;
    const __m512 sc = _mm512_set1_ps(scale), sh = _mm512_set1_ps(shift);
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(x + j), sc), sh));
        if (out) _mm512_storeu_ps(out + j, e);
        acc = _mm512_add_ps(acc, e);
        if ((j / LANES) % 64 == 63) { total += _mm512_reduce_add_ps(acc); acc = _mm512_setzero_ps(); }
    }
    if (j < n) {
        const __mmask16 m = (__mmask16)((1u << (n - j)) - 1);
        __m512 e = exp16(_mm512_sub_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + j), sc), sh));
        e = _mm512_maskz_mov_ps(m, e);
        if (out) _mm512_mask_storeu_ps(out + j, m, e);
        acc = _mm512_add_ps(acc, e);
    }
    return total + _mm512_reduce_add_ps(acc);
}

static inline void epilogue(const Epi* e, int64_t r, int64_t n0, float* v) {
    if (e->bias) for (int64_t b = 0; b < NB && n0 + b < e->N; b++) v[b] += e->bias[n0 + b];
    switch (e->mode) {
    case EPI_STORE: case EPI_ADD: {
        float* y = e->y + r * e->ldy + n0;
        int64_t m = e->N - n0 < NB ? e->N - n0 : NB;
        if (e->mode == EPI_ADD) for (int64_t b = 0; b < m; b++) y[b] += v[b];
        else for (int64_t b = 0; b < m; b++) y[b] = v[b];
        break;
    }
    case EPI_QKV: {
        const int64_t hd = e->head_dim;
        if (n0 < e->nq + e->nk) {  // q or k: rotate the pairs (dims 2i, 2i+1 of a head)
            for (int b = 0; b < NB; b += 2) {
                const int64_t i = ((n0 + b) % hd) / 2;
                const float a = v[b], c = v[b + 1];
                v[b] = a * e->cosv[i] - c * e->sinv[i];
                v[b + 1] = c * e->cosv[i] + a * e->sinv[i];
            }
        }
        float* dst;
        if (n0 < e->nq) {
            dst = e->y + r * e->ldy + n0;
        } else {
            const int64_t off = n0 < e->nq + e->nk ? n0 - e->nq : n0 - e->nq - e->nk;
            float* cache = n0 < e->nq + e->nk ? e->keys : e->values;
            dst = cache + ((r * e->kv_heads + off / hd) * e->tmax + e->pos) * hd + off % hd;
        }
        memcpy(dst, v, NB * sizeof(float));
        break;
    }
    case EPI_SWIGLU: {
        float* y = e->y + r * e->ldy + (n0 / NB) * (NB / 2);
        const __mmask16 m4 = 0xF;
        const __m512 g = _mm512_maskz_loadu_ps(m4, v), u = _mm512_maskz_loadu_ps(m4, v + NB / 2);
        const __m512 sig = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f),
                                                                         exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        _mm512_mask_storeu_ps(y, m4, _mm512_mul_ps(_mm512_mul_ps(g, sig), u));
        break;
    }
    }
}

static void gemv_block(const float* restrict wb, const float* restrict X, int64_t K, int64_t R, int64_t n0,
                       const Epi* e) {
    const int64_t kc_n = K / LANES;
    float v0[NB], v1[NB];
    int64_t r = 0;
    for (; r + 2 <= R; r += 2) {
        __m512 a0[NB], a1[NB];
        for (int b = 0; b < NB; b++) { a0[b] = _mm512_setzero_ps(); a1[b] = _mm512_setzero_ps(); }
        const float* x0 = X + r * K;
        const float* x1 = x0 + K;
        const float* w = wb;
        for (int64_t kc = 0; kc < kc_n; kc++, w += NB * LANES) {
            __m512 xv0 = _mm512_loadu_ps(x0 + kc * LANES), xv1 = _mm512_loadu_ps(x1 + kc * LANES);
            for (int b = 0; b < NB; b++) {
                __m512 wv = _mm512_load_ps(w + b * LANES);
                a0[b] = _mm512_fmadd_ps(wv, xv0, a0[b]);
                a1[b] = _mm512_fmadd_ps(wv, xv1, a1[b]);
            }
        }
        for (int b = 0; b < NB; b++) { v0[b] = _mm512_reduce_add_ps(a0[b]); v1[b] = _mm512_reduce_add_ps(a1[b]); }
        epilogue(e, r, n0, v0);
        epilogue(e, r + 1, n0, v1);
    }
    if (r < R) {
        __m512 a0[NB];
        for (int b = 0; b < NB; b++) a0[b] = _mm512_setzero_ps();
        const float* x0 = X + r * K;
        const float* w = wb;
        for (int64_t kc = 0; kc < kc_n; kc++, w += NB * LANES) {
            __m512 xv0 = _mm512_loadu_ps(x0 + kc * LANES);
            for (int b = 0; b < NB; b++) a0[b] = _mm512_fmadd_ps(_mm512_load_ps(w + b * LANES), xv0, a0[b]);
        }
        for (int b = 0; b < NB; b++) v0[b] = _mm512_reduce_add_ps(a0[b]);
        epilogue(e, r, n0, v0);
    }
}

// A barrier that spins briefly, then yields its core. OpenMP's own barriers spin for milliseconds: when
// another process wants the same 2 cores, a descheduled partner turns each of a step's 150 barriers
// into a wait of a scheduler tick (a step went from 20 ms to a second); yielding lets it run instead.
#define SPIN_LIMIT 4000
typedef struct { atomic_int count; atomic_int phase; int n; } Sync;

static void sync_wait(Sync* s) {
    if (!s || s->n <= 1) return;
    const int phase = atomic_load_explicit(&s->phase, memory_order_acquire);
    if (atomic_fetch_add_explicit(&s->count, 1, memory_order_acq_rel) == s->n - 1) {
        atomic_store_explicit(&s->count, 0, memory_order_relaxed);
        atomic_store_explicit(&s->phase, phase + 1, memory_order_release);
    } else {
        int spins = 0;
        while (atomic_load_explicit(&s->phase, memory_order_acquire) == phase) {
            if (++spins < SPIN_LIMIT) _mm_pause(); else sched_yield();
        }
    }
}

// This thread's share [*lo, *hi) of n tasks (static, contiguous, as the team's threads number).
static void share(int64_t n, int64_t* lo, int64_t* hi) {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    *lo = n * t / nt;
    *hi = n * (t + 1) / nt;
}

// Inside a parallel region (or not): the blocks of W [N, K] shared among the threads, then a barrier.
static void gemv(const float* W, const float* X, int64_t N, int64_t K, int64_t R, const Epi* e, Sync* sync) {
    int64_t lo, hi;
    share((N + NB - 1) / NB, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) gemv_block(W + i * NB * K, X, K, R, i * NB, e);
    sync_wait(sync);
}

// Y [R, N] = X [R, K] W^T + bias, with its own parallel region (prefill, tests).
int engine_gemv(const float* W, const float* X, int64_t N, int64_t K, int64_t R, float* Y, const float* bias,
                int nthreads) {
    if (K % LANES) return -1;
    Epi e = {0};
    e.mode = EPI_STORE; e.y = Y; e.ldy = N; e.N = N; e.bias = bias;
    #pragma omp parallel num_threads(nthreads)
    gemv(W, X, N, K, R, &e, NULL);  // the end of the region is the barrier
    return 0;
}

static void rms_norm_rows(const float* h, const float* w, float* out, int64_t R, int64_t H, float eps) {
    for (int64_t r = 0; r < R; r++) {
        const float* x = h + r * H;
        float* o = out + r * H;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t k = 0; k < H; k += LANES) { __m512 v = _mm512_loadu_ps(x + k); acc = _mm512_fmadd_ps(v, v, acc); }
        const float scale = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)H + eps);
        for (int64_t k = 0; k < H; k++) o[k] = w[k] * (x[k] * scale);
    }
}

static void embed_row(const Desc* d, int64_t token, float* out) {
    const int64_t H = d->hidden;
    if (!d->embed_packed) { memcpy(out, d->embed + token * H, H * sizeof(float)); return; }
    const float* blk = d->embed + (token / NB) * NB * H + (token % NB) * LANES;
    for (int64_t kc = 0; kc < H / LANES; kc++) memcpy(out + kc * LANES, blk + kc * NB * LANES, LANES * sizeof(float));
}

static void attention(const float* q_all, const float* K, const float* V, float* att, float* sc, int64_t r,
                      int64_t j, int64_t T, const Desc* d, int64_t nqkv, int64_t tmax) {
    const int64_t hd = d->head_dim, nkv = d->kv_heads, group = d->heads / nkv;
    const float* Kr = K + (r * nkv + j) * tmax * hd;
    const float* Vr = V + (r * nkv + j) * tmax * hd;
    for (int64_t g = 0; g < group; g++) {
        const int64_t qh = j * group + g;
        const float* q = q_all + r * nqkv + qh * hd;
        float mx = -INFINITY;
        for (int64_t p = 0; p < T; p++) {
            const float* k = Kr + p * hd;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t i = 0; i < hd; i += LANES)
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), _mm512_loadu_ps(k + i), acc);
            sc[p] = _mm512_reduce_add_ps(acc);
            if (sc[p] > mx) mx = sc[p];
        }
        const float inv = (float)(1.0 / sum_exp(sc, T, 1.0f, mx, sc));
        float* o = att + r * d->heads * hd + qh * hd;
        for (int64_t i = 0; i < hd; i += LANES) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t p = 0; p < T; p++)
                acc = _mm512_fmadd_ps(_mm512_set1_ps(sc[p] * inv), _mm512_loadu_ps(Vr + p * hd + i), acc);
            _mm512_storeu_ps(o + i, acc);
        }
    }
}

// tokens[R] at position pos; keys/values [n_layers, R, kv_heads, tmax, head_dim]; logits [R, vocab].
int engine_step(const Desc* d, const int64_t* tokens, int64_t R, int64_t pos, float* keys, float* values,
                int64_t tmax, float* logits, int nthreads) {
    const int64_t H = d->hidden, nh = d->heads, nkv = d->kv_heads, hd = d->head_dim, I = d->inter;
    const int64_t nq = nh * hd, nk = nkv * hd, nqkv = nq + 2 * nk, T = pos + 1;
    if (pos < 0 || pos >= tmax || R < 1 || nthreads < 1) return -1;
    for (int64_t r = 0; r < R; r++) if (tokens[r] < 0 || tokens[r] >= d->vocab) return -2;
    const int64_t kmax = H > I ? H : I;
    // Shared: h [R, H], q [R, nqkv], att [R, nq], m [R, I]; per thread: x [R, H] and scores [T].
    const size_t shared = R * (H + nqkv + nq + I), per_thread = R * kmax + T + LANES;
    float* scratch = (float*)aligned_alloc(64, ((shared + nthreads * per_thread) * sizeof(float) + 63) / 64 * 64);
    if (!scratch) return -3;
    float* h = scratch;
    float* q = h + R * H;
    float* att = q + R * nqkv;
    float* m = att + R * nq;
    for (int64_t r = 0; r < R; r++) embed_row(d, tokens[r], h + r * H);
    const float* cosv = d->rope_cos + pos * (hd / 2);
    const float* sinv = d->rope_sin + pos * (hd / 2);

    Sync sync;
    atomic_init(&sync.count, 0);
    atomic_init(&sync.phase, 0);
    sync.n = 1;
    #pragma omp parallel num_threads(nthreads)
    {
        #pragma omp single
        sync.n = omp_get_num_threads();
        float* x = scratch + shared + omp_get_thread_num() * per_thread;
        float* sc = x + R * kmax;
        for (int64_t l = 0; l < d->n_layers; l++) {
            const float* const* L = d->layers + l * 10;
            float* K = keys + l * R * nk * tmax;
            float* V = values + l * R * nk * tmax;
            // Every thread normalizes the rows itself (cheaper than a barrier).
            rms_norm_rows(h, L[8], x, R, H, d->eps);
            Epi e = {0};
            e.mode = EPI_QKV; e.y = q; e.ldy = nqkv; e.N = nqkv; e.bias = L[1];
            e.nq = nq; e.nk = nk; e.head_dim = hd; e.kv_heads = nkv; e.tmax = tmax; e.pos = pos;
            e.cosv = cosv; e.sinv = sinv; e.keys = K; e.values = V;
            gemv(L[0], x, nqkv, H, R, &e, &sync);
            int64_t lo, hi;
            share(R * nkv, &lo, &hi);
            for (int64_t t = lo; t < hi; t++) attention(q, K, V, att, sc, t / nkv, t % nkv, T, d, nqkv, tmax);
            sync_wait(&sync);
            Epi o = {0};
            o.mode = EPI_ADD; o.y = h; o.ldy = H; o.N = H; o.bias = L[3];
            gemv(L[2], att, H, nq, R, &o, &sync);
            rms_norm_rows(h, L[9], x, R, H, d->eps);
            Epi s = {0};
            s.mode = EPI_SWIGLU; s.y = m; s.ldy = I; s.N = 2 * I; s.bias = L[5];
            gemv(L[4], x, 2 * I, H, R, &s, &sync);
            Epi dn = {0};
            dn.mode = EPI_ADD; dn.y = h; dn.ldy = H; dn.N = H; dn.bias = L[7];
            gemv(L[6], m, H, I, R, &dn, &sync);
        }
        rms_norm_rows(h, d->norm_final, x, R, H, d->eps);
        Epi lo = {0};
        lo.mode = EPI_STORE; lo.y = logits; lo.ldy = d->vocab; lo.N = d->vocab;
        gemv(d->lm_head, x, d->vocab, H, R, &lo, NULL);
    }
    free(scratch);
    return 0;
}

// ---- Sampling distributions (both rows of a pair at once)

typedef struct { double value; int64_t index; } Cand;

static int cand_desc(const void* a, const void* b) {
    const Cand* x = (const Cand*)a;
    const Cand* y = (const Cand*)b;
    if (x->value != y->value) return x->value < y->value ? 1 : -1;
    return x->index < y->index ? -1 : (x->index > y->index);
}

// Row by row: lse[r] = logsumexp(logits[r]) (for log-probs at temperature 1), and probs[r] =
// softmax(logits[r] / temperature) restricted to the smallest set of most likely tokens whose mass
// reaches top_p (a token is dropped when the mass before it already reaches top_p), zero elsewhere.
// Only tokens with p >= (1 - top_p) / V can be kept (the others hold less than 1 - top_p in all), so
// only those are sorted. Returns 0, or -1 when memory runs out.
int engine_sampling_probs(const float* logits, int64_t R, int64_t V, float temperature, float top_p,
                          float* probs, float* lse, int nthreads) {
    int failed = 0;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < R; r++) {
        const float* l = logits + r * V;
        float* p = probs + r * V;
        float mx = -INFINITY;
        for (int64_t j = 0; j < V; j++) if (l[j] > mx) mx = l[j];
        lse[r] = mx + (float)log(sum_exp(l, V, 1.0f, mx, NULL));
        const double z = sum_exp(l, V, 1.0f / temperature, mx / temperature, p);
        if (top_p >= 1.0f) {
            const float inv = (float)(1.0 / z);
            for (int64_t j = 0; j < V; j++) p[j] *= inv;
            continue;
        }
        Cand* c = (Cand*)malloc(V * sizeof(Cand));
        if (!c) { failed = 1; continue; }
        int64_t n = 0;
        // Candidates: tokens with p >= cut, sorted. Once a candidate is dropped, every token outside
        // them (less likely) is dropped too. Cuts: 1e-4 (a few dozen tokens, usually enough), then
        // (1 - top_p) / V (enough: the tokens below it hold less than 1 - top_p), then every token.
        const double cuts[3] = {1e-4 * z, (1.0 - top_p) / (double)V * z, -1.0};
        for (int pass = 0; pass < 3; pass++) {
            n = 0;
            for (int64_t j = 0; j < V; j++) if (p[j] >= cuts[pass]) { c[n].value = p[j] / z; c[n].index = j; n++; }
            qsort(c, n, sizeof(Cand), cand_desc);
            double before = 0.0;
            int64_t kept = 0;
            for (; kept < n; kept++) {
                if (before >= top_p && kept > 0) break;
                before += c[kept].value;
            }
            if (kept < n || pass == 2 || n == V) { n = kept; break; }
        }
        double zk = 0.0;
        for (int64_t i = 0; i < n; i++) zk += p[c[i].index];
        for (int64_t i = 0; i < n; i++) c[i].value = (float)(p[c[i].index] / zk);
        memset(p, 0, V * sizeof(float));
        for (int64_t i = 0; i < n; i++) p[c[i].index] = c[i].value;
        free(c);
    }
    return failed ? -1 : 0;
}
"""


class _Desc(ctypes.Structure):
    _fields_ = [
        ("hidden", ctypes.c_int64), ("heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64), ("inter", ctypes.c_int64), ("vocab", ctypes.c_int64),
        ("n_layers", ctypes.c_int64), ("eps", ctypes.c_float), ("embed_packed", ctypes.c_int64),
        ("embed", ctypes.c_void_p), ("lm_head", ctypes.c_void_p), ("norm_final", ctypes.c_void_p),
        ("rope_cos", ctypes.c_void_p), ("rope_sin", ctypes.c_void_p), ("layers", ctypes.c_void_p),
    ]


_native_lock = threading.Lock()
_native_lib: ctypes.CDLL | None = None
_native_tried = False
_native_error: str | None = None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _native_cache_dir() -> Path:
    if os.environ.get(NATIVE_CACHE_ENV):
        return Path(os.environ[NATIVE_CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rlhf-playground" / "native"


def _compile_native(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        src, out = Path(tmp) / "engine.c", Path(tmp) / target.name
        src.write_text(NATIVE_SOURCE)
        cmd = [compiler, "-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared",
               "-o", str(out), str(src), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(out, target)  # atomic: a concurrent process sees no library or a whole one


def native_library() -> ctypes.CDLL | None:
    """The compiled native kernels, or None where they cannot run here (the reason is logged once)."""
    global _native_lib, _native_tried, _native_error
    with _native_lock:
        if _native_tried:
            return _native_lib
        _native_tried = True
        try:
            if os.environ.get(NATIVE_ENV, "1") == "0":
                raise RuntimeError(f"{NATIVE_ENV}=0")
            if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
                raise RuntimeError(f"{platform.system()}/{platform.machine()} is not x86-64 Linux")
            flags = _cpu_flags().split()
            if "avx512f" not in flags:
                raise RuntimeError("the CPU has no AVX-512")
            key = hashlib.sha256(
                "\0".join([NATIVE_SOURCE, " ".join(sorted(flags)), platform.platform()]).encode()
            ).hexdigest()[:16]
            target = _native_cache_dir() / f"engine-{key}.so"
            if not target.is_file():
                _compile_native(target)
            lib = ctypes.CDLL(str(target))
            if lib.engine_abi() != 5:
                raise RuntimeError("stale native library")
            lib.engine_step.restype = ctypes.c_int
            lib.engine_step.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                        ctypes.c_int]
            lib.engine_gemv.restype = ctypes.c_int
            lib.engine_gemv.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
            lib.engine_sampling_probs.restype = ctypes.c_int
            lib.engine_sampling_probs.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float,
                                                  ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
            _native_lib = lib
        except Exception as exc:  # noqa: BLE001 - any failure means: use the torch backend
            _native_error = str(exc)
            log.info("native decode kernels unavailable (%s); using the torch backend", exc)
        return _native_lib


def native_sampling_probs(logits: torch.Tensor, temperature: float,
                          top_p: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(probs, lse) for CPU float32 logits [rows, V], or None where the native kernels are unavailable.

    probs: softmax(logits / temperature) with the top-p tail zeroed, what
    `filter_top_p(logits / temperature, top_p).softmax(-1)` gives (to float rounding) in a tenth of
    the time; lse: logsumexp of each row of logits, so log-prob(token) = logits[token] - lse.
    """
    lib = native_library()
    if lib is None or logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 2:
        return None
    logits = logits.contiguous()
    rows, vocab = logits.shape
    probs = torch.empty_like(logits)
    lse = torch.empty(rows, dtype=torch.float32)
    rc = lib.engine_sampling_probs(logits.data_ptr(), rows, vocab, float(temperature), float(top_p),
                                   probs.data_ptr(), lse.data_ptr(), SAMPLING_THREADS)
    if rc != 0:
        raise MemoryError("engine_sampling_probs ran out of memory")
    return probs, lse


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
            raise ValueError(f"the native backend cannot run here: {_native_error or 'needs float32 on a CPU'}")
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

    # ---- decoding

    def new_state(self, rows: int, max_total_len: int) -> DecodeState:
        if max_total_len > self.max_positions:
            raise ValueError(f"{max_total_len} positions asked for; the model has {self.max_positions}")
        shape = (len(self.layers), rows, self.kv_heads, max_total_len, self.head_dim)
        keys = torch.empty(shape, device=self.device, dtype=self.dtype)
        values = torch.empty(shape, device=self.device, dtype=self.dtype)
        return DecodeState(keys=keys, values=values, rows=rows, length=0, max_total_len=max_total_len)

    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int], rows: int, max_total_len: int) -> tuple[DecodeState, torch.Tensor]:
        """Run the prompt once and give each of `rows` sequences its cache.

        Returns (state, logits [rows, V] after the prompt's last token); `max_total_len` bounds the
        prompt plus every token decode() will be fed.
        """
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("empty prompt")
        if max_total_len < n:
            raise ValueError(f"max_total_len {max_total_len} is shorter than the prompt ({n})")
        state = self.new_state(rows, max_total_len)
        heads, kv_heads, hd = self.heads, self.kv_heads, self.head_dim
        q_size, kv_size = heads * hd, kv_heads * hd
        ids = torch.tensor(prompt_ids, dtype=torch.long, device=self.device)
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError("a prompt token id is outside the vocabulary")
        h = self._embed_rows(ids)  # [n, hidden]
        rope = self.rope[:n, None, :]
        nqkv, hidden, inter = q_size + 2 * kv_size, self.hidden, self.intermediate
        for i, L in enumerate(self.layers):
            x = _rms_norm(h, L.norm_attn, self.eps)
            qkv = self._matmul(x, L.qkv, nqkv, L.b_qkv).contiguous()
            qk = _apply_rope(qkv[:, : q_size + kv_size].reshape(n, heads + kv_heads, hd), rope)
            q = qk[:, :heads].transpose(0, 1)  # [heads, n, hd]
            k = qk[:, heads:].transpose(0, 1)  # [kv_heads, n, hd]
            v = qkv[:, q_size + kv_size:].reshape(n, kv_heads, hd).transpose(0, 1)
            state.keys[i, :, :, :n] = k
            state.values[i, :, :, :n] = v
            a = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=1.0,
                                               enable_gqa=heads != kv_heads)  # the scale is in the q weights
            h = h + self._matmul(a[0].transpose(0, 1).reshape(n, q_size), L.o, hidden, L.b_o)
            x = _rms_norm(h, L.norm_mlp, self.eps)
            g, u = self._matmul(x, L.gate_up, 2 * inter, L.b_gate_up, gate_up=True).split(inter, dim=-1)
            h = h + self._matmul(F.silu(g) * u, L.down, hidden, L.b_down)
        state.length = n
        x = _rms_norm(h[-1:], self.norm_final, self.eps)
        if self.packed:
            logits = self._native_gemv(self.lm_head, x, self.vocab_size)
        else:
            logits = F.linear(x, self.lm_head)
        return state, logits.float().expand(rows, -1).contiguous()

    @torch.inference_mode()
    def decode(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (LongTensor [rows]); returns the next logits [rows, V]."""
        pos = state.length
        if pos >= state.max_total_len:
            raise ValueError(f"the cache is full ({state.max_total_len} positions)")
        if tokens.shape != (state.rows,):
            raise ValueError(f"expected {state.rows} tokens, got shape {tuple(tokens.shape)}")
        if self._lib is not None:
            tokens = tokens.to(device="cpu", dtype=torch.int64).contiguous()
            logits = torch.empty(state.rows, self.vocab_size, dtype=torch.float32)
            rc = self._lib.engine_step(ctypes.addressof(self._desc), tokens.data_ptr(), state.rows, pos,
                                       state.keys.data_ptr(), state.values.data_ptr(), state.max_total_len,
                                       logits.data_ptr(), torch.get_num_threads())
            if rc != 0:
                raise RuntimeError(f"engine_step failed ({rc}): " + ("a token id is outside the vocabulary"
                                                                      if rc == -2 else "bad arguments"))
            state.length = pos + 1
            return logits
        return self._decode_torch(state, tokens)

    def _decode_torch(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        pos, rows = state.length, state.rows
        heads, kv_heads, hd = self.heads, self.kv_heads, self.head_dim
        q_size, kv_size = heads * hd, kv_heads * hd
        group = heads // kv_heads
        end = pos + 1
        eps = self.eps
        h = self._embed_rows(tokens.to(self.device))  # [rows, hidden]
        rope = self.rope[pos]
        keys, values = state.keys[:, :, :, :end], state.values[:, :, :, :end]
        for i, L in enumerate(self.layers):
            x = _rms_norm(h, L.norm_attn, eps)
            qkv = _linear(x, L.qkv, L.b_qkv).contiguous()
            qk = _apply_rope(qkv[:, : q_size + kv_size].reshape(rows, heads + kv_heads, hd), rope)
            K, V = keys[i], values[i]
            K[:, :, pos] = qk[:, heads:]
            V[:, :, pos] = qkv[:, q_size + kv_size:].reshape(rows, kv_heads, hd)
            q = qk[:, :heads].reshape(rows, kv_heads, group, hd)
            scores = torch.matmul(q, K.transpose(-1, -2))  # [rows, kv_heads, group, end]
            probs = scores.softmax(-1, dtype=torch.float32).to(scores.dtype)  # float32, as HF
            a = torch.matmul(probs, V).reshape(rows, q_size)
            h = h + _linear(a, L.o, L.b_o)
            x = _rms_norm(h, L.norm_mlp, eps)
            g, u = _linear(x, L.gate_up, L.b_gate_up).split(self.intermediate, dim=-1)
            h = h + _linear(F.silu(g) * u, L.down, L.b_down)
        state.length = end
        x = _rms_norm(h, self.norm_final, eps)
        return _linear(x, self.lm_head).float()
