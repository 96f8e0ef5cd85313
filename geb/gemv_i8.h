// The per-channel int8 tiles of geb/gemv.cpp, included there twice as geb/gemv_q4.h is: AVX2 (256-bit, a group's
// 16 rows as two halves of 8) and AVX-512 VNNI (GEB_Q4_VNNI defined; 512-bit, 16 rows a register). Weights are int8
// with one scale a row, activations int8 with one scale an input row, so a whole row's products add up in int32
// (|sum| <= 255 * 127 * K, below 2^31 for K < 66,000): no per-block conversion, one instruction (VNNI) a 64 bytes.
//
// Layout: for each group of 16 rows, each 4 columns k..k+3 of the row: 64 bytes, bytes 4r..4r+3 row r's weights
// k..k+3: a 32-bit lane of a loaded register is one row, and one 4-byte broadcast of the activations serves all 16.
// VNNI multiplies the activations plus 128 (unsigned, as vpdpbusd wants them) by the signed weights and subtracts
// 128 * sum_k q_k per row (`sums`, computed when the weights are quantized); AVX2 multiplies |q| by x with q's sign
// (vpsignb) as the Q8_0 tiles do, and needs no correction.

#ifdef GEB_Q4_VNNI

// y[m + i, 16 g + r] for r < 16 (those below N), i < I: group g against the quantized inputs m...
template <int I>
void i8_tile(const int8_t* qs, const float* scales, const int32_t* sums, const RowQuantizedInput& in, float* y,
             int64_t g, int64_t m, int64_t N, int64_t Kp) {
  constexpr int A = I == 1 ? 4 : 1;  // accumulators an input: one alone would wait on vpdpbusd's latency
  const int8_t* p_q = qs + g * kI8Group * Kp;
  __m512i b_acc[I][A];  // [16 rows] int32
  for (int i = 0; i < I; i++)
    for (int a = 0; a < A; a++) b_acc[i][a] = _mm512_setzero_si512();
  for (int64_t c = 0; c < Kp / 4; c += A) {
    for (int a = 0; a < A; a++) {
      const __m512i b_w = _mm512_loadu_si512(p_q + (c + a) * 64);
      for (int i = 0; i < I; i++) {
        const int32_t* p_x = reinterpret_cast<const int32_t*>(in.x.data() + (m + i) * Kp);
        b_acc[i][a] = _mm512_dpbusd_epi32(b_acc[i][a], _mm512_set1_epi32(p_x[c + a]), b_w);
      }
    }
  }
  const __m512i b_sums = _mm512_loadu_si512(sums + g * kI8Group);
  const __m512 b_dw = _mm512_loadu_ps(scales + g * kI8Group);
  const int64_t rows = std::min<int64_t>(kI8Group, N - g * kI8Group);
  const __mmask16 m_rows = static_cast<__mmask16>((1u << rows) - 1);
  for (int i = 0; i < I; i++) {
    __m512i b_sum = b_acc[i][0];
    for (int a = 1; a < A; a++) b_sum = _mm512_add_epi32(b_sum, b_acc[i][a]);
    const __m512 b_y = _mm512_cvtepi32_ps(_mm512_sub_epi32(b_sum, b_sums));
    _mm512_mask_storeu_ps(y + (m + i) * N + g * kI8Group, m_rows,
                          _mm512_mul_ps(b_y, _mm512_mul_ps(b_dw, _mm512_set1_ps(in.dx[m + i]))));
  }
}

#else

template <int I>
void i8_tile(const int8_t* qs, const float* scales, const int32_t* sums, const RowQuantizedInput& in, float* y,
             int64_t g, int64_t m, int64_t N, int64_t Kp) {
  const int8_t* p_q = qs + g * kI8Group * Kp;
  const __m256i b_ones = _mm256_set1_epi16(1);
  __m256i b_acc[I][2];  // [8 rows] int32 per input and half
  for (int i = 0; i < I; i++) b_acc[i][0] = b_acc[i][1] = _mm256_setzero_si256();
  for (int64_t c = 0; c < Kp / 4; c++) {
    for (int h = 0; h < 2; h++) {
      const __m256i b_w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p_q + c * 64 + h * 32));
      const __m256i b_abs = _mm256_sign_epi8(b_w, b_w);  // |q|
      for (int i = 0; i < I; i++) {
        const int32_t* p_x = reinterpret_cast<const int32_t*>(in.x.data() + (m + i) * Kp);
        // |q| * (x with q's sign): |q|, |x| <= 127, so vpmaddubsw's int16 pairs never saturate.
        const __m256i b_x = _mm256_sign_epi8(_mm256_set1_epi32(p_x[c]), b_w);
        b_acc[i][h] = _mm256_add_epi32(b_acc[i][h], _mm256_madd_epi16(_mm256_maddubs_epi16(b_abs, b_x), b_ones));
      }
    }
  }
  (void)sums;
  const int64_t rows = std::min<int64_t>(kI8Group, N - g * kI8Group);
  for (int i = 0; i < I; i++) {
    alignas(32) float out[kI8Group];
    const __m256 b_dx = _mm256_set1_ps(in.dx[m + i]);
    for (int h = 0; h < 2; h++)
      _mm256_store_ps(out + 8 * h, _mm256_mul_ps(_mm256_cvtepi32_ps(b_acc[i][h]),
                                                 _mm256_mul_ps(_mm256_loadu_ps(scales + g * kI8Group + 8 * h), b_dx)));
    std::copy(out, out + rows, y + (m + i) * N + g * kI8Group);
  }
}

#endif

// All M inputs against the weight row groups [begin, end) (the last group may hold fewer than 16 rows below N).
void i8_rows(const int8_t* qs, const float* scales, const int32_t* sums, const RowQuantizedInput& in, float* y,
             int64_t begin, int64_t end, int64_t M, int64_t N, int64_t Kp) {
  for (int64_t g = begin; g < end; g++) {
    int64_t m = 0;
    for (; m + kI8Inputs <= M; m += kI8Inputs) i8_tile<kI8Inputs>(qs, scales, sums, in, y, g, m, N, Kp);
    if constexpr (kI8Inputs > 4)
      for (; m + 4 <= M; m += 4) i8_tile<4>(qs, scales, sums, in, y, g, m, N, Kp);
    if constexpr (kI8Inputs > 2)
      for (; m + 2 <= M; m += 2) i8_tile<2>(qs, scales, sums, in, y, g, m, N, Kp);
    for (; m < M; m++) i8_tile<1>(qs, scales, sums, in, y, g, m, N, Kp);
  }
}
