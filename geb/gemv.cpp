// geb::linear_f32, geb::linear_q4 and geb::linear_q8: fp32, 4-bit and 8-bit linear layers for CPU decoding. At
// batch 1 a linear layer is a matrix-vector product bound by how fast the weights stream from memory; geb's fp32
// kernels stream them faster than oneDNN's and MKL's here (BENCHMARKS.md). They are in geb/gemv_f32.h, compiled
// twice below as the Q4 tiles are: AVX2, and AVX-512 (512-bit vectors, 32 registers) where the CPU has AVX-512 VNNI.
// A few input rows (a prompt) go through a small tiled kernel that reads each weight row once for all of them;
// more than kMaxTiledInputs go to at::linear. The schema and the fake kernel are in geb/cpu_linear.py, which builds
// this.
//
// geb::linear_q4 takes weights quantized as ggml's Q4_0 (blocks of 32, w = (q - 8) * d, q in 0..15, d fp16) in this
// layout: qs [N, Kp / 2] bytes, each 32 bytes holding 64 weights (byte j: weight j in the low nibble, weight j + 32 in
// the high one), so one 256-bit load and two masks give two blocks; scales [N, Kp / 32] fp16. Kp is K rounded up to a
// multiple of 256 (zero padding) so scales go eight at a time. Activations are quantized per call to int8 per block
// of 32 (as ggml's Q8_0: d = max|x| / 127, round to nearest even). The block dot product multiplies the unsigned
// nibbles with the signed activations (vpmaddubsw, or vpdpbusd with AVX-512 VNNI: no sign trick needed) and subtracts
// 8 * sum(x_q) per block after the loop: w.x = sum_b dw_b dx_b (sum_j q_j xq_j - 8 sum_j xq_j). The tiles are in
// geb/gemv_q4.h, compiled twice below (AVX2, and AVX-512 VNNI by a target pragma: the rest of this file, built with
// -mavx2, never runs an AVX-512 instruction on a CPU without it).
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include <torch/library.h>
#include <torch/types.h>

namespace {

constexpr int64_t kMaxTiledInputs = 64;  // at 256 input rows MKL was as fast as the tiles (BENCHMARKS.md)
constexpr int64_t kF32Block = 12;  // a thread's share of rows is a multiple of both ISAs' row groups (4, and 4 or 6)

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

constexpr int64_t kQ4Group = 16;  // Q4 weight rows interleaved in one stream: one AVX-512 register's int32 lanes
constexpr int64_t kQ4PrefetchBytes = 2048;  // how far ahead in its group's stream q4_tile prefetches
constexpr int64_t kQ8Rows = 4;  // Q8 weight rows a tile: each activation block loaded serves four of them
constexpr int64_t kQ8PrefetchGroups = 4;  // how far ahead (in groups of kQ8Rows rows) q8_tile prefetches
// Longer prompts: rows dequantized to fp32 a chunk at a time and multiplied by at::mm. At 512 tokens that was about
// level with the integer tiles in a one-matrix timing and slower in a whole-model run, so only prompts past 1024 take
// it; geb/cpu_linear.py mirrors this as Q4_MAX_TILED_ROWS.
constexpr int64_t kQ4MaxTiledInputs = 1024;
constexpr int64_t kQ4ChunkRows = 256;

// Activations quantized per block of 32: xq [M, Kp] int8 (zero past K), dx [M, Kp / 32] scales and
// c [M, Kp / 32] = dx * sum(xq) per block: times 8 (Q4) or 128 (Q8, VNNI), the term that turns unsigned weights into
// signed ones.
struct QuantizedInput {
  std::vector<int8_t> xq;
  std::vector<float> dx, c;
};

QuantizedInput quantize_input(const float* x, int64_t M, int64_t K, int64_t Kp) {
  const int64_t nb = Kp / 32;
  QuantizedInput q{std::vector<int8_t>(M * Kp, 0), std::vector<float>(M * nb, 0.f), std::vector<float>(M * nb, 0.f)};
  at::parallel_for(0, M * nb, 64, [&](int64_t begin, int64_t end) {
    for (int64_t mb = begin; mb < end; mb++) {
      const int64_t m = mb / nb, k0 = (mb % nb) * 32, k1 = std::min(k0 + 32, K);
      const float* p_x = x + m * K;
      float amax = 0.f;
      for (int64_t k = k0; k < k1; k++) amax = std::max(amax, std::fabs(p_x[k]));
      const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
      int32_t sum = 0;
      for (int64_t k = k0; k < k1; k++) {
        const int32_t v = static_cast<int32_t>(std::nearbyint(p_x[k] * id));
        q.xq[m * Kp + k] = static_cast<int8_t>(v);
        sum += v;
      }
      q.dx[mb] = d;
      q.c[mb] = d * static_cast<float>(sum);
    }
  });
  return q;
}

constexpr int64_t kI8Group = 16;  // per-channel int8 weight rows interleaved in one stream (geb/gemv_i8.h)
constexpr int64_t kI8Pad = 64;  // per-channel int8 rows padded to a multiple of 64 weights

// Activations quantized to int8 with one scale an input row (d = max|x| / 127, round to nearest even): x [M, Kp]
// bytes, zero past K, as int8 for the AVX2 kernel, or plus 128 as unsigned bytes for the VNNI kernel (`offset`).
struct RowQuantizedInput {
  std::vector<uint8_t> x;
  std::vector<float> dx;
};

RowQuantizedInput quantize_input_rows(const float* x, int64_t M, int64_t K, int64_t Kp, bool offset) {
  const int32_t zero = offset ? 128 : 0;
  RowQuantizedInput q{std::vector<uint8_t>(M * Kp, static_cast<uint8_t>(zero)), std::vector<float>(M, 0.f)};
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; m++) {
      const float* p_x = x + m * K;
      float amax = 0.f;
      for (int64_t k = 0; k < K; k++) amax = std::max(amax, std::fabs(p_x[k]));
      const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
      for (int64_t k = 0; k < K; k++)
        q.x[m * Kp + k] = static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint(p_x[k] * id)) + zero);
      q.dx[m] = d;
    }
  });
  return q;
}

namespace avx2 {
constexpr int kQ8Inputs = 3;  // Q8 input rows a prompt tile: 4 x 3 accumulators + weights and inputs = 16 registers
constexpr int kQ4Inputs = 2;  // Q4 input rows a tile: 2 x 2 halves x (int16 sums + fp32 sums) of 16 registers
constexpr int kI8Inputs = 4;  // per-channel int8: 4 x 2 halves of int32 sums
// fp32: four rows a token step (each load of x serves four; two accumulators a row), 4 x 3 prompt tiles (12
// accumulators + 3 inputs + 1 weight = the 16 registers).
constexpr int kF32Rows = 4, kF32Accs = 2, kF32TileRows = 4, kF32TileInputs = 3, kF32PrefetchGroups = 0;
#include "gemv_f32.h"
#include "gemv_q4.h"
#include "gemv_q8.h"
#include "gemv_i8.h"
}  // namespace avx2

namespace vnni {
constexpr int kQ8Inputs = 4;  // 4 x 4 accumulators (of 32 registers); 4 x 5 and 4 x 6 were slower (40-55 vs 66 GMAC/s)
constexpr int kQ4Inputs = 8;  // Q4: 8 x (int32 + fp32 sums) of 32 registers
constexpr int kI8Inputs = 8;  // per-channel int8: 8 int32 sums
#define GEB_Q4_VNNI
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
// fp32: four rows a token step, two accumulators a row, the rows four groups ahead prefetched (a compiled geb-1.3b
// decode 1.12x the AVX2 copy's; one row at a time and more accumulators were slower); 6 x 4 prompt tiles (24
// accumulators + 4 inputs + 1 weight of the 32 registers; 1.3x the AVX2 4 x 3 tiles at 16 inputs).
constexpr int kF32Rows = 4, kF32Accs = 2, kF32TileRows = 6, kF32TileInputs = 4, kF32PrefetchGroups = 4;
#include "gemv_f32.h"
#include "gemv_q4.h"
#include "gemv_q8.h"
#include "gemv_i8.h"
#pragma GCC pop_options
#undef GEB_Q4_VNNI
}  // namespace vnni

// The fp32, Q4_0, Q8_0 and int8 kernels this CPU runs: AVX-512 VNNI where the CPU (and OS) has it, else AVX2;
// GEB_CPU_ISA=avx2 in the environment, or geb::q4_kernel("avx2"), forces AVX2 (so both are tested on an AVX-512
// machine).
bool cpu_has_vnni() {
  __builtin_cpu_init();  // this runs from a static initializer, maybe before libgcc's own
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

bool initial_use_vnni() {
  const char* isa = std::getenv("GEB_CPU_ISA");
  return cpu_has_vnni() && !(isa != nullptr && std::string(isa) == "avx2");
}

std::atomic<bool> g_q4_vnni{initial_use_vnni()};

// Set the Q4 kernels ("avx2" or "vnni"; "" leaves them) and return those in use.
std::string q4_kernel(const std::string& isa) {
  TORCH_CHECK(isa.empty() || isa == "avx2" || isa == "vnni", "geb::q4_kernel: isa must be 'avx2', 'vnni' or '', got '",
              isa, "'");
  TORCH_CHECK(isa != "vnni" || cpu_has_vnni(), "geb::q4_kernel: this CPU has no AVX-512 VNNI");
  if (!isa.empty()) g_q4_vnni = isa == "vnni";
  return g_q4_vnni ? "vnni" : "avx2";
}

at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.is_contiguous(),
              "geb::linear_f32: weight must be a contiguous 2-D float32 tensor, got sizes ", weight.sizes(),
              ", strides ", weight.strides(), ", ", weight.scalar_type());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "geb::linear_f32: x's last dimension must be ", K, ", got ", x.sizes());
  TORCH_CHECK(!bias.has_value() || !bias->defined() || (bias->dim() == 1 && bias->size(0) == N &&
                                                        bias->scalar_type() == at::kFloat),
              "geb::linear_f32: bias must be float32 of shape [", N, "], got ", bias->sizes(), " ",
              bias->scalar_type());
  TORCH_CHECK(!(at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad())),
              "geb::linear_f32 is for inference and has no backward: call it under torch.no_grad()");
  const int64_t M = K > 0 ? x.numel() / K : 0;
  if (x.scalar_type() != at::kFloat || M == 0 || M > kMaxTiledInputs) return at::linear(x, weight, bias);
  const at::Tensor x_c = x.contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options());
  const float* p_x = x_c.data_ptr<float>();
  const float* p_w = weight.data_ptr<float>();
  float* p_y = y.data_ptr<float>();
  // One contiguous block of rows a thread, in multiples of kF32Block so only the last block has tail rows.
  const bool avx512 = g_q4_vnni;
  const int64_t blocks = (N + kF32Block - 1) / kF32Block;
  if (M > 1) {
    const auto rows = avx512 ? &vnni::f32_gemm_rows : &avx2::f32_gemm_rows;
    at::parallel_for(0, blocks, 2, [&](int64_t begin, int64_t end) {
      rows(p_w, p_x, p_y, begin * kF32Block, std::min(end * kF32Block, N), M, N, K);
    });
  } else {
    const auto rows = avx512 ? &vnni::f32_gemv : &avx2::f32_gemv;
    at::parallel_for(0, blocks, 6, [&](int64_t begin, int64_t end) {
      rows(p_w, p_x, p_y, begin * kF32Block, std::min(end * kF32Block, N), K);
    });
  }
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}

// w [n1 - n0, K] fp32 = rows n0.. of the Q4 weight, (q - 8) * d.
void q4_dequantize_rows(const uint8_t* qs, const uint16_t* scales, float* w, int64_t n0, int64_t n1, int64_t K,
                        int64_t Kp) {
  const int64_t nb = Kp / 32;
  at::parallel_for(n0, n1, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; n++) {
      const int64_t g = n / kQ4Group, r = n % kQ4Group;
      float* p_w = w + (n - n0) * K;
      for (int64_t b = 0; b < nb && b * 32 < K; b++) {
        const float d = _cvtsh_ss(scales[(g * nb + b) * kQ4Group + r]);
        const uint8_t* p_q = qs + (g * nb + b) * 256 + 4 * r;
        for (int64_t j = 0; j < 16; j++) {
          const uint8_t q = p_q[(j / 4) * 64 + j % 4];  // byte j of the row's ggml block
          if (b * 32 + j < K) p_w[b * 32 + j] = static_cast<float>((q & 0x0F) - 8) * d;
          if (b * 32 + 16 + j < K) p_w[b * 32 + 16 + j] = static_cast<float>((q >> 4) - 8) * d;
        }
      }
    }
  });
}

// w [n1 - n0, K] fp32 = rows n0.. of the Q8 weight, q * d.
void q8_dequantize_rows(const int8_t* qs, const uint16_t* scales, float* w, int64_t n0, int64_t n1, int64_t K,
                        int64_t Kp) {
  const int64_t nb = Kp / 32;
  at::parallel_for(n0, n1, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; n++)
      for (int64_t k = 0; k < K; k++)
        w[(n - n0) * K + k] = static_cast<float>(qs[n * Kp + k]) * _cvtsh_ss(scales[n * nb + k / 32]);
  });
}

// What every integer operator checks of its input: x's last dimension is K, and it needs no gradient.
void check_input(const char* op, const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, op, ": x's last dimension must be ", K, ", got ", x.sizes());
  TORCH_CHECK(!(at::GradMode::is_enabled() && x.requires_grad()),
              op, " is for inference and has no backward: call it under torch.no_grad()");
}

// y = x2 w^T through at::mm on the weight dequantized kQ4ChunkRows rows at a time (long prompts).
template <typename Q, typename S, typename Dequantize>
at::Tensor linear_blocks_gemm(const at::Tensor& x2, const Q* qs, const S* scales, int64_t N, int64_t K, int64_t Kp,
                              Dequantize dequantize) {
  at::Tensor y = at::empty({x2.size(0), N}, x2.options());
  at::Tensor w = at::empty({std::min(kQ4ChunkRows, N), K}, x2.options());
  for (int64_t n0 = 0; n0 < N; n0 += kQ4ChunkRows) {
    const int64_t n1 = std::min(n0 + kQ4ChunkRows, N);
    dequantize(qs, scales, w.data_ptr<float>(), n0, n1, K, Kp);
    y.narrow(1, n0, n1 - n0).copy_(at::mm(x2, w.narrow(0, 0, n1 - n0).t()));
  }
  return y;
}

// w [n1 - n0, K] fp32 = rows n0.. of the per-channel int8 weight, q * d.
void i8_dequantize_rows(const int8_t* qs, const float* scales, float* w, int64_t n0, int64_t n1, int64_t K,
                        int64_t Kp) {
  at::parallel_for(n0, n1, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; n++) {
      const int8_t* p_q = qs + (n / kI8Group) * kI8Group * Kp + (n % kI8Group) * 4;
      for (int64_t k = 0; k < K; k++)
        w[(n - n0) * K + k] = static_cast<float>(p_q[(k / 4) * kI8Group * 4 + k % 4]) * scales[n];
    }
  });
}

// What linear_q4 and linear_q8 share once each has checked its qs and set Kp: the scales and input checks, then long
// prompts through at::mm on dequantized rows and the rest through the integer tiles (rows_avx2/rows_vnni), each
// thread taking whole groups of `group` rows. qs and scales hold the N rows padded to a multiple of `row_multiple`.
template <typename Q, typename Dequantize, typename Rows>
at::Tensor linear_blocks(const char* op, const at::Tensor& x, const Q* p_qs, int64_t qs_rows, const at::Tensor& scales,
                         int64_t N, int64_t row_multiple, int64_t group, int64_t K, int64_t Kp, Dequantize dequantize,
                         Rows rows_avx2, Rows rows_vnni) {
  const int64_t groups = (N + group - 1) / group, padded = (N + row_multiple - 1) / row_multiple * row_multiple;
  TORCH_CHECK(N >= 0 && qs_rows == padded, op, ": qs must hold ", padded, " rows (out_features ", N,
              " rounded up to a multiple of ", row_multiple, "), got ", qs_rows);
  TORCH_CHECK(scales.dim() == 2 && scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  scales.size(0) == qs_rows && scales.size(1) == Kp / 32,
              op, ": scales must be a contiguous float16 tensor of [", qs_rows, ", ", Kp / 32, "], got ",
              scales.sizes(), ", ", scales.scalar_type());
  TORCH_CHECK(K > Kp - 256 && K <= Kp, op, ": in_features ", K, " does not fit qs of ", Kp, " columns");
  check_input(op, x, K);
  const at::Tensor x_c = x.to(at::kFloat).contiguous();
  const int64_t M = x_c.numel() / K;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x_c.options());
  if (M == 0 || N == 0) return y.to(x.scalar_type());
  const uint16_t* p_s = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  if (M > kQ4MaxTiledInputs) {
    const at::Tensor y2 = linear_blocks_gemm(x_c.reshape({M, K}), p_qs, p_s, N, K, Kp, dequantize);
    return y2.reshape(out_shape).to(x.scalar_type());
  }
  const QuantizedInput in = quantize_input(x_c.data_ptr<float>(), M, K, Kp);
  float* p_y = y.data_ptr<float>();
  const Rows rows = g_q4_vnni ? rows_vnni : rows_avx2;
  at::parallel_for(0, groups, M > 1 ? 1 : 64 / group, [&](int64_t begin, int64_t end) {
    rows(p_qs, p_s, in, p_y, begin, end, M, N, Kp);
  });
  return y.to(x.scalar_type());
}

at::Tensor linear_q4(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales, int64_t in_features,
                     int64_t out_features) {
  TORCH_CHECK(qs.dim() == 2 && qs.scalar_type() == at::kByte && qs.is_contiguous() && qs.size(1) % 128 == 0,
              "geb::linear_q4: qs must be a contiguous 2-D uint8 tensor of [N, Kp / 2] with Kp % 256 == 0, got ",
              qs.sizes(), ", ", qs.scalar_type());
  return linear_blocks("geb::linear_q4", x, qs.data_ptr<uint8_t>(), qs.size(0), scales, out_features, kQ4Group,
                       kQ4Group, in_features, qs.size(1) * 2, q4_dequantize_rows, &avx2::q4_rows, &vnni::q4_rows);
}

// geb::linear_q8: weights as ggml's Q8_0 (blocks of 32, w = q * d, q int8 in -127..127, d fp16), stored as they are:
// qs [N, Kp] int8, scales [N, Kp / 32] fp16, Kp = K rounded up to a multiple of 256 (zeros). The same activation
// quantization and tiles as linear_q4 (geb/gemv_q8.h).
at::Tensor linear_q8(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales, int64_t in_features) {
  TORCH_CHECK(qs.dim() == 2 && qs.scalar_type() == at::kChar && qs.is_contiguous() && qs.size(1) % 256 == 0,
              "geb::linear_q8: qs must be a contiguous 2-D int8 tensor of [N, Kp] with Kp % 256 == 0, got ",
              qs.sizes(), ", ", qs.scalar_type());
  return linear_blocks("geb::linear_q8", x, qs.data_ptr<int8_t>(), qs.size(0), scales, qs.size(0), 1, kQ8Rows,
                       in_features, qs.size(1), q8_dequantize_rows, &avx2::q8_rows, &vnni::q8_rows);
}

// geb::linear_i8: int8 weights with one fp32 scale a row (w = q * d), rows interleaved in groups of kI8Group
// (geb/gemv_i8.h): qs [Np, Kp] int8, Np = N rounded up to 16, Kp = K to kI8Pad (zeros); scales [Np] fp32;
// sums [Np] int32 = 128 * sum_k q_k (the VNNI kernel's correction). Activations are quantized per input row at each
// call; prompts longer than kQ4MaxTiledInputs go through at::mm on the dequantized weight.
at::Tensor linear_i8(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales, const at::Tensor& sums,
                     int64_t in_features, int64_t out_features) {
  const char* op = "geb::linear_i8";
  const int64_t N = out_features, K = in_features, Np = (N + kI8Group - 1) / kI8Group * kI8Group;
  TORCH_CHECK(qs.dim() == 2 && qs.scalar_type() == at::kChar && qs.is_contiguous() && qs.size(0) == Np &&
                  qs.size(1) % kI8Pad == 0 && K > qs.size(1) - kI8Pad && K <= qs.size(1),
              op, ": qs must be a contiguous int8 tensor of [", Np, ", in_features ", K, " rounded up to ", kI8Pad,
              "], got ", qs.sizes(), ", ", qs.scalar_type());
  TORCH_CHECK(scales.dim() == 1 && scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.size(0) == Np, op, ": scales must be a contiguous float32 tensor of [", Np, "], got ",
              scales.sizes(), ", ", scales.scalar_type());
  TORCH_CHECK(sums.dim() == 1 && sums.scalar_type() == at::kInt && sums.is_contiguous() && sums.size(0) == Np,
              op, ": sums must be a contiguous int32 tensor of [", Np, "], got ", sums.sizes(), ", ",
              sums.scalar_type());
  check_input(op, x, K);
  const int64_t Kp = qs.size(1);
  const at::Tensor x_c = x.to(at::kFloat).contiguous();
  const int64_t M = x_c.numel() / std::max<int64_t>(K, 1);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  if (M == 0 || N == 0) return at::empty(out_shape, x_c.options()).to(x.scalar_type());
  const int8_t* p_q = qs.data_ptr<int8_t>();
  const float* p_s = scales.data_ptr<float>();
  if (M > kQ4MaxTiledInputs) {
    const at::Tensor y2 = linear_blocks_gemm(x_c.reshape({M, K}), p_q, p_s, N, K, Kp, i8_dequantize_rows);
    return y2.reshape(out_shape).to(x.scalar_type());
  }
  at::Tensor y = at::empty(out_shape, x_c.options());
  const bool vnni = g_q4_vnni;
  const RowQuantizedInput in = quantize_input_rows(x_c.data_ptr<float>(), M, K, Kp, vnni);
  const int32_t* p_sums = sums.data_ptr<int32_t>();
  float* p_y = y.data_ptr<float>();
  at::parallel_for(0, Np / kI8Group, M > 1 ? 1 : 4, [&](int64_t begin, int64_t end) {
    (vnni ? vnni::i8_rows : avx2::i8_rows)(p_q, p_s, p_sums, in, p_y, begin, end, M, N, Kp);
  });
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(geb, CPU, m) {
  m.impl("linear_f32", &linear_f32);
  m.impl("linear_q4", &linear_q4);
  m.impl("linear_q8", &linear_q8);
  m.impl("linear_i8", &linear_i8);
}

TORCH_LIBRARY_FRAGMENT(geb, m) {
  m.def("q4_kernel(str isa=\"\") -> str", &q4_kernel);
}
