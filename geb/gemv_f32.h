// The fp32 kernels of geb/gemv.cpp, included there twice as geb/gemv_q4.h is: for AVX2 (8-float vectors, 16
// registers) and, compiled for AVX-512 by a target pragma around the include (GEB_Q4_VNNI defined), with 16-float
// vectors and 32 registers. The includer sets the shapes: kF32Rows weight rows a one-token step with kF32Accs
// accumulators each, software prefetch kF32PrefetchGroups groups of rows ahead (0: none), and prompt tiles of
// kF32TileRows weight rows by kF32TileInputs input rows. Inside a namespace of its own.

#ifdef GEB_Q4_VNNI
using f32_vec = __m512;
constexpr int64_t kF32Lanes = 16;
inline __m512 f32_zero() { return _mm512_setzero_ps(); }
inline __m512 f32_load(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 f32_load_tail(const float* p, int64_t n) {  // p[0, n), zeros after; n < 16, nothing past it read
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
}
inline __m512 f32_fma(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
inline __m512 f32_add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
inline float f32_sum(__m512 v) { return _mm512_reduce_add_ps(v); }
#else
using f32_vec = __m256;
constexpr int64_t kF32Lanes = 8;
inline __m256 f32_zero() { return _mm256_setzero_ps(); }
inline __m256 f32_load(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 f32_load_tail(const float* p, int64_t n) {  // vmaskmovps: masked-off lanes read nothing, fault nothing
  const __m256i b_lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i b_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), b_lanes);
  return _mm256_maskload_ps(p, b_mask);
}
inline __m256 f32_fma(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
inline __m256 f32_add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
inline float f32_sum(__m256 v) { return hsum(v); }
#endif

// y[n + r] = w[n + r, :] . x for r < R; w row-major with K columns.
template <int R>
void f32_gemv_group(const float* w, const float* x, float* y, int64_t n, int64_t K) {
  constexpr int A = kF32Accs;
  const float* p_w = w + n * K;
  f32_vec b_acc[R][A];
  for (int r = 0; r < R; r++)
    for (int a = 0; a < A; a++) b_acc[r][a] = f32_zero();
  int64_t k = 0;
  for (; k + A * kF32Lanes <= K; k += A * kF32Lanes) {
    if constexpr (kF32PrefetchGroups > 0) {
      // The rows kF32PrefetchGroups groups ahead, into L2, a line for each line read: the hardware prefetchers stop
      // at 4 KiB pages, which each row (8 KiB at K = 2048) crosses. Past the last row it prefetches nothing useful,
      // and a prefetch never faults.
      for (int r = 0; r < R; r++)
        for (int a = 0; a < A; a++)
          _mm_prefetch(reinterpret_cast<const char*>(p_w + (kF32PrefetchGroups * R + r) * K + k + a * kF32Lanes),
                       _MM_HINT_T1);
    }
    f32_vec b_x[A];  // each load of x serves R rows
    for (int a = 0; a < A; a++) b_x[a] = f32_load(x + k + a * kF32Lanes);
    for (int r = 0; r < R; r++)
      for (int a = 0; a < A; a++) b_acc[r][a] = f32_fma(f32_load(p_w + r * K + k + a * kF32Lanes), b_x[a], b_acc[r][a]);
  }
  for (; k + kF32Lanes <= K; k += kF32Lanes) {
    const f32_vec b_x = f32_load(x + k);
    for (int r = 0; r < R; r++) b_acc[r][0] = f32_fma(f32_load(p_w + r * K + k), b_x, b_acc[r][0]);
  }
  if (k < K) {  // the last K % kF32Lanes columns
    const f32_vec b_x = f32_load_tail(x + k, K - k);
    for (int r = 0; r < R; r++) b_acc[r][0] = f32_fma(f32_load_tail(p_w + r * K + k, K - k), b_x, b_acc[r][0]);
  }
  for (int r = 0; r < R; r++) {
    for (int a = 1; a < A; a++) b_acc[r][0] = f32_add(b_acc[r][0], b_acc[r][a]);
    y[n + r] = f32_sum(b_acc[r][0]);
  }
}

// y[n] = w[n, :] . x for n in [begin, end): kF32Rows rows at a time, then one by one.
void f32_gemv(const float* w, const float* x, float* y, int64_t begin, int64_t end, int64_t K) {
  int64_t n = begin;
  for (; n + kF32Rows <= end; n += kF32Rows) f32_gemv_group<kF32Rows>(w, x, y, n, K);
  if constexpr (kF32Rows > 1)
    for (; n < end; n++) f32_gemv_group<1>(w, x, y, n, K);
}

// y[m + i, n + r] = x[m + i, :] . w[n + r, :] for r < R, i < I; x is M x K, w N x K, y M x N, row-major. P: also
// prefetch the next group of R rows into L2 (the first tile of a group does, where kF32PrefetchGroups > 0).
template <int R, int I, bool P>
void f32_tile(const float* w, const float* x, float* y, int64_t n, int64_t m, int64_t N, int64_t K) {
  const float* p_w = w + n * K;
  const float* p_x = x + m * K;
  f32_vec b_acc[R][I];  // [R, I] vectors: 4 x 3 of AVX2's 16 registers, 6 x 4 of AVX-512's 32
  for (int r = 0; r < R; r++)
    for (int i = 0; i < I; i++) b_acc[r][i] = f32_zero();
  int64_t k = 0;
  for (; k + kF32Lanes <= K; k += kF32Lanes) {
    if constexpr (P)
      for (int r = 0; r < R; r++) _mm_prefetch(reinterpret_cast<const char*>(p_w + (R + r) * K + k), _MM_HINT_T1);
    f32_vec b_x[I];
    for (int i = 0; i < I; i++) b_x[i] = f32_load(p_x + i * K + k);
    for (int r = 0; r < R; r++) {
      const f32_vec b_w = f32_load(p_w + r * K + k);
      for (int i = 0; i < I; i++) b_acc[r][i] = f32_fma(b_w, b_x[i], b_acc[r][i]);
    }
  }
  if (k < K) {  // the last K % kF32Lanes columns
    f32_vec b_x[I];
    for (int i = 0; i < I; i++) b_x[i] = f32_load_tail(p_x + i * K + k, K - k);
    for (int r = 0; r < R; r++) {
      const f32_vec b_w = f32_load_tail(p_w + r * K + k, K - k);
      for (int i = 0; i < I; i++) b_acc[r][i] = f32_fma(b_w, b_x[i], b_acc[r][i]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int i = 0; i < I; i++) y[(m + i) * N + n + r] = f32_sum(b_acc[r][i]);
}

// The inputs m.. (I or fewer: the last M % kF32TileInputs) against the weight rows n.. in a tile of I inputs.
template <int R, int I, bool P>
void f32_tile_inputs(const float* w, const float* x, float* y, int64_t n, int64_t m, int64_t M, int64_t N, int64_t K) {
  if constexpr (I > 1) {
    if (M - m < I) return f32_tile_inputs<R, I - 1, P>(w, x, y, n, m, M, N, K);
  }
  f32_tile<R, I, P>(w, x, y, n, m, N, K);
}

// y[:, n] = x w[n, :]^T for the M inputs and the weight rows n in [begin, end): each group of kF32TileRows rows
// meets every input while it is in cache, the last end - begin % kF32TileRows rows one by one. With prefetch
// (AVX-512), the first tile of a group brings the next group's rows into L2: 1.04-1.07x at 8-16 inputs.
void f32_gemm_rows(const float* w, const float* x, float* y, int64_t begin, int64_t end, int64_t M, int64_t N,
                   int64_t K) {
  constexpr int R = kF32TileRows, I = kF32TileInputs;
  int64_t n = begin;
  for (; n + R <= end; n += R) {
    f32_tile_inputs<R, I, (kF32PrefetchGroups > 0)>(w, x, y, n, 0, M, N, K);
    for (int64_t m = I; m < M; m += I) f32_tile_inputs<R, I, false>(w, x, y, n, m, M, N, K);
  }
  for (; n < end; n++)
    for (int64_t m = 0; m < M; m += I) f32_tile_inputs<1, I, false>(w, x, y, n, m, M, N, K);
}
