// The Q4_0 tiles of geb/gemv.cpp, included there twice: for AVX2 (vpmaddubsw + vpmaddwd, 256-bit registers, a
// group's 16 rows as two halves of 8) and, compiled for AVX-512 VNNI by a target pragma around the include
// (GEB_Q4_VNNI defined), with vpdpbusd on 512-bit registers (a group's 16 rows in one register). Inside a namespace of
// its own, after QuantizedInput, kQ4Group and kQ4PrefetchBytes; the includer defines kQ4Inputs (input rows a tile).
//
// The weight layout (geb/gemv.cpp's header comment has it whole): for each group of 16 rows and block of 32 weights,
// 4 x 64 bytes, where bytes 4r..4r+3 of the t-th 64 are bytes 4t..4t+3 of row r's ggml block (low nibbles: weights
// 4t..4t+3, high nibbles: weights 16+4t..16+4t+3), then the group's 16 scales of that block in the scales array. So
// a 32-bit lane of a loaded register holds one row's weights, and one 4-byte broadcast of the activations serves all
// rows of the register: no horizontal sums, one convert and two FMAs a block for 16 rows.

#ifdef GEB_Q4_VNNI

// y[m + i, 16 g + r] for r < 16 (those below N), i < I: group g against the quantized inputs m...
template <int I>
void q4_tile(const uint8_t* qs, const uint16_t* scales, const QuantizedInput& in, float* y, int64_t g, int64_t m,
             int64_t N, int64_t Kp) {
  const int64_t nb = Kp / 32;
  const uint8_t* p_q = qs + g * nb * 256;
  const uint16_t* p_s = scales + g * nb * 16;
  const __m512i b_mask = _mm512_set1_epi8(0x0F);
  __m512 b_y[I];  // [16 rows] fp32 per input
  for (int i = 0; i < I; i++) b_y[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    // The hardware prefetchers stop at 4 KiB pages (16 blocks of a group here): a fixed distance ahead into L2.
    for (int l = 0; l < 4; l++)
      _mm_prefetch(reinterpret_cast<const char*>(p_q + b * 256 + kQ4PrefetchBytes + 64 * l), _MM_HINT_T1);
    if (b % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(p_s + b * 16 + kQ4PrefetchBytes / 8), _MM_HINT_T1);
    __m512i b_acc[I];  // [16 rows] int32: sum_j q_j x_j over the block
    for (int i = 0; i < I; i++) b_acc[i] = _mm512_setzero_si512();
    for (int t = 0; t < 4; t++) {
      const __m512i b_w = _mm512_loadu_si512(p_q + b * 256 + t * 64);
      const __m512i b_lo = _mm512_and_si512(b_w, b_mask);  // weights 4t..4t+3 of each row
      const __m512i b_hi = _mm512_and_si512(_mm512_srli_epi16(b_w, 4), b_mask);  // weights 16+4t..
      for (int i = 0; i < I; i++) {
        const int32_t* p_x = reinterpret_cast<const int32_t*>(in.xq.data() + (m + i) * Kp + b * 32);
        b_acc[i] = _mm512_dpbusd_epi32(b_acc[i], b_lo, _mm512_set1_epi32(p_x[t]));
        b_acc[i] = _mm512_dpbusd_epi32(b_acc[i], b_hi, _mm512_set1_epi32(p_x[4 + t]));
      }
    }
    const __m512 b_dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p_s + b * 16)));
    for (int i = 0; i < I; i++) {
      // dx (sum_j q_j x_j - 8 sum_j x_j): the -8 of every nibble, with c = dx sum_j x_j.
      const int64_t mb = (m + i) * nb + b;
      const __m512 b_v = _mm512_fmsub_ps(_mm512_cvtepi32_ps(b_acc[i]), _mm512_set1_ps(in.dx[mb]),
                                         _mm512_set1_ps(8.f * in.c[mb]));
      b_y[i] = _mm512_fmadd_ps(b_dw, b_v, b_y[i]);
    }
  }
  const int64_t rows = std::min<int64_t>(kQ4Group, N - g * kQ4Group);
  const __mmask16 m_rows = static_cast<__mmask16>((1u << rows) - 1);
  for (int i = 0; i < I; i++) _mm512_mask_storeu_ps(y + (m + i) * N + g * kQ4Group, m_rows, b_y[i]);
}

#else

// AVX2: the two halves of 8 rows side by side. vpmaddubsw's int16 pair sums (|q x| <= 15 * 127 twice) of a block's
// eight products are added as int16 before one vpmaddwd: at most 8 * 2 * 15 * 127 = 30480 < 32768, no saturation.
template <int I>
void q4_tile(const uint8_t* qs, const uint16_t* scales, const QuantizedInput& in, float* y, int64_t g, int64_t m,
             int64_t N, int64_t Kp) {
  const int64_t nb = Kp / 32;
  const uint8_t* p_q = qs + g * nb * 256;
  const uint16_t* p_s = scales + g * nb * 16;
  const __m256i b_mask = _mm256_set1_epi8(0x0F);
  const __m256i b_ones = _mm256_set1_epi16(1);
  __m256 b_y[I][2];  // [8 rows] fp32 per input and half
  for (int i = 0; i < I; i++) b_y[i][0] = b_y[i][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    for (int l = 0; l < 4; l++)
      _mm_prefetch(reinterpret_cast<const char*>(p_q + b * 256 + kQ4PrefetchBytes + 64 * l), _MM_HINT_T1);
    if (b % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(p_s + b * 16 + kQ4PrefetchBytes / 8), _MM_HINT_T1);
    __m256i b_acc[I][2];  // [16 int16 pairs] per input and half
    for (int i = 0; i < I; i++) b_acc[i][0] = b_acc[i][1] = _mm256_setzero_si256();
    for (int t = 0; t < 4; t++) {
      for (int h = 0; h < 2; h++) {
        const __m256i b_w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p_q + b * 256 + t * 64 + h * 32));
        const __m256i b_lo = _mm256_and_si256(b_w, b_mask);
        const __m256i b_hi = _mm256_and_si256(_mm256_srli_epi16(b_w, 4), b_mask);
        for (int i = 0; i < I; i++) {
          const int32_t* p_x = reinterpret_cast<const int32_t*>(in.xq.data() + (m + i) * Kp + b * 32);
          b_acc[i][h] = _mm256_add_epi16(b_acc[i][h], _mm256_maddubs_epi16(b_lo, _mm256_set1_epi32(p_x[t])));
          b_acc[i][h] = _mm256_add_epi16(b_acc[i][h], _mm256_maddubs_epi16(b_hi, _mm256_set1_epi32(p_x[4 + t])));
        }
      }
    }
    for (int h = 0; h < 2; h++) {
      const __m256 b_dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p_s + b * 16 + h * 8)));
      for (int i = 0; i < I; i++) {
        const int64_t mb = (m + i) * nb + b;
        const __m256 b_sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(b_acc[i][h], b_ones));
        const __m256 b_v = _mm256_fmsub_ps(b_sum, _mm256_set1_ps(in.dx[mb]), _mm256_set1_ps(8.f * in.c[mb]));
        b_y[i][h] = _mm256_fmadd_ps(b_dw, b_v, b_y[i][h]);
      }
    }
  }
  const int64_t rows = std::min<int64_t>(kQ4Group, N - g * kQ4Group);
  for (int i = 0; i < I; i++) {
    alignas(32) float out[kQ4Group];
    _mm256_store_ps(out, b_y[i][0]);
    _mm256_store_ps(out + 8, b_y[i][1]);
    std::copy(out, out + rows, y + (m + i) * N + g * kQ4Group);
  }
}

#endif

// All M inputs against the weight row groups [begin, end) (the last group may hold fewer than 16 rows below N).
void q4_rows(const uint8_t* qs, const uint16_t* scales, const QuantizedInput& in, float* y, int64_t begin,
             int64_t end, int64_t M, int64_t N, int64_t Kp) {
  for (int64_t g = begin; g < end; g++) {
    int64_t m = 0;
    for (; m + kQ4Inputs <= M; m += kQ4Inputs) q4_tile<kQ4Inputs>(qs, scales, in, y, g, m, N, Kp);
    if constexpr (kQ4Inputs > 4)
      for (; m + 4 <= M; m += 4) q4_tile<4>(qs, scales, in, y, g, m, N, Kp);
    if constexpr (kQ4Inputs > 2)
      for (; m + 2 <= M; m += 2) q4_tile<2>(qs, scales, in, y, g, m, N, Kp);
    for (; m < M; m++) q4_tile<1>(qs, scales, in, y, g, m, N, Kp);
  }
}
