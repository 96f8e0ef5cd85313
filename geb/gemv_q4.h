// The Q4_0 tiles of geb/gemv.cpp, included there twice: for AVX2 (vpmaddubsw + vpmaddwd) and, compiled for
// AVX-512 VNNI by a target pragma around the include (GEB_Q4_VNNI defined), with vpdpbusd, which does both in one
// instruction; that copy also has 32 vector registers and so takes more input rows a tile (kQ4Inputs, defined by
// the includer). Inside a namespace of its own, after QuantizedInput, kQ4Rows and kQ4PrefetchGroups.

// y[m + i, n + r] for r < R, i < I: the Q4 rows n.. of the weight against the quantized inputs m...
template <int R, int I>
void q4_tile(const uint8_t* qs, const uint16_t* scales, const QuantizedInput& in, float* y, int64_t n, int64_t m,
             int64_t N, int64_t Kp) {
  const int64_t nb = Kp / 32;
  const __m256i b_mask = _mm256_set1_epi8(0x0F);
#ifndef GEB_Q4_VNNI
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
      // The rows kQ4PrefetchGroups groups ahead, into L2: the hardware prefetchers stop at 4 KiB pages, which a group
      // of rows (1 KiB each at K = 2048) spans, so without this a matrix that is not in cache streamed at 40% of
      // the memory bandwidth here (8 vs 21 GB/s on one thread; into L1, or one group ahead, gained little).
      for (int r = 0; r < R; r++) {
        const uint8_t* p_next = qs + (n + kQ4PrefetchGroups * R + r) * (Kp / 2) + b0 * 16;
        _mm_prefetch(reinterpret_cast<const char*>(p_next), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(p_next + 64), _MM_HINT_T1);
        if (b0 % 32 == 0)
          _mm_prefetch(reinterpret_cast<const char*>(scales + (n + kQ4PrefetchGroups * R + r) * nb + b0), _MM_HINT_T1);
      }
    }
    for (int c = 0; c < 4; c++) {  // four chunks of 64 weights: eight blocks
      const int64_t b = b0 + 2 * c;
      for (int r = 0; r < R; r++) {
        const __m256i b_q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + (n + r) * (Kp / 2) + b * 16));
        const __m256i b_lo = _mm256_and_si256(b_q, b_mask);  // block b
        const __m256i b_hi = _mm256_and_si256(_mm256_srli_epi16(b_q, 4), b_mask);  // block b + 1
        for (int i = 0; i < I; i++) {
          const int8_t* p_x = in.xq.data() + (m + i) * Kp + b * 32;
          const __m256i b_x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p_x));
          const __m256i b_x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p_x + 32));
#ifdef GEB_Q4_VNNI
          const __m256i b_p0 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), b_lo, b_x0);  // [8] int32
          const __m256i b_p1 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), b_hi, b_x1);
#else
          const __m256i b_p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(b_lo, b_x0), b_ones);  // [8] int32
          const __m256i b_p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(b_hi, b_x1), b_ones);
#endif
          b_acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(b_p0), _mm256_broadcast_ss(&s[r][i][2 * c]), b_acc[r][i]);
          b_acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(b_p1), _mm256_broadcast_ss(&s[r][i][2 * c + 1]),
                                        b_acc[r][i]);
        }
      }
    }
  }
  for (int r = 0; r < R; r++) {
    const uint16_t* p_s = scales + (n + r) * nb;
    for (int i = 0; i < I; i++) {
      // The -8 of every nibble: 8 * sum_b dw_b * c_b, eight blocks at a time.
      const float* p_c = in.c.data() + (m + i) * nb;
      __m256 b_corr = _mm256_setzero_ps();
      for (int64_t b = 0; b < nb; b += 8)
        b_corr = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p_s + b))),
                                 _mm256_loadu_ps(p_c + b), b_corr);
      y[(m + i) * N + n + r] = hsum(b_acc[r][i]) - 8.f * hsum(b_corr);
    }
  }
}

// All M inputs against the weight rows of groups [begin, end) of kQ4Rows rows (the last group may be short).
void q4_rows(const uint8_t* qs, const uint16_t* scales, const QuantizedInput& in, float* y, int64_t begin,
             int64_t end, int64_t M, int64_t N, int64_t Kp) {
  for (int64_t g = begin; g < end; g++) {
    const int64_t n = g * kQ4Rows;
    if (n + kQ4Rows <= N) {
      int64_t m = 0;
      for (; m + kQ4Inputs <= M; m += kQ4Inputs) q4_tile<kQ4Rows, kQ4Inputs>(qs, scales, in, y, n, m, N, Kp);
      if constexpr (kQ4Inputs > 3)
        for (; m + 3 <= M; m += 3) q4_tile<kQ4Rows, 3>(qs, scales, in, y, n, m, N, Kp);
      for (; m < M; m++) q4_tile<kQ4Rows, 1>(qs, scales, in, y, n, m, N, Kp);
    } else {
      for (int64_t r = n; r < N; r++)
        for (int64_t m = 0; m < M; m++) q4_tile<1, 1>(qs, scales, in, y, r, m, N, Kp);
    }
  }
}
