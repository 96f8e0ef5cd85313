// The Q8_0 tiles of geb/gemv.cpp, included there twice as geb/gemv_q4.h is: AVX2 and AVX-512 VNNI (GEB_Q4_VNNI
// defined). Weights are ggml's Q8_0 values (blocks of 32 int8, w = q * d) stored as they are. Signed by signed:
// AVX2 multiplies |q| by x with q's sign (vpsignb; |q|, |x| <= 127, so vpmaddubsw's int16 pairs never saturate),
// VNNI multiplies q + 128 (one XOR a weight load, shared by every input row) by x with vpdpbusd and subtracts
// 128 * sum(x_q) per block after the loop, as the Q4 tiles subtract 8 * sum(x_q).

// y[m + i, n + r] for r < R, i < I: the Q8 rows n.. of the weight against the quantized inputs m...
template <int R, int I>
void q8_tile(const int8_t* qs, const uint16_t* scales, const QuantizedInput& in, float* y, int64_t n, int64_t m,
             int64_t N, int64_t Kp) {
  const int64_t nb = Kp / 32;
#ifdef GEB_Q4_VNNI
  const __m256i b_flip = _mm256_set1_epi8(static_cast<char>(0x80));
#else
  const __m256i b_ones = _mm256_set1_epi16(1);
#endif
  __m256 b_acc[R][I];
  for (int r = 0; r < R; r++)
    for (int i = 0; i < I; i++) b_acc[r][i] = _mm256_setzero_ps();
  alignas(32) float s[R][I][8];  // dw * dx of the eight blocks in flight
  for (int64_t b0 = 0; b0 < nb; b0 += 8) {
    for (int r = 0; r < R; r++) {
      const __m256 b_dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
          scales + (n + r) * nb + b0)));
      for (int i = 0; i < I; i++)
        _mm256_store_ps(s[r][i], _mm256_mul_ps(b_dw, _mm256_loadu_ps(in.dx.data() + (m + i) * nb + b0)));
    }
    if (R > 1) {
      // As in q4_tile: the rows kQ8PrefetchGroups groups ahead into L2 (the hardware prefetchers stop at 4 KiB
      // pages); eight blocks are 256 bytes a row, four cache lines.
      for (int r = 0; r < R; r++) {
        const int8_t* p_next = qs + (n + kQ8PrefetchGroups * R + r) * Kp + b0 * 32;
        for (int l = 0; l < 4; l++) _mm_prefetch(reinterpret_cast<const char*>(p_next + 64 * l), _MM_HINT_T1);
        if (b0 % 32 == 0)
          _mm_prefetch(reinterpret_cast<const char*>(scales + (n + kQ8PrefetchGroups * R + r) * nb + b0), _MM_HINT_T1);
      }
    }
    for (int c = 0; c < 8; c++) {  // eight blocks of 32 weights
      const int64_t b = b0 + c;
      for (int r = 0; r < R; r++) {
        const __m256i b_q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + (n + r) * Kp + b * 32));
#ifdef GEB_Q4_VNNI
        const __m256i b_u = _mm256_xor_si256(b_q, b_flip);  // q + 128, unsigned
#else
        const __m256i b_u = _mm256_sign_epi8(b_q, b_q);  // |q|
#endif
        for (int i = 0; i < I; i++) {
          const __m256i b_x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in.xq.data() + (m + i) * Kp +
                                                                                   b * 32));
#ifdef GEB_Q4_VNNI
          const __m256i b_p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), b_u, b_x);  // [8] int32
#else
          const __m256i b_p = _mm256_madd_epi16(_mm256_maddubs_epi16(b_u, _mm256_sign_epi8(b_x, b_q)), b_ones);
#endif
          b_acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(b_p), _mm256_broadcast_ss(&s[r][i][c]), b_acc[r][i]);
        }
      }
    }
  }
  for (int r = 0; r < R; r++) {
    for (int i = 0; i < I; i++) {
      float v = hsum(b_acc[r][i]);
#ifdef GEB_Q4_VNNI
      // The +128 of every weight: 128 * sum_b dw_b * dx_b * sum(x_q)_b, eight blocks at a time.
      const uint16_t* p_s = scales + (n + r) * nb;
      const float* p_c = in.c.data() + (m + i) * nb;
      __m256 b_corr = _mm256_setzero_ps();
      for (int64_t b = 0; b < nb; b += 8)
        b_corr = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p_s + b))),
                                 _mm256_loadu_ps(p_c + b), b_corr);
      v -= 128.f * hsum(b_corr);
#endif
      y[(m + i) * N + n + r] = v;
    }
  }
}

// All M inputs against the weight rows of groups [begin, end) of kQ8Rows rows (the last group may be short).
void q8_rows(const int8_t* qs, const uint16_t* scales, const QuantizedInput& in, float* y, int64_t begin,
             int64_t end, int64_t M, int64_t N, int64_t Kp) {
  for (int64_t g = begin; g < end; g++) {
    const int64_t n = g * kQ8Rows;
    if (n + kQ8Rows <= N) {
      int64_t m = 0;
      for (; m + kQ8Inputs <= M; m += kQ8Inputs) q8_tile<kQ8Rows, kQ8Inputs>(qs, scales, in, y, n, m, N, Kp);
      if constexpr (kQ8Inputs > 3)
        for (; m + 3 <= M; m += 3) q8_tile<kQ8Rows, 3>(qs, scales, in, y, n, m, N, Kp);
      for (; m < M; m++) q8_tile<kQ8Rows, 1>(qs, scales, in, y, n, m, N, Kp);
    } else {
      for (int64_t r = n; r < N; r++)
        for (int64_t m = 0; m < M; m++) q8_tile<1, 1>(qs, scales, in, y, r, m, N, Kp);
    }
  }
}
