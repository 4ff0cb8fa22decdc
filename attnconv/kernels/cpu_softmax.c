// Column softmax pieces for the chunked linear cross-entropy (AVX2 + FMA, float32), built by native.py.
//
// The loss kernel holds a chunk's logits as [V, c] (vocabulary rows, one column per token) and needs, per column,
// the max, the exponentials exp(x - max) in place (they become the gradient) and their sum. torch does this in
// four passes over the chunk (amax, sub_, exp_, sum), each a full read or read-write of 64 MiB; here it is two, and
// each thread streams its own range of rows. Partial sums are kept in double (one per column and thread): a float
// running sum over 50k rows drifts by ~1e-4 relative, double matches torch's cascaded sum to ~2e-7.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd8.h"


// out[j] = max over i of x[i * ld + j], for j < cols. A NaN may be skipped here: the sums below keep it.
void attnconv_column_max(const float *x, int64_t rows, int64_t cols, int64_t ld, float *out) {
  int threads = omp_get_max_threads();
  int64_t width = (cols + 7) / 8 * 8;
  float *part = aligned_alloc(32, sizeof(float) * threads * width);
#pragma omp parallel num_threads(threads)
  {
    int t = omp_get_thread_num(), n = omp_get_num_threads();
    float *m = part + t * width;
    for (int64_t j = 0; j < width; j++) m[j] = -INFINITY;
    int64_t vec = cols / 8 * 8;
    for (int64_t i = rows * t / n; i < rows * (t + 1) / n; i++) {
      const float *row = x + i * ld;
      for (int64_t j = 0; j < vec; j += 8)
        _mm256_store_ps(m + j, _mm256_max_ps(_mm256_load_ps(m + j), _mm256_loadu_ps(row + j)));
      for (int64_t j = vec; j < cols; j++) m[j] = fmaxf(m[j], row[j]);
    }
#pragma omp barrier
#pragma omp for
    for (int64_t j = 0; j < cols; j++) {
      float v = part[j];
      for (int k = 1; k < n; k++) v = fmaxf(v, part[k * width + j]);
      out[j] = v;
    }
  }
  free(part);
}

// x[i, j] = exp(x[i, j] - peak[j]) in place; sums[j] = sum over i of the new x[i, j]. peak[j] >= every x[i, j].
void attnconv_exp_column_sums(float *x, int64_t rows, int64_t cols, int64_t ld, const float *peak, float *sums) {
  int threads = omp_get_max_threads();
  int64_t width = (cols + 7) / 8 * 8;
  double *part = aligned_alloc(32, sizeof(double) * threads * width);
#pragma omp parallel num_threads(threads)
  {
    int t = omp_get_thread_num(), n = omp_get_num_threads();
    double *s = part + t * width;
    for (int64_t j = 0; j < width; j++) s[j] = 0.0;
    int64_t vec = cols / 8 * 8;
    for (int64_t i = rows * t / n; i < rows * (t + 1) / n; i++) {
      float *row = x + i * ld;
      for (int64_t j = 0; j < vec; j += 8) {
        __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + j), _mm256_loadu_ps(peak + j)));
        _mm256_storeu_ps(row + j, e);
        _mm256_store_pd(s + j, _mm256_add_pd(_mm256_load_pd(s + j), _mm256_cvtps_pd(_mm256_castps256_ps128(e))));
        _mm256_store_pd(s + j + 4,
                        _mm256_add_pd(_mm256_load_pd(s + j + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1))));
      }
      for (int64_t j = vec; j < cols; j++) {
        row[j] = expf(row[j] - peak[j]);
        s[j] += row[j];
      }
    }
#pragma omp barrier
#pragma omp for
    for (int64_t j = 0; j < cols; j++) {
      double v = part[j];
      for (int k = 1; k < n; k++) v += part[k * width + j];
      sums[j] = (float)v;
    }
  }
  free(part);
}
