// Fused MLA decode attention over a latent cache (AVX2 + FMA, float32), built by native.py, called by cpu_mla.py.
//
// Every head reads the same cached row per token, [latent (R); RoPE key (D - R)]. Absorbed MLA makes a step
// compute-bound on a CPU: per token and layer H x (2R + D - R) multiply-adds over R + (D - R) floats read, ~5 per
// byte. Done as separate passes (scores kernel, softmax, BLAS for the values) the rows come from DRAM twice and each
// pass waits on memory; here one work item takes CHUNK keys of one sequence and does everything while they are in
// L1/L2: the scores of all H heads (eight keys at a time, each row loaded once for all heads), the softmax against
// the chunk's own maximum, and the probabilities times the latent columns, four heads by sixteen (AVX-512: sixty-four)
// columns in registers. The chunks' partial results are merged at the end (flash-decoding). Rows further on are
// prefetched while a block is computed. Compiled for AVX2; the AVX-512 variants (target attributes, twice the
// multiply-adds per instruction) run where the CPU reports AVX-512F/DQ.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "simd8.h"

#define CHUNK 256  // keys per work item: the chunk's rows (256 x 768 B for R + d_r = 192) stay in L2
#ifndef AHEAD
#define AHEAD 16  // rows prefetched ahead of the block being computed
#endif
#define AVX512 __attribute__((target("avx512f,avx512dq,avx2,fma")))

static inline __m256 dot8_256(const float *v, const float *const r[8], int64_t n) { return dot8(v, r, n, NULL); }

// [v . r[i] for i = 0..7] over n floats (n % 16 == 0), sixteen lanes at a time.
AVX512 static inline __m256 dot8_512(const float *v, const float *const r[8], int64_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (int64_t k = 0; k < n; k += 16) {
    __m512 x = _mm512_loadu_ps(v + k);
    a0 = _mm512_fmadd_ps(x, _mm512_loadu_ps(r[0] + k), a0);
    a1 = _mm512_fmadd_ps(x, _mm512_loadu_ps(r[1] + k), a1);
    a2 = _mm512_fmadd_ps(x, _mm512_loadu_ps(r[2] + k), a2);
    a3 = _mm512_fmadd_ps(x, _mm512_loadu_ps(r[3] + k), a3);
    a4 = _mm512_fmadd_ps(x, _mm512_loadu_ps(r[4] + k), a4);
    a5 = _mm512_fmadd_ps(x, _mm512_loadu_ps(r[5] + k), a5);
    a6 = _mm512_fmadd_ps(x, _mm512_loadu_ps(r[6] + k), a6);
    a7 = _mm512_fmadd_ps(x, _mm512_loadu_ps(r[7] + k), a7);
  }
#define HALVES(a) _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1))
  return hsum8(HALVES(a0), HALVES(a1), HALVES(a2), HALVES(a3), HALVES(a4), HALVES(a5), HALVES(a6), HALVES(a7));
#undef HALVES
}

// Scores of one chunk: s[h * CHUNK + j] = scale * q[h] . row[j] (+ extra[h * el + j]), -inf where keep[j] == 0.
// The eight rows AHEAD rows on from the current block are prefetched before its head loop.
#define CHUNK_SCORES(NAME, DOT, ATTR)                                                                                \
  ATTR static void NAME(const float *q, const float *rows, int64_t rl, const uint8_t *keep, const float *extra,      \
                        int64_t el, int64_t H, int64_t D, int64_t n, int64_t ahead, float scale, float *s) {         \
    const __m256 sc = _mm256_set1_ps(scale);                                                                         \
    for (int64_t t0 = 0; t0 < n; t0 += 8) {                                                                          \
      const int64_t m = n - t0 < 8 ? n - t0 : 8;                                                                     \
      const float *r[8];                                                                                             \
      for (int i = 0; i < 8; i++) r[i] = rows + (t0 + (i < m ? i : 0)) * rl; /* a short block repeats key t0 */     \
      for (int64_t i = t0 + AHEAD; i < t0 + AHEAD + 8 && i < ahead; i++)                                             \
        for (int64_t k = 0; k < D; k += 16) _mm_prefetch((const char *)(rows + i * rl + k), _MM_HINT_T0);            \
      for (int64_t h = 0; h < H; h++) {                                                                              \
        float out[8];                                                                                                \
        _mm256_storeu_ps(out, _mm256_mul_ps(DOT(q + h * D, r, D), sc));                                              \
        for (int64_t i = 0; i < m; i++) s[h * CHUNK + t0 + i] = out[i];                                              \
      }                                                                                                              \
    }                                                                                                                \
    for (int64_t h = 0; h < H; h++)                                                                                  \
      for (int64_t j = 0; j < n; j++) {                                                                              \
        if (extra) s[h * CHUNK + j] += extra[h * el + j];                                                            \
        if (keep && !keep[j]) s[h * CHUNK + j] = -INFINITY;                                                          \
      }                                                                                                              \
  }
CHUNK_SCORES(chunk_scores, dot8_256, )
CHUNK_SCORES(chunk_scores_512, dot8_512, AVX512)

// Per head, in place: s = exp(s - max) over the chunk; stats[h] = (max, sum). A fully masked head: (-inf, 0).
static void chunk_softmax(float *s, int64_t H, int64_t n, float *stats) {
  for (int64_t h = 0; h < H; h++) {
    float *sh = s + h * CHUNK, peak = -INFINITY, total = 0.0f;
    for (int64_t j = 0; j < n; j++) peak = sh[j] > peak ? sh[j] : peak;
    for (int64_t j = n; j < (n + 7) / 8 * 8; j++) sh[j] = -INFINITY;  // lanes past the end give exp = 0
    if (peak == -INFINITY) {
      for (int64_t j = 0; j < n; j++) sh[j] = 0.0f;
    } else {
      const __m256 pk = _mm256_set1_ps(peak);
      __m256 acc = _mm256_setzero_ps();
      for (int64_t j = 0; j < n; j += 8) {
        __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(sh + j), pk));
        _mm256_storeu_ps(sh + j, e);
        acc = _mm256_add_ps(acc, e);
      }
      float lanes[8];
      _mm256_storeu_ps(lanes, acc);
      for (int i = 0; i < 8; i++) total += lanes[i];
    }
    stats[2 * h] = peak;
    stats[2 * h + 1] = total;
  }
}

// acc[h * R + c] = sum_j p[h * CHUNK + j] * rows[j * rl + c], c < R (R % 8 == 0): four heads by sixteen columns in
// eight registers; the sixteen-column stripe of the chunk's rows is reused by every group of four heads from L1.
static void chunk_values(const float *p, const float *rows, int64_t rl, int64_t H, int64_t R, int64_t n, float *acc) {
  for (int64_t c = 0; c < R; c += 16) {
    const int wide = R - c >= 16;
    for (int64_t h0 = 0; h0 < H; h0 += 4) {
      const float *ph[4];
      for (int i = 0; i < 4; i++) ph[i] = p + (h0 + i < H ? h0 + i : h0) * CHUNK;  // missing heads repeat h0
      __m256 a[8];
      for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
      for (int64_t j = 0; j < n; j++) {
        const float *row = rows + j * rl + c;
        __m256 x0 = _mm256_loadu_ps(row), x1 = wide ? _mm256_loadu_ps(row + 8) : _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
          __m256 w = _mm256_broadcast_ss(ph[i] + j);
          a[2 * i] = _mm256_fmadd_ps(w, x0, a[2 * i]);
          a[2 * i + 1] = _mm256_fmadd_ps(w, x1, a[2 * i + 1]);
        }
      }
      for (int i = 0; i < 4 && h0 + i < H; i++) {
        _mm256_storeu_ps(acc + (h0 + i) * R + c, a[2 * i]);
        if (wide) _mm256_storeu_ps(acc + (h0 + i) * R + c + 8, a[2 * i + 1]);
      }
    }
  }
}

// chunk_values with sixteen-lane registers: four heads by sixty-four columns in sixteen registers, the last
// columns masked.
AVX512 static void chunk_values_512(const float *p, const float *rows, int64_t rl, int64_t H, int64_t R, int64_t n,
                                    float *acc) {
  for (int64_t c = 0; c < R; c += 64) {
    __mmask16 mask[4];
    for (int v = 0; v < 4; v++) {
      const int64_t left = R - c - 16 * v;
      mask[v] = left >= 16 ? (__mmask16)0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : (__mmask16)0;
    }
    for (int64_t h0 = 0; h0 < H; h0 += 4) {
      const float *ph[4];
      for (int i = 0; i < 4; i++) ph[i] = p + (h0 + i < H ? h0 + i : h0) * CHUNK;
      __m512 a[16];
      for (int i = 0; i < 16; i++) a[i] = _mm512_setzero_ps();
      for (int64_t j = 0; j < n; j++) {
        const float *row = rows + j * rl + c;
        __m512 x[4];
        for (int v = 0; v < 4; v++) x[v] = _mm512_maskz_loadu_ps(mask[v], row + 16 * v);
        for (int i = 0; i < 4; i++) {
          __m512 w = _mm512_set1_ps(ph[i][j]);
          for (int v = 0; v < 4; v++) a[4 * i + v] = _mm512_fmadd_ps(w, x[v], a[4 * i + v]);
        }
      }
      for (int i = 0; i < 4 && h0 + i < H; i++)
        for (int v = 0; v < 4; v++) _mm512_mask_storeu_ps(acc + (h0 + i) * R + c + 16 * v, mask[v], a[4 * i + v]);
    }
  }
}

// Whether this CPU runs the AVX-512 variants (asked once).
int attnconv_mla_has_avx512(void) {
  static int has = -1;
  if (has < 0) {
    __builtin_cpu_init();
    has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  }
  return has;
}

typedef struct {  // one call's arguments, as attnconv_mla_decode documents them
  const float *q, *rows, *extra;
  const uint8_t *keep;
  int64_t rb, rl, kb, B, H, D, R, L, chunks;
  float scale, *scores, *parts, *out;
  int zmm, zmm_scores;
} Job;

// Chunk c of sequence b: its part [H, R] of probabilities times latent, then (max, sum) per head.
static void run_chunk(const Job *j, int64_t b, int64_t c) {
  const int64_t H = j->H, R = j->R, t0 = c * CHUNK, n = j->L - t0 < CHUNK ? j->L - t0 : CHUNK;
  float *s = j->scores + (b * j->chunks + c) * H * CHUNK, *part = j->parts + (b * j->chunks + c) * H * (R + 2);
  const float *rows = j->rows + b * j->rb + t0 * j->rl, *q = j->q + b * H * j->D;
  const uint8_t *k = j->keep ? j->keep + b * j->kb + t0 : NULL;
  const float *e = j->extra ? j->extra + b * H * j->L + t0 : NULL;
  const int64_t ahead = j->L - t0;  // rows left in this sequence: the prefetch may run into the next chunk
  if (j->zmm_scores)
    chunk_scores_512(q, rows, j->rl, k, e, j->L, H, j->D, n, ahead, j->scale, s);
  else
    chunk_scores(q, rows, j->rl, k, e, j->L, H, j->D, n, ahead, j->scale, s);
  chunk_softmax(s, H, n, part + H * R);
  if (j->zmm)
    chunk_values_512(s, rows, j->rl, H, R, n, part);
  else
    chunk_values(s, rows, j->rl, H, R, n, part);
}

// out[b, h] = sum_c exp(max_c - max) part_c / sum_c exp(max_c - max) total_c over the chunks of sequence b.
static void merge(const Job *j, int64_t b, int64_t h) {
  const int64_t H = j->H, R = j->R, width = H * (R + 2);
  const float *parts = j->parts + b * j->chunks * width;
  float peak = -INFINITY, total = 0.0f, *o = j->out + (b * H + h) * R;
  for (int64_t c = 0; c < j->chunks; c++) {
    const float m = parts[c * width + H * R + 2 * h];
    peak = m > peak ? m : peak;
  }
  for (int64_t k = 0; k < R; k++) o[k] = 0.0f;
  for (int64_t c = 0; c < j->chunks; c++) {
    const float *part = parts + c * width;
    const float m = part[H * R + 2 * h];
    if (m == -INFINITY) continue;
    const float w = expf(m - peak);
    total += w * part[H * R + 2 * h + 1];
    for (int64_t k = 0; k < R; k++) o[k] += w * part[h * R + k];
  }
  const float inv = total > 0.0f ? 1.0f / total : NAN;  // every key masked: NaN, as softmax over all -inf
  for (int64_t k = 0; k < R; k++) o[k] *= inv;
}

// out [B, H, R] = softmax(scale * q . rows^T + extra, masked) @ rows[..., :R].
// q [B, H, D] contiguous; rows [B, L, D] with strides (rb, rl, 1); keep [B, L] bytes with stride kb, or NULL;
// extra [B, H, L] contiguous, or NULL; D % 8 == 0, R % 8 == 0, R <= D. Workspace: scores [B, chunks, H, CHUNK]
// and parts [B, chunks, H, R + 2] floats (chunks = ceil(L / CHUNK)). wide: use AVX-512 where the CPU has it
// (its scores need D % 16 == 0); 0 keeps to AVX2. With at least as many sequences as threads each thread takes
// whole sequences and merges them itself: one parallel region (a barrier costs a time slice on a busy machine).
void attnconv_mla_decode(const float *q, const float *rows, int64_t rb, int64_t rl, const uint8_t *keep, int64_t kb,
                         const float *extra, int64_t B, int64_t H, int64_t D, int64_t R, int64_t L, float scale,
                         float *scores, float *parts, float *out, int wide) {
  const int zmm = wide && attnconv_mla_has_avx512();
  const Job j = {q, rows, extra, keep, rb, rl, kb, B, H, D, R, L, (L + CHUNK - 1) / CHUNK, scale, scores, parts,
                 out, zmm, zmm && D % 16 == 0};
  if (B >= omp_get_max_threads()) {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < B; b++) {
      for (int64_t c = 0; c < j.chunks; c++) run_chunk(&j, b, c);
      for (int64_t h = 0; h < H; h++) merge(&j, b, h);
    }
    return;
  }
#pragma omp parallel
  {
#pragma omp for schedule(static) collapse(2)
    for (int64_t b = 0; b < B; b++)
      for (int64_t c = 0; c < j.chunks; c++) run_chunk(&j, b, c);
#pragma omp for schedule(static) collapse(2)
    for (int64_t b = 0; b < B; b++)
      for (int64_t h = 0; h < H; h++) merge(&j, b, h);
  }
}
