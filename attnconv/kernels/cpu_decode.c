// CPU decode kernels (AVX2 + FMA, float32): a Linear layer for a few rows, and grouped-query attention scores.
// Built on first use by cpu_decode.py and called through ctypes.
//
// A decode step multiplies a handful of rows (the batch) by every weight: it should run at memory bandwidth.
// BLAS (MKL sgemm, oneDNN) is built for many rows and reaches about half of it here. This loop reads each weight
// row exactly once, as a stream, and keeps all partial sums in registers. OpenMP: linked as libgomp.so.1, which
// resolves to the runtime torch has already loaded, so the kernel shares torch's threads and thread count.
#include <immintrin.h>
#include <stdint.h>

#include "simd8.h"

#define PREFETCH_FLOATS 1024  // 4 KiB ahead in a weight row: 2-4 rows of a typical hidden size


// y [M, N] = x [M, K] @ w [N, K]^T (+ bias [N]), 1 <= M <= 8; x, w, y contiguous.
// One pass over w: each row of w is loaded once and multiplied into all M rows of x (which stay in L1/L2).
void attnconv_linear_rows(const float *x, int64_t M, int64_t K, const float *w, const float *bias, float *y,
                          int64_t N) {
  const float *xr[8];
  for (int m = 0; m < 8; m++) xr[m] = x + (m < M ? m : 0) * K;  // missing rows repeat row 0; results dropped
  const int64_t K8 = K & ~(int64_t)7;
#pragma omp parallel for schedule(static) if (N * K >= 65536)
  for (int64_t j = 0; j < N; j++) {
    const float *wr = w + j * K;
    float out[8];
    _mm256_storeu_ps(out, dot8(wr, xr, K8, wr + PREFETCH_FLOATS));
    for (int64_t k = K8; k < K; k++)
      for (int m = 0; m < 8; m++) out[m] += wr[k] * xr[m][k];
    const float b = bias ? bias[j] : 0.0f;
    for (int64_t m = 0; m < M; m++) y[m * N + j] = out[m] + b;
  }
}

// Decode attention scores for grouped-query heads: s [B, H, G, L] = scale * q [B, H, G, D] . k [B, H, L, D];
// q and s contiguous, k rows with strides (kb, kh, kl, 1); D % 8 == 0. BLAS runs these G-row products (G = query
// heads per KV head, 2-12) at 4-7 GB/s; here eight keys at a time are dotted with each query head, the eight sums
// ending in one hsum8, while the eight key rows (8 x D floats) stay in L1 for all G heads: 11-14 GB/s.
void attnconv_decode_scores(const float *q, const float *k, float *s, int64_t B, int64_t H, int64_t G, int64_t D,
                            int64_t L, int64_t kb, int64_t kh, int64_t kl, float scale) {
  const int64_t blocks = (L + 7) / 8, per_item = 32;  // 256 keys per work item
  const int64_t items = (blocks + per_item - 1) / per_item;
  const __m256 sc = _mm256_set1_ps(scale);
#pragma omp parallel for schedule(static) collapse(2)
  for (int64_t bh = 0; bh < B * H; bh++) {
    for (int64_t it = 0; it < items; it++) {
      const float *qh = q + bh * G * D, *khd = k + (bh / H) * kb + (bh % H) * kh;
      float *sh = s + bh * G * L;
      const int64_t end = (it + 1) * per_item < blocks ? (it + 1) * per_item : blocks;
      for (int64_t blk = it * per_item; blk < end; blk++) {
        const int64_t t0 = blk * 8, n = L - t0 < 8 ? L - t0 : 8;
        const float *r[8];
        for (int i = 0; i < 8; i++) r[i] = khd + (t0 + (i < n ? i : 0)) * kl;  // a short last block repeats key t0
        for (int64_t g = 0; g < G; g++) {
          float out[8];
          _mm256_storeu_ps(out, _mm256_mul_ps(dot8(qh + g * D, r, D, NULL), sc));
          for (int64_t i = 0; i < n; i++) sh[g * L + t0 + i] = out[i];
        }
      }
    }
  }
}
