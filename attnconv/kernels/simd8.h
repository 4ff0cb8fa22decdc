// AVX2 + FMA helpers shared by attnconv's C kernels (included; every function static inline).
#ifndef ATTNCONV_SIMD8_H
#define ATTNCONV_SIMD8_H
#include <immintrin.h>
#include <stdint.h>

// The eight lanes' sums of a0..a7, as one vector [sum(a0), ..., sum(a7)].
static inline __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                           __m256 a7) {
  __m256 s01 = _mm256_hadd_ps(a0, a1), s23 = _mm256_hadd_ps(a2, a3);
  __m256 s45 = _mm256_hadd_ps(a4, a5), s67 = _mm256_hadd_ps(a6, a7);
  __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// [sum_k v[k] * r[i][k] for i = 0..7] over k in [0, n), n a multiple of 8: v is loaded once per step and
// multiplied into all eight rows, each row's partial sums in its own register. prefetch: where to fetch ahead of
// v (NULL: no prefetch; the branch disappears where the function is inlined).
static inline __m256 dot8(const float *v, const float *const r[8], int64_t n, const float *prefetch) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (int64_t k = 0; k < n; k += 8) {
    if (prefetch) _mm_prefetch((const char *)(prefetch + k), _MM_HINT_T0);
    __m256 x = _mm256_loadu_ps(v + k);
    a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(r[0] + k), a0);
    a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(r[1] + k), a1);
    a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(r[2] + k), a2);
    a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(r[3] + k), a3);
    a4 = _mm256_fmadd_ps(x, _mm256_loadu_ps(r[4] + k), a4);
    a5 = _mm256_fmadd_ps(x, _mm256_loadu_ps(r[5] + k), a5);
    a6 = _mm256_fmadd_ps(x, _mm256_loadu_ps(r[6] + k), a6);
    a7 = _mm256_fmadd_ps(x, _mm256_loadu_ps(r[7] + k), a7);
  }
  return hsum8(a0, a1, a2, a3, a4, a5, a6, a7);
}

// exp(x) for x <= 0 in 8 lanes (Cephes expf: x = n ln2 + r, degree-6 polynomial in r; within 1e-7 relative);
// x < -87.3 gives 0 (the result would be subnormal); NaN stays NaN.
static inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.3f);
  __m256 under = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
  x = _mm256_max_ps(lowest, x);  // maxps returns its second operand when one is NaN
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts: r stays exact
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(scale)));
}

#endif
