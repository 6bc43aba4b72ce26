// One decode step of a Llama-family model for a few rows: float32, AVX-512, OpenMP.
// The rows may belong to different requests, each at its own position in its own KV cache: the step
// reads the weights once for all of them. Each row is computed by the same instructions in the same
// order whatever its neighbours (rows are independent in every phase, see gemv_block), so a request's
// logits are bit-identical whether it is decoded alone or in a batch.
// Weights are packed in blocks of NB rows x LANES columns ([N/NB][K/LANES][NB][LANES]) so that each
// thread streams them linearly. A layer is five phases with a barrier after each: q/k/v (with RoPE and
// the cache writes in the epilogue), attention, o (added to the residual), gate/up (SwiGLU in the
// epilogue: each block holds 4 gate rows then the 4 matching up rows), down (added to the residual).
// Each row may carry its own LoRA adapter (Punica / S-LoRA): the base weights are read once for all rows,
// and a row's low-rank update B (A x) is added in the epilogue, before RoPE, SwiGLU or the residual add.
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

// One LoRA adapter in the engine's layout. Per layer and fused matrix (qkv, o, gate/up, down: LORA_*)
// a pair A [segs * rank, K], B [N, rank], row-major, both NULL where the adapter leaves that matrix alone.
// A fused matrix has one segment per module it fuses (q, k, v: 3; gate, up: 2); B's row n multiplies the
// rank entries of t = A x that belong to row n's module. B's rows are in the packed matrix's row order
// (q and k permuted for RoPE, gate/up interleaved by 4). A and B hold the adapter's own values, no
// scale folded in, so that a bfloat16 adapter is kept as bfloat16 exactly (half the memory of float32):
// the LoRA scaling (and for q the attention's 1/sqrt(head_dim)) multiplies t instead.
typedef struct {
    int64_t rank;
    const void* const* mats;  // [n_layers][LORA_MATS][2]: a, b; float, or uint16 bfloat16 when bf16
    int64_t bf16;
    float scale;    // alpha / r
    float q_scale;  // alpha / r / sqrt(head_dim): the q segment of LORA_QKV
} Lora;

enum { LORA_QKV = 0, LORA_O = 1, LORA_GATE_UP = 2, LORA_DOWN = 3, LORA_MATS = 4 };
static const int64_t LORA_SEGS[LORA_MATS] = {3, 1, 2, 1};

enum { EPI_STORE = 0, EPI_ADD = 1, EPI_QKV = 2, EPI_SWIGLU = 3 };

typedef struct {
    int mode;
    float* y;  // output [R, ldy] (STORE, ADD, SWIGLU: [R, ldy] with ldy the intermediate size)
    int64_t ldy, N;
    const float* bias;
    // EPI_QKV: row r's k and v go to its own cache at its own position pos[r], rotated by that
    // position's angles (see engine_step_rows for the layout)
    int64_t nq, nk, head_dim, kv_heads, layer;
    const int64_t *pos, *layer_stride, *tmax;
    const float *rope_cos, *rope_sin;  // [max_positions, head_dim / 2]
    float* const* keys;
    float* const* values;
    // LoRA: lora[r] is row r's adapter (NULL: none; lora itself NULL: no row has one); slot is this
    // matrix's LORA_* index; t [R, t_stride] holds each row's A x (lora_shrink, before the gemv).
    const Lora* const* lora;
    int64_t slot;
    float* t;
    int64_t t_stride;
} Epi;

int engine_abi(void) { return 8; }

static inline const void* lora_mat(const Lora* a, int64_t layer, int64_t slot, int which) {
    return a->mats[(layer * LORA_MATS + slot) * 2 + which];
}

// sum of a[j] * b[j] for j < n: LANES at a time, the tail masked (the same order for any row).
static inline float dot(const float* a, const float* b, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += LANES) {
        const __mmask16 m = n - j >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + j), _mm512_maskz_loadu_ps(m, b + j), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

// dot() with a in bfloat16: a bfloat16 is the top half of a float32, so widening is a 16-bit shift.
static inline float dot_bf16(const uint16_t* a, const float* b, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += LANES) {
        const __mmask16 m = n - j >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
        const __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, a + j)), 16);
        acc = _mm512_fmadd_ps(_mm512_castsi512_ps(wide), _mm512_maskz_loadu_ps(m, b + j), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

static inline float lora_dot(const Lora* a, const void* m, int64_t offset, const float* b, int64_t n) {
    return a->bf16 ? dot_bf16((const uint16_t*)m + offset, b, n) : dot((const float*)m + offset, b, n);
}

// t_r = A_r x_r for every row with an adapter on this matrix. Every thread computes all rows into its
// own t (rank-sized work, ~3% of the matrix's): cheaper than a barrier, as for rms_norm_rows.
static void lora_shrink(const Epi* e, const float* X, int64_t K, int64_t R, float* t) {
    if (!e->lora) return;
    for (int64_t r = 0; r < R; r++) {
        const Lora* a = e->lora[r];
        if (!a) continue;
        const void* A = lora_mat(a, e->layer, e->slot, 0);
        if (!A) continue;
        for (int64_t j = 0; j < LORA_SEGS[e->slot] * a->rank; j++) {
            const float scale = e->slot == LORA_QKV && j < a->rank ? a->q_scale : a->scale;
            t[r * e->t_stride + j] = scale * lora_dot(a, A, j * K, X + r * K, K);
        }
    }
}

// v[b] += B[n0 + b] . t_r (the part of t_r of row n0 + b's module).
static inline void lora_expand(const Epi* e, int64_t r, int64_t n0, float* v) {
    const Lora* a = e->lora[r];
    const void* B = lora_mat(a, e->layer, e->slot, 1);
    if (!B) return;
    const int64_t rank = a->rank;
    const float* t = e->t + r * e->t_stride;
    for (int64_t b = 0; b < NB && n0 + b < e->N; b++) {
        int64_t seg = 0;
        if (e->mode == EPI_QKV) seg = n0 < e->nq ? 0 : n0 < e->nq + e->nk ? 1 : 2;  // blocks never straddle
        else if (e->mode == EPI_SWIGLU) seg = b < NB / 2 ? 0 : 1;  // 4 gate rows, then 4 up rows
        v[b] += lora_dot(a, B, (n0 + b) * rank, t + seg * rank, rank);
    }
}

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
    if (e->lora && e->lora[r]) lora_expand(e, r, n0, v);
    switch (e->mode) {
    case EPI_STORE: case EPI_ADD: {
        float* y = e->y + r * e->ldy + n0;
        int64_t m = e->N - n0 < NB ? e->N - n0 : NB;
        if (e->mode == EPI_ADD) for (int64_t b = 0; b < m; b++) y[b] += v[b];
        else for (int64_t b = 0; b < m; b++) y[b] = v[b];
        break;
    }
    case EPI_QKV: {
        const int64_t hd = e->head_dim, pos = e->pos[r];
        if (n0 < e->nq + e->nk) {  // q or k: rotate the pairs (dims 2i, 2i+1 of a head)
            const float* cosv = e->rope_cos + pos * (hd / 2);
            const float* sinv = e->rope_sin + pos * (hd / 2);
            for (int b = 0; b < NB; b += 2) {
                const int64_t i = ((n0 + b) % hd) / 2;
                const float a = v[b], c = v[b + 1];
                v[b] = a * cosv[i] - c * sinv[i];
                v[b + 1] = c * cosv[i] + a * sinv[i];
            }
        }
        float* dst;
        if (n0 < e->nq) {
            dst = e->y + r * e->ldy + n0;
        } else {
            const int64_t off = n0 < e->nq + e->nk ? n0 - e->nq : n0 - e->nq - e->nk;
            float* cache = (n0 < e->nq + e->nk ? e->keys[r] : e->values[r]) + e->layer * e->layer_stride[r];
            dst = cache + ((off / hd) * e->tmax[r] + pos) * hd + off % hd;
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

// Rows go two at a time (each weight block read once per pair) with the odd one out alone, but a
// row's sums are the same FMAs in the same order either way (a0 and a1 never mix), so where a row
// falls in a batch does not change its result.
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
// With LoRA rows, e->t is this thread's scratch for their A x.
static void gemv(const float* W, const float* X, int64_t N, int64_t K, int64_t R, const Epi* e, Sync* sync) {
    lora_shrink(e, X, K, R, e->t);
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

// Row r, kv head j: K and V are this layer's cache of row r [kv_heads, tmax, head_dim], T its filled positions.
static void attention(const float* q_all, const float* K, const float* V, float* att, float* sc, int64_t r,
                      int64_t j, int64_t T, const Desc* d, int64_t nqkv, int64_t tmax) {
    const int64_t hd = d->head_dim, group = d->heads / d->kv_heads;
    const float* Kr = K + j * tmax * hd;
    const float* Vr = V + j * tmax * hd;
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

// One step for R rows, row r at its own position pos[r] of its own cache: keys[r] (values[r]) points at
// row r's layer-0 cache [kv_heads, tmax[r], head_dim], and layer l's at keys[r] + l * layer_stride[r]
// (floats). Rows of one request share layer_stride and tmax; rows of different requests need not.
// lora[r]: row r's adapter, NULL for the base model (lora itself may be NULL: no adapters).
// tokens[R]; logits [R, vocab]. Returns 0; -1 for bad arguments (pos[r] outside [0, tmax[r]), an adapter
// of rank < 1), -2 for a token outside the vocabulary, -3 when memory runs out; nothing is written unless
// it returns 0.
int engine_step_rows(const Desc* d, const int64_t* tokens, int64_t R, const int64_t* pos, float* const* keys,
                     float* const* values, const int64_t* layer_stride, const int64_t* tmax,
                     const Lora* const* lora, float* logits, int nthreads) {
    const int64_t H = d->hidden, nh = d->heads, nkv = d->kv_heads, hd = d->head_dim, I = d->inter;
    const int64_t nq = nh * hd, nk = nkv * hd, nqkv = nq + 2 * nk;
    if (R < 1 || nthreads < 1) return -1;
    int64_t T_max = 0;  // the longest attention span, for the scores scratch
    for (int64_t r = 0; r < R; r++) {
        if (pos[r] < 0 || pos[r] >= tmax[r] || !keys[r] || !values[r]) return -1;
        if (pos[r] + 1 > T_max) T_max = pos[r] + 1;
    }
    int64_t rank_max = 0;  // t's row stride: LORA_SEGS at most 3 segments of the largest rank
    for (int64_t r = 0; lora && r < R; r++) {
        if (!lora[r]) continue;
        if (lora[r]->rank < 1 || !lora[r]->mats) return -1;
        if (lora[r]->rank > rank_max) rank_max = lora[r]->rank;
    }
    const int64_t t_stride = 3 * rank_max;
    for (int64_t r = 0; r < R; r++) if (tokens[r] < 0 || tokens[r] >= d->vocab) return -2;
    const int64_t kmax = H > I ? H : I;
    // Shared: h [R, H], q [R, nqkv], att [R, nq], m [R, I]; per thread: x [R, H], scores [T_max] and
    // the LoRA t [R, t_stride].
    const size_t shared = R * (H + nqkv + nq + I), per_thread = R * kmax + T_max + R * t_stride + LANES;
    float* scratch = (float*)aligned_alloc(64, ((shared + nthreads * per_thread) * sizeof(float) + 63) / 64 * 64);
    if (!scratch) return -3;
    float* h = scratch;
    float* q = h + R * H;
    float* att = q + R * nqkv;
    float* m = att + R * nq;
    for (int64_t r = 0; r < R; r++) embed_row(d, tokens[r], h + r * H);

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
        float* t = sc + T_max;
        // The LoRA fields of every matrix's epilogue (lm_head has none).
        Epi base = {0};
        base.lora = rank_max ? lora : NULL; base.t = t; base.t_stride = t_stride;
        for (int64_t l = 0; l < d->n_layers; l++) {
            const float* const* L = d->layers + l * 10;
            // Every thread normalizes the rows itself (cheaper than a barrier).
            rms_norm_rows(h, L[8], x, R, H, d->eps);
            Epi e = base;
            e.slot = LORA_QKV;
            e.mode = EPI_QKV; e.y = q; e.ldy = nqkv; e.N = nqkv; e.bias = L[1];
            e.nq = nq; e.nk = nk; e.head_dim = hd; e.kv_heads = nkv; e.layer = l;
            e.pos = pos; e.layer_stride = layer_stride; e.tmax = tmax;
            e.rope_cos = d->rope_cos; e.rope_sin = d->rope_sin; e.keys = keys; e.values = values;
            gemv(L[0], x, nqkv, H, R, &e, &sync);
            int64_t lo, hi;
            share(R * nkv, &lo, &hi);
            for (int64_t t = lo; t < hi; t++) {
                const int64_t r = t / nkv;
                attention(q, keys[r] + l * layer_stride[r], values[r] + l * layer_stride[r], att, sc, r, t % nkv,
                          pos[r] + 1, d, nqkv, tmax[r]);
            }
            sync_wait(&sync);
            Epi o = base;
            o.slot = LORA_O; o.layer = l;
            o.mode = EPI_ADD; o.y = h; o.ldy = H; o.N = H; o.bias = L[3];
            gemv(L[2], att, H, nq, R, &o, &sync);
            rms_norm_rows(h, L[9], x, R, H, d->eps);
            Epi s = base;
            s.slot = LORA_GATE_UP; s.layer = l;
            s.mode = EPI_SWIGLU; s.y = m; s.ldy = I; s.N = 2 * I; s.bias = L[5];
            gemv(L[4], x, 2 * I, H, R, &s, &sync);
            Epi dn = base;
            dn.slot = LORA_DOWN; dn.layer = l;
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

// The rows of one request, all at position pos: keys/values [n_layers, R, kv_heads, tmax, head_dim].
int engine_step(const Desc* d, const int64_t* tokens, int64_t R, int64_t pos, float* keys, float* values,
                int64_t tmax, float* logits, int nthreads) {
    if (R < 1) return -1;
    // Per row: pos, layer stride, tmax, then the key and value pointers.
    int64_t* ints = (int64_t*)malloc(3 * R * sizeof(int64_t));
    float** ptrs = (float**)malloc(2 * R * sizeof(float*));
    int rc = -3;
    if (ints && ptrs) {
        const int64_t row = d->kv_heads * tmax * d->head_dim;
        for (int64_t r = 0; r < R; r++) {
            ints[r] = pos;
            ints[R + r] = R * row;
            ints[2 * R + r] = tmax;
            ptrs[r] = keys + r * row;
            ptrs[R + r] = values + r * row;
        }
        rc = engine_step_rows(d, tokens, R, ints, ptrs, ptrs + R, ints + R, ints + 2 * R, NULL, logits, nthreads);
    }
    free(ints);
    free(ptrs);
    return rc;
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
