// One decode step's attention over the engine's K/V arena on CPU: each row rotates its new query
// and key (Llama's rotary embedding, when given cos/sin), writes its key and value at its
// position, then its query heads attend over that row's keys 0..position. Softmax in float32;
// loads and sums in ATen's vector types (AVX-512 / AVX2 / scalar, as built).
//
// Dims: B rows, H query heads, Hkv key/value heads, G = H / Hkv, C arena columns, Dh head width.

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>

#include "parallel.h"

#include <cstring>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kMaxChunks = 32;  // Dh / Vec::size() at most

inline Vec load(const float* p) { return Vec::loadu(p); }
inline Vec load(const c10::BFloat16* p) {
  Vec v;
  at::vec::load_to_float(p, v);
  return v;
}

inline float sum_lanes(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return v.reduce_add();
#else  // vec_base's reduce_add does not compile for the scalar capability (torch 2.11)
  float lanes[Vec::size()];
  v.store(lanes);
  float total = 0.f;
  for (int64_t i = 0; i < Vec::size(); ++i) total += lanes[i];
  return total;
#endif
}

// acc [chunks x VS] = sum over k of p[k] V[k] (V rows at s_col): a fixed number of chunks keeps
// the sums in vector registers
template <int64_t Chunks, typename T>
void weigh_fixed(const T* V, int64_t s_col, const float* p, int64_t keys, float* acc) {
  Vec sum[Chunks];
  for (int64_t c = 0; c < Chunks; ++c) sum[c] = Vec(0.f);
  for (int64_t k = 0; k < keys; ++k) {
    const Vec w(p[k]);
    const T* vr = V + k * s_col;
    for (int64_t c = 0; c < Chunks; ++c) sum[c] = at::vec::fmadd(w, load(vr + c * Vec::size()), sum[c]);
  }
  for (int64_t c = 0; c < Chunks; ++c) sum[c].store(acc + c * Vec::size());
}

template <typename T>
void weigh_values(const T* V, int64_t s_col, const float* p, int64_t keys, int64_t chunks, float* acc) {
  switch (chunks) {
    case 2: return weigh_fixed<2>(V, s_col, p, keys, acc);
    case 4: return weigh_fixed<4>(V, s_col, p, keys, acc);
    case 8: return weigh_fixed<8>(V, s_col, p, keys, acc);
    case 16: return weigh_fixed<16>(V, s_col, p, keys, acc);
  }
  std::fill(acc, acc + chunks * Vec::size(), 0.f);
  for (int64_t k = 0; k < keys; ++k)
    for (int64_t c = 0; c < chunks; ++c) {
      float* a = acc + c * Vec::size();
      at::vec::fmadd(Vec(p[k]), load(V + k * s_col + c * Vec::size()), Vec::loadu(a)).store(a);
    }
}

// lane-wise products of q and a key row, summed over the row's chunks (not yet across lanes)
template <typename T>
inline Vec dot_lanes(const float* q, const T* key, int64_t chunks) {
  Vec a = Vec::loadu(q) * load(key);
  for (int64_t c = 1; c < chunks; ++c) a = at::vec::fmadd(Vec::loadu(q + c * Vec::size()), load(key + c * Vec::size()), a);
  return a;
}

// out[j] = sum of a[j]'s lanes, j < 4
inline void sum_lanes4(const Vec* a, float* out) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 v0 = a[0], v1 = a[1], v2 = a[2], v3 = a[3];
  // per 128-bit lane: [v0 0+2, v1 0+2, v0 1+3, v1 1+3] and the same for v2, v3
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(v2, v3), _mm512_unpackhi_ps(v2, v3));
  // per 128-bit lane: [v0, v1, v2, v3] partial sums
  const __m512 t2 = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))));
  const __m256 u = _mm256_add_ps(_mm512_castps512_ps256(t2), _mm512_extractf32x8_ps(t2, 1));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1)));
#else
  for (int64_t j = 0; j < 4; ++j) out[j] = sum_lanes(a[j]);
#endif
}

struct Strides {
  int64_t b, h;  // elements between rows / heads of a [B, heads, Dh] input
};

// x [Dh] rotated by cos/sin [Dh] as transformers' apply_rotary_pos_emb: x cos + rotate_half(x)
// sin, each product and the sum rounded to T as its three ops do (no fused multiply-add)
template <typename T>
void rotate(const T* x, const T* cos, const T* sin, int64_t Dh, T* out) {
  const int64_t half = Dh / 2;
  for (int64_t j = 0; j < Dh; ++j) {
    const float turned = j < half ? -static_cast<float>(x[j + half]) : static_cast<float>(x[j - half]);
    const T a = static_cast<T>(static_cast<float>(x[j]) * static_cast<float>(cos[j]));
    const T b = static_cast<T>(turned * static_cast<float>(sin[j]));
    out[j] = static_cast<T>(static_cast<float>(a) + static_cast<float>(b));
  }
}

template <typename T>
void attend_rows(const torch::Tensor& kv, const torch::Tensor& q, const torch::Tensor& k_new,
                 const torch::Tensor& v_new, const int64_t* rows, const int64_t* positions,
                 float scale, const T* cos, const T* sin, torch::Tensor& out) {
  constexpr int64_t VS = Vec::size();
  const int64_t B = q.size(0), H = q.size(1), Dh = q.size(2), Hkv = kv.size(2), G = H / Hkv;
  const int64_t chunks = Dh / VS;
  const int64_t half = kv.stride(0), s_row = kv.stride(1), s_head = kv.stride(2), s_col = kv.stride(3);
  const Strides sq{q.stride(0), q.stride(1)}, sk{k_new.stride(0), k_new.stride(1)},
      sv{v_new.stride(0), v_new.stride(1)};
  T* arena = kv.data_ptr<T>();
  const T* qp = q.data_ptr<T>();
  const T* kp = k_new.data_ptr<T>();
  const T* vp = v_new.data_ptr<T>();
  T* op = out.data_ptr<T>();  // [B, H, Dh] contiguous
  speechchat::parallel_rows(B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * Dh), acc(G * Dh), scores;
    std::vector<T> turned(Dh);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv, pos = positions[b], keys = pos + 1;
      T* K = arena + rows[b] * s_row + h * s_head;  // [C, Dh] at s_col
      T* V = K + half;
      const T* kb = kp + b * sk.b + h * sk.h;
      if (cos != nullptr)
        rotate(kb, cos + b * Dh, sin + b * Dh, Dh, K + pos * s_col);
      else
        std::memcpy(K + pos * s_col, kb, Dh * sizeof(T));
      std::memcpy(V + pos * s_col, vp + b * sv.b + h * sv.h, Dh * sizeof(T));
      for (int64_t g = 0; g < G; ++g) {
        const T* qg = qp + b * sq.b + (h * G + g) * sq.h;
        if (cos != nullptr) {
          rotate(qg, cos + b * Dh, sin + b * Dh, Dh, turned.data());
          qg = turned.data();
        }
        for (int64_t c = 0; c < chunks; ++c)
          (load(qg + c * VS) * Vec(scale)).store(qf.data() + g * Dh + c * VS);
      }
      scores.resize(G * keys);  // [G, keys]
      int64_t k = 0;
      for (; k + 4 <= keys; k += 4)  // four keys' sums at once: one reduction for four
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf.data() + g * Dh;
          Vec a[4];
          for (int64_t j = 0; j < 4; ++j) a[j] = dot_lanes(qg, K + (k + j) * s_col, chunks);
          sum_lanes4(a, scores.data() + g * keys + k);
        }
      for (; k < keys; ++k)
        for (int64_t g = 0; g < G; ++g)
          scores[g * keys + k] = sum_lanes(dot_lanes(qf.data() + g * Dh, K + k * s_col, chunks));
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * keys;
        const float top = at::vec::reduce_all<float>(
            [](Vec x, Vec y) { return at::vec::maximum(x, y); }, s, keys);
        at::vec::map([top](Vec x) { return (x - Vec(top)).exp_u20(); }, s, s, keys);
        const float inv = 1.f / at::vec::reduce_all<float>([](Vec x, Vec y) { return x + y; }, s, keys);
        at::vec::map([inv](Vec x) { return x * Vec(inv); }, s, s, keys);
      }
      for (int64_t g = 0; g < G; ++g)  // V's rows again per query head: from cache, sums in registers
        weigh_values(V, s_col, scores.data() + g * keys, keys, chunks, acc.data() + g * Dh);
      T* o = op + (b * H + h * G) * Dh;
      for (int64_t j = 0; j < G * Dh; ++j) o[j] = static_cast<T>(acc[j]);
    }
  });
}

}  // namespace

// kv [2, R, Hkv, C, Dh]; q [B, H, Dh]; k_new, v_new [B, Hkv, Dh] (innermost dim contiguous);
// rows (distinct), positions [B] int64; cos, sin [B, Dh] as q, or both None (q and k come
// rotated) -> out [B, H, Dh]. Writes k_new (rotated) and v_new into kv first.
torch::Tensor decode_attention(torch::Tensor kv, torch::Tensor q, torch::Tensor k_new,
                               torch::Tensor v_new, torch::Tensor rows, torch::Tensor positions,
                               double scale, std::optional<torch::Tensor> cos,
                               std::optional<torch::Tensor> sin) {
  const int64_t Dh = q.size(2);
  TORCH_CHECK(kv.dim() == 5 && kv.size(0) == 2 && kv.size(4) == Dh, "kv must be [2, R, Hkv, C, Dh]");
  TORCH_CHECK(q.dim() == 3 && k_new.dim() == 3 && v_new.dim() == 3, "q/k/v must be [B, heads, Dh]");
  TORCH_CHECK(kv.device().is_cpu() && q.device().is_cpu() && k_new.device().is_cpu() &&
                  v_new.device().is_cpu(),
              "decode_attention runs on CPU tensors");
  TORCH_CHECK(k_new.sizes() == v_new.sizes() && k_new.size(0) == q.size(0) &&
                  k_new.size(1) == kv.size(2) && k_new.size(2) == Dh,
              "k and v must be [B, Hkv, Dh] as q and kv");
  TORCH_CHECK(kv.stride(4) == 1 && q.stride(2) == 1 && k_new.stride(2) == 1 && v_new.stride(2) == 1,
              "head dims must be contiguous");
  TORCH_CHECK(q.scalar_type() == kv.scalar_type() && k_new.scalar_type() == kv.scalar_type() &&
                  v_new.scalar_type() == kv.scalar_type(),
              "q, k, v and kv must share a dtype");
  TORCH_CHECK(Dh % Vec::size() == 0 && Dh / Vec::size() <= kMaxChunks, "unsupported head width");
  TORCH_CHECK(q.size(1) % kv.size(2) == 0, "query heads must be a multiple of K/V heads");
  TORCH_CHECK(rows.scalar_type() == at::kLong && positions.scalar_type() == at::kLong &&
                  rows.is_contiguous() && positions.is_contiguous() && rows.numel() == q.size(0) &&
                  positions.numel() == q.size(0),
              "rows and positions must be contiguous int64 [B]");
  TORCH_CHECK(cos.has_value() == sin.has_value(), "cos and sin come together");
  if (cos.has_value())
    TORCH_CHECK(cos->dim() == 2 && cos->sizes() == sin->sizes() && cos->size(0) == q.size(0) &&
                    cos->size(1) == Dh && Dh % 2 == 0 && cos->is_contiguous() &&
                    sin->is_contiguous() && cos->scalar_type() == q.scalar_type() &&
                    sin->scalar_type() == q.scalar_type() && cos->device().is_cpu() &&
                    sin->device().is_cpu(),
                "cos and sin must be contiguous [B, Dh] CPU tensors of q's dtype");
  auto out = torch::empty({q.size(0), q.size(1), Dh}, q.options());
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t* p = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < q.size(0); ++b) {
    TORCH_CHECK(r[b] >= 0 && r[b] < kv.size(1) && p[b] >= 0 && p[b] < kv.size(3),
                "row or position outside the arena");
    for (int64_t other = 0; other < b; ++other)  // a row's write and reads are one task's
      TORCH_CHECK(r[other] != r[b], "rows must be distinct");
  }
  const float s = static_cast<float>(scale);
  if (q.scalar_type() == at::kBFloat16) {
    using T = c10::BFloat16;
    const T* c = cos ? cos->data_ptr<T>() : nullptr;
    const T* sn = sin ? sin->data_ptr<T>() : nullptr;
    attend_rows<T>(kv, q, k_new, v_new, r, p, s, c, sn, out);
  } else if (q.scalar_type() == at::kFloat) {
    const float* c = cos ? cos->data_ptr<float>() : nullptr;
    const float* sn = sin ? sin->data_ptr<float>() : nullptr;
    attend_rows<float>(kv, q, k_new, v_new, r, p, s, c, sn, out);
  } else {
    TORCH_CHECK(false, "decode_attention: float32 or bfloat16 only");
  }
  return out;
}
