// The pointwise parts of a CPU decode step that run between its projections, each one call in
// place of transformers' 2 to 8 ops: Llama's RMSNorm (with the residual add before it) and the
// MLP's SiLU-and-multiply. Results round to the model's dtype where the module ops do.
//
// Dims: N rows, D width, I MLP width.

#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>

#include "parallel.h"

#include <atomic>
#include <cmath>
#include <vector>

namespace decode_ops {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kGrain = 4;  // rows per task: a step's rows are a few microseconds each

// one row x [D] as float32 into out [D]
template <typename T>
void to_float(const T* x, int64_t D, float* out) {
  for (int64_t j = 0; j < D; ++j) out[j] = static_cast<float>(x[j]);
}

// LlamaRMSNorm of one float32 row h [D]: weight * (h * rsqrt(mean(h^2) + eps)).to(T)
template <typename T>
void norm_row(const float* h, const T* weight, int64_t D, float eps, T* out) {
  int64_t j = 0;
  Vec squares(0.f);
  for (; j + Vec::size() <= D; j += Vec::size()) {
    const Vec v = Vec::loadu(h + j);
    squares = squares + v * v;
  }
  float lanes[Vec::size()];
  squares.store(lanes);
  float total = 0.f;
  for (int64_t l = 0; l < Vec::size(); ++l) total += lanes[l];
  for (; j < D; ++j) total += h[j] * h[j];
  const float inv = 1.f / std::sqrt(total / static_cast<float>(D) + eps);
  for (j = 0; j < D; ++j) {
    const T scaled = static_cast<T>(h[j] * inv);
    out[j] = static_cast<T>(static_cast<float>(weight[j]) * static_cast<float>(scaled));
  }
}

void check_rows(const torch::Tensor& x, const torch::Tensor& weight, const char* what) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.device().is_cpu(),
              what, ": x must be a [N, D] CPU tensor, rows contiguous");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous() &&
                  weight.scalar_type() == x.scalar_type() && weight.device().is_cpu(),
              what, ": weight must be [D] of x's dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              what, ": float32 or bfloat16 only");
}

template <typename T>
void norm_rows(const torch::Tensor& x, torch::Tensor* delta, const torch::Tensor& weight,
               float eps, torch::Tensor& out) {
  const int64_t N = x.size(0), D = x.size(1);
  T* xp = x.data_ptr<T>();
  const T* dp = delta ? delta->data_ptr<T>() : nullptr;
  const T* wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  speechchat::parallel_rows(N, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> h(D);
    for (int64_t n = begin; n < end; ++n) {
      T* row = xp + n * x.stride(0);
      if (dp != nullptr) {  // the residual add, rounded to T as `x + delta` is
        const T* d = dp + n * delta->stride(0);
        for (int64_t j = 0; j < D; ++j)
          row[j] = static_cast<T>(static_cast<float>(row[j]) + static_cast<float>(d[j]));
      }
      to_float(row, D, h.data());
      norm_row(h.data(), wp, D, eps, op + n * D);
    }
  });
}

template <typename T>
void silu_mul_rows(const torch::Tensor& gate_up, int64_t I, torch::Tensor& out) {
  const int64_t N = gate_up.size(0);
  const T* gp = gate_up.data_ptr<T>();
  T* op = out.data_ptr<T>();
  speechchat::parallel_rows(N, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> gate(I);
    for (int64_t n = begin; n < end; ++n) {
      const T* g = gp + n * gate_up.stride(0);
      const T* u = g + I;
      to_float(g, I, gate.data());
      int64_t j = 0;
      for (; j + Vec::size() <= I; j += Vec::size()) {  // as ATen's SiLU: x / (1 + exp(-x))
        const Vec x = Vec::loadu(gate.data() + j);
        (x / (Vec(1.f) + x.neg().exp())).store(gate.data() + j);
      }
      for (; j < I; ++j) gate[j] = gate[j] / (1.f + std::exp(-gate[j]));
      T* o = op + n * I;
      for (j = 0; j < I; ++j) {
        const T act = static_cast<T>(gate[j]);
        o[j] = static_cast<T>(static_cast<float>(act) * static_cast<float>(u[j]));
      }
    }
  });
}

}  // namespace decode_ops

// x [N, D] -> LlamaRMSNorm(x) [N, D]
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  decode_ops::check_rows(x, weight, "rms_norm");
  auto out = torch::empty({x.size(0), x.size(1)}, x.options());
  if (x.scalar_type() == at::kBFloat16)
    decode_ops::norm_rows<c10::BFloat16>(x, nullptr, weight, static_cast<float>(eps), out);
  else
    decode_ops::norm_rows<float>(x, nullptr, weight, static_cast<float>(eps), out);
  return out;
}

// x += delta (in place, both [N, D]) -> LlamaRMSNorm(x) [N, D]
torch::Tensor add_rms_norm(torch::Tensor x, torch::Tensor delta, torch::Tensor weight,
                           double eps) {
  decode_ops::check_rows(x, weight, "add_rms_norm");
  TORCH_CHECK(delta.sizes() == x.sizes() && delta.stride(1) == 1 &&
                  delta.scalar_type() == x.scalar_type() && delta.device().is_cpu(),
              "add_rms_norm: delta must be [N, D] as x, rows contiguous");
  auto out = torch::empty({x.size(0), x.size(1)}, x.options());
  if (x.scalar_type() == at::kBFloat16)
    decode_ops::norm_rows<c10::BFloat16>(x, &delta, weight, static_cast<float>(eps), out);
  else
    decode_ops::norm_rows<float>(x, &delta, weight, static_cast<float>(eps), out);
  return out;
}

// gate_up [N, 2 I] (gate, then up) -> silu(gate) * up [N, I]
torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 && gate_up.stride(1) == 1 &&
                  gate_up.device().is_cpu(),
              "silu_mul: gate_up must be a [N, 2 I] CPU tensor, rows contiguous");
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat || gate_up.scalar_type() == at::kBFloat16,
              "silu_mul: float32 or bfloat16 only");
  const int64_t I = gate_up.size(1) / 2;
  auto out = torch::empty({gate_up.size(0), I}, gate_up.options());
  if (gate_up.scalar_type() == at::kBFloat16)
    decode_ops::silu_mul_rows<c10::BFloat16>(gate_up, I, out);
  else
    decode_ops::silu_mul_rows<float>(gate_up, I, out);
  return out;
}

// how many tasks a parallel loop over many items runs as in this build: the calling thread's
// intra-op thread count where it was built with OpenMP, 1 where the pragmas were left out
int64_t parallel_tasks() {
  std::atomic<int64_t> tasks{0};
  speechchat::parallel_rows(1 << 16, 1, [&](int64_t, int64_t) { tasks++; });
  return tasks.load();
}
