r"""The C source of the scaler's native CPU kernels (built and wrapped in :mod:`._native`).

Three loops, each accumulating squares in 16 independent float64 lanes (a single accumulator
would bound a pass by the latency of its additions rather than by memory bandwidth); every
kernel that sums the same quantity uses the same lanes in the same order, so their sums are
bitwise equal:

* ``gs_sumsq``: ‖x_j‖² of every tensor;
* ``gs_deviation``: d = s·g_j − m_j, ‖d‖², and m_j ← m_j + a_j d in place (nothing read where
  a_j = 0);
* ``gs_deviation_into``: the same step read from one buffer of a pair and written to the
  other (a parity byte per tensor says which holds m_j), with ‖g_j‖² from the same pass: one
  read of g and m and one write (12 B/element in float32) for the whole temporal update;
  float32 uses AVX2 with streaming stores where the machine has AVX2.

Kind codes: 0 float32, 1 float64, 2 bfloat16 (its bits are the top half of a float32).
"""

__all__ = ["SOURCE"]

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
/* 16 independent float64 accumulators per loop: a single one would bound the pass by the
   latency of its additions rather than by memory bandwidth */
#define GS_LANES 16
static inline double gs_bf16(uint16_t b) {
    uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return (double)f;
}
#define GS_PLAIN(v) ((double)(v))
#define GS_SUMSQ(T, LOAD) {                                                                 \
    const T *restrict x = (const T *)ptr[j]; double acc[GS_LANES] = {0}, total = 0.0;      \
    int64_t i = 0;                                                                         \
    for (; i + GS_LANES <= n[j]; i += GS_LANES)                                            \
        for (int k = 0; k < GS_LANES; ++k) { double v = LOAD(x[i + k]); acc[k] += v * v; } \
    for (; i < n[j]; ++i) { double v = LOAD(x[i]); total += v * v; }                       \
    for (int k = 0; k < GS_LANES; ++k) total += acc[k];                                    \
    out[j] = total; }
/* out[j] = sum_i x_j[i]^2, accumulated in double */
void gs_sumsq(int64_t count, void *const *ptr, const int64_t *n, const int8_t *kind,
              double *out) {
    for (int64_t j = 0; j < count; ++j) {
        if (kind[j] == 0) GS_SUMSQ(float, GS_PLAIN)
        else if (kind[j] == 1) GS_SUMSQ(double, GS_PLAIN)
        else GS_SUMSQ(uint16_t, gs_bf16)
    }
}
#define GS_DEV(M_, G, LOAD_) {                                                              \
    typedef M_ M;                                                                          \
    M *restrict mj = (M *)m[j]; const G *restrict gj = (const G *)g[j];                    \
    double acc[GS_LANES] = {0}; int64_t i = 0;                                             \
    for (; i + GS_LANES <= n[j]; i += GS_LANES)                                            \
        for (int k = 0; k < GS_LANES; ++k) GS_STEP_##LOAD_(i + k, acc[k])                  \
    for (; i < n[j]; ++i) GS_STEP_##LOAD_(i, total)                                        \
    for (int k = 0; k < GS_LANES; ++k) total += acc[k]; }
#define GS_STEP_GS_PLAIN(I, ACC) { double mi = (double)mj[I], d = s * (double)gj[I] - mi;  \
    ACC += d * d; mj[I] = (M)(mi + w * d); }
#define GS_STEP_gs_bf16(I, ACC) { double mi = (double)mj[I], d = s * gs_bf16(gj[I]) - mi;  \
    ACC += d * d; mj[I] = (M)(mi + w * d); }
/* d = s g_j - m_j (in double); out[j] = sum_i d_i^2; m_j += a_j d; nothing read when a_j == 0 */
void gs_deviation(int64_t count, void *const *m, void *const *g, const int64_t *n,
                  const int8_t *kind, const double *a, const double *scale, double *out) {
    const double s = scale ? *scale : 1.0;
    for (int64_t j = 0; j < count; ++j) {
        const double w = a[j];
        double total = 0.0;
        if (w != 0.0) {
            if (kind[j] == 0) GS_DEV(float, float, GS_PLAIN)
            else if (kind[j] == 1) GS_DEV(double, double, GS_PLAIN)
            else GS_DEV(float, uint16_t, gs_bf16)
        }
        out[j] = total;
    }
}
#define GS_INTO(M_, G, LOAD_) {                                                             \
    typedef M_ M;                                                                          \
    const M *restrict mj = (const M *)mp; M *restrict tj = (M *)tp;                        \
    const G *restrict gj = (const G *)g[j];                                                \
    double acc[GS_LANES] = {0}, accg[GS_LANES] = {0};                                      \
    for (; i + GS_LANES <= n[j]; i += GS_LANES)                                            \
        for (int k = 0; k < GS_LANES; ++k) GS_INTO_##LOAD_(i + k, acc[k], accg[k])         \
    for (; i < n[j]; ++i) GS_INTO_##LOAD_(i, total, total_g)                               \
    for (int k = 0; k < GS_LANES; ++k) { total += acc[k]; total_g += accg[k]; } }
#define GS_INTO_GS_PLAIN(I, ACC, ACCG) { double gi = (double)gj[I], mi = (double)mj[I];     \
    double d = s * gi - mi; ACCG += gi * gi; ACC += d * d; tj[I] = (M)(mi + w * d); }
#define GS_INTO_gs_bf16(I, ACC, ACCG) { double gi = gs_bf16(gj[I]), mi = (double)mj[I];    \
    double d = s * gi - mi; ACCG += gi * gi; ACC += d * d; tj[I] = (M)(mi + w * d); }
#if defined(__AVX2__)
/* float32 m and g, 16 elements per step in four float64 vectors: lane k of the vectors is
   accumulator k of GS_INTO (same operations, same order: the same bits); the new means go
   out with streaming stores (to[j] is written, never read, in this pass) */
static int64_t gs_into_f32(const float *restrict mj, float *restrict tj,
                           const float *restrict gj, int64_t n, double w, double s,
                           double *acc, double *accg) {
    const __m256d wv = _mm256_set1_pd(w), sv = _mm256_set1_pd(s);
    __m256d dq[4], gq[4];
    for (int q = 0; q < 4; ++q) { dq[q] = _mm256_loadu_pd(acc + 4 * q);
                                  gq[q] = _mm256_loadu_pd(accg + 4 * q); }
    const int stream = ((uintptr_t)tj & 31) == 0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 out[2];
        for (int h = 0; h < 2; ++h) {
            __m256 g8 = _mm256_loadu_ps(gj + i + 8 * h), m8 = _mm256_loadu_ps(mj + i + 8 * h);
            __m256d g4[2] = {_mm256_cvtps_pd(_mm256_castps256_ps128(g8)),
                             _mm256_cvtps_pd(_mm256_extractf128_ps(g8, 1))};
            __m256d m4[2] = {_mm256_cvtps_pd(_mm256_castps256_ps128(m8)),
                             _mm256_cvtps_pd(_mm256_extractf128_ps(m8, 1))};
            __m128 o4[2];
            for (int e = 0; e < 2; ++e) {
                __m256d d = _mm256_sub_pd(_mm256_mul_pd(sv, g4[e]), m4[e]);
                gq[2 * h + e] = _mm256_add_pd(gq[2 * h + e], _mm256_mul_pd(g4[e], g4[e]));
                dq[2 * h + e] = _mm256_add_pd(dq[2 * h + e], _mm256_mul_pd(d, d));
                o4[e] = _mm256_cvtpd_ps(_mm256_add_pd(m4[e], _mm256_mul_pd(wv, d)));
            }
            out[h] = _mm256_set_m128(o4[1], o4[0]);
        }
        if (stream) { _mm256_stream_ps(tj + i, out[0]); _mm256_stream_ps(tj + i + 8, out[1]); }
        else { _mm256_storeu_ps(tj + i, out[0]); _mm256_storeu_ps(tj + i + 8, out[1]); }
    }
    for (int q = 0; q < 4; ++q) { _mm256_storeu_pd(acc + 4 * q, dq[q]);
                                  _mm256_storeu_pd(accg + 4 * q, gq[q]); }
    return i;
}
#endif
/* one pass into the other buffer of each pair: m_j is first[j] if parity[j] == 0, else
   second[j], and the new means go to the other one; d = s g_j - m_j (in double);
   out[j] = sum_i d_i^2, sq[j] = sum_i g_j[i]^2 (unscaled: the gs_sumsq sum, same order),
   new m_j = m_j + a_j d (m_j is only read); every tensor is done, whatever a_j */
void gs_deviation_into(int64_t count, void *const *first, void *const *second,
                       const int8_t *parity, void *const *g, const int64_t *n,
                       const int8_t *kind, const double *a, const double *scale, double *out,
                       double *sq) {
    const double s = scale ? *scale : 1.0;
    int streamed = 0;
    for (int64_t j = 0; j < count; ++j) {
        const double w = a[j];
        void *mp = parity[j] ? second[j] : first[j], *tp = parity[j] ? first[j] : second[j];
        double total = 0.0, total_g = 0.0;
        int64_t i = 0;
        if (kind[j] == 0) {
#if defined(__AVX2__)
            double acc[GS_LANES] = {0}, accg[GS_LANES] = {0};
            i = gs_into_f32((const float *)mp, (float *)tp, (const float *)g[j], n[j], w, s,
                            acc, accg);
            streamed = 1;
            const float *restrict mj = (const float *)mp, *restrict gj = (const float *)g[j];
            float *restrict tj = (float *)tp;
            for (; i < n[j]; ++i) {
                double gi = (double)gj[i], mi = (double)mj[i], d = s * gi - mi;
                total_g += gi * gi; total += d * d; tj[i] = (float)(mi + w * d);
            }
            for (int k = 0; k < GS_LANES; ++k) { total += acc[k]; total_g += accg[k]; }
#else
            GS_INTO(float, float, GS_PLAIN)
#endif
        }
        else if (kind[j] == 1) GS_INTO(double, double, GS_PLAIN)
        else GS_INTO(float, uint16_t, gs_bf16)
        out[j] = total;
        sq[j] = total_g;
    }
#if defined(__AVX2__)
    if (streamed) _mm_sfence();
#else
    (void)streamed;
#endif
}
"""
