// geb::linear_f32: fp32 linear layer for CPU decoding. At batch 1 it is a matrix-vector product bound by how fast the
// weights stream from memory; this AVX2 kernel streams them faster than oneDNN's and MKL's here (BENCHMARKS.md).
// A few input rows (a prompt) go through a small tiled kernel that reads each weight row once for all of them;
// more than kMaxTiledInputs go to at::linear. The schema and the fake kernel are in geb/cpu_linear.py, which builds
// this.
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <immintrin.h>
#include <torch/library.h>
#include <torch/types.h>

namespace {

constexpr int64_t kRows = 4;  // weight rows at a time: each load of x serves four of them
constexpr int kInputs = 3;  // input rows a tile: 4 x 3 accumulators + 3 inputs + 1 weight = the 16 AVX registers
constexpr int64_t kMaxTiledInputs = 64;  // at 256 input rows MKL was as fast as the tiles (BENCHMARKS.md)

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

// y[n] = w[n, :] . x for n in [begin, end); w row-major with K columns.
void gemv_rows(const float* w, const float* x, float* y, int64_t begin, int64_t end, int64_t K) {
  int64_t n = begin;
  for (; n + kRows <= end; n += kRows) {
    const float* p_w = w + n * K;
    // Two accumulators a row keep two FMA chains in flight.
    __m256 b_acc0[kRows], b_acc1[kRows];
    for (int r = 0; r < kRows; r++) b_acc0[r] = b_acc1[r] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m256 b_x0 = _mm256_loadu_ps(x + k), b_x1 = _mm256_loadu_ps(x + k + 8);
      for (int r = 0; r < kRows; r++) {
        b_acc0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(p_w + r * K + k), b_x0, b_acc0[r]);
        b_acc1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(p_w + r * K + k + 8), b_x1, b_acc1[r]);
      }
    }
    for (int r = 0; r < kRows; r++) {
      float s = hsum(_mm256_add_ps(b_acc0[r], b_acc1[r]));
      for (int64_t j = k; j < K; j++) s += p_w[r * K + j] * x[j];
      y[n + r] = s;
    }
  }
  for (; n < end; n++) {  // the last N % 4 rows
    float s = 0.f;
    for (int64_t j = 0; j < K; j++) s += w[n * K + j] * x[j];
    y[n] = s;
  }
}

// y[m + i, n + r] = x[m + i, :] . w[n + r, :] for r < kRows, i < I; x is M x K, w N x K, y M x N, row-major.
template <int I>
void tile(const float* w, const float* x, float* y, int64_t n, int64_t m, int64_t N, int64_t K) {
  const float* p_w = w + n * K;
  const float* p_x = x + m * K;
  __m256 b_acc[kRows][I];
  for (int r = 0; r < kRows; r++)
    for (int i = 0; i < I; i++) b_acc[r][i] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 b_x[I];
    for (int i = 0; i < I; i++) b_x[i] = _mm256_loadu_ps(p_x + i * K + k);
    for (int r = 0; r < kRows; r++) {
      const __m256 b_w = _mm256_loadu_ps(p_w + r * K + k);
      for (int i = 0; i < I; i++) b_acc[r][i] = _mm256_fmadd_ps(b_w, b_x[i], b_acc[r][i]);
    }
  }
  for (int r = 0; r < kRows; r++) {
    for (int i = 0; i < I; i++) {
      float s = hsum(b_acc[r][i]);
      for (int64_t j = k; j < K; j++) s += p_w[r * K + j] * p_x[i * K + j];
      y[(m + i) * N + n + r] = s;
    }
  }
}

// y = x w^T for M input rows: each thread takes blocks of kRows weight rows and runs all inputs past each block.
void gemm_small(const float* w, const float* x, float* y, int64_t M, int64_t N, int64_t K) {
  at::parallel_for(0, N / kRows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; g++) {
      int64_t m = 0;
      for (; m + kInputs <= M; m += kInputs) tile<kInputs>(w, x, y, g * kRows, m, N, K);
      for (; m < M; m++) tile<1>(w, x, y, g * kRows, m, N, K);
    }
  });
  for (int64_t n = N / kRows * kRows; n < N; n++) {  // the last N % 4 weight rows
    for (int64_t m = 0; m < M; m++) {
      float s = 0.f;
      for (int64_t j = 0; j < K; j++) s += w[n * K + j] * x[m * K + j];
      y[m * N + n] = s;
    }
  }
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
  if (M > 1) {
    gemm_small(p_w, p_x, p_y, M, N, K);
  } else {
    // Contiguous blocks of rows per thread; multiples of kRows so only the last block has a scalar tail.
    at::parallel_for(0, (N + kRows - 1) / kRows, 16, [&](int64_t begin, int64_t end) {
      gemv_rows(p_w, p_x, p_y, begin * kRows, std::min(end * kRows, N), K);
    });
  }
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(geb, CPU, m) { m.impl("linear_f32", &linear_f32); }
