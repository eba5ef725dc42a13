// Grouped-query attention of a few new queries (a decode step's token, a draft tree's) over one layer
// of the KV cache, read in place. XLA copied each layer's [kv_heads, S, head_dim] slice out of the
// stacked cache before attending (two copies a layer, a step) and transposed the queries and the
// output around its products whenever there was more than one new token; at S = 1024 attention was
// a third of a decode step. The same call first applies RoPE to the new queries and keys and writes
// the keys and values (and the cache's pending entries) into the layer in place: as XLA ops around
// the call, that took seven small ops per layer, about 2 ms of a 27 ms speculative step.
//
// Every sum runs over the slots in slot order, one query per vector lane, skipping the slots that
// query does not see: a query's result depends only on which keys it sees and in what order, not on
// the other queries of the call or the slots between. A draft tree puts a node's ancestors in
// increasing slots, as the sequence puts them after verification, so a tree's verification and
// one-token steps compute bitwise the same attention.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace redrafter;

namespace {

constexpr int64_t kMaxQueries = 256;  // new tokens x query heads per KV head (cpu_attention.py checks)
constexpr int64_t kSlots = 8;         // slots scored at once

// e^x lane by lane, for x <= 0 (Cephes' single-precision range reduction and polynomial, ~1 ulp).
inline Vec Exp(Vec x) {
  x = x < -87.0f ? Vec{} - 87.0f : x;
  const IVec n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, IVec);  // x <= 0: rounds to nearest
  const Vec nf = __builtin_convertvector(n, Vec);
  const Vec r = x - nf * 0.693359375f - nf * -2.12194440e-4f;  // x - n ln 2, ln 2 in two parts
  Vec p = Vec{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const IVec bits = (n + 127) << 23;  // 2^n
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// acc[lane][DV] = sum over the live slots i of p[i][lane] v[live[i]], for head dim D = kLanes DV: lanes in
// groups whose sums stay in registers, each group streaming the values once. A lane that does not
// see a slot has p = 0 there and adds exactly nothing.
template <int DV>
void Weighted(const Vec* p, const float* v, const std::vector<int64_t>& live, int64_t queries, int64_t vecs, Vec* acc) {
  constexpr int64_t kGroup = DV >= kAccumulators ? 1 : kAccumulators / DV;
  for (int64_t l0 = 0; l0 < queries; l0 += kGroup) {
    const int64_t n = std::min(kGroup, queries - l0);
    Vec sums[kGroup][DV] = {};
    for (size_t i = 0; i < live.size(); ++i) {
      const Vec* value = reinterpret_cast<const Vec*>(v + live[i] * DV * kLanes);
      for (int64_t l = 0; l < kGroup; ++l) {
        const int64_t lane = l0 + std::min(l, n - 1);
        const float w = p[i * vecs + lane / kLanes][lane % kLanes];
        for (int64_t e = 0; e < DV; ++e) sums[l][e] += w * value[e];
      }
    }
    for (int64_t l = 0; l < n; ++l)
      for (int64_t e = 0; e < DV; ++e) acc[(l0 + l) * DV + e] = sums[l][e];
  }
}

using WeightedFn = void (*)(const Vec*, const float*, const std::vector<int64_t>&, int64_t, int64_t, Vec*);
template <int64_t... DV>
constexpr auto WeightedTable(std::integer_sequence<int64_t, DV...>) {
  return std::array<WeightedFn, sizeof...(DV)>{Weighted<DV + 1>...};
}
constexpr int64_t kMaxHeadDim = 256;
constexpr auto kWeighted = WeightedTable(std::make_integer_sequence<int64_t, kMaxHeadDim / kLanes>{});

// y = x rotated by RoPE (rotate_half layout: the two halves of x are the pairs), tables cos_t, sin_t
// [D / 2]; the products and sums of model.apply_rope, in its order.
inline void Rope(const float* x, const float* cos_t, const float* sin_t, int64_t d_dim, float* y) {
  const int64_t half = d_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    y[i] = x[i] * cos_t[i] - x[i + half] * sin_t[i];
    y[i + half] = x[i + half] * cos_t[i] + x[i] * sin_t[i];
  }
}

// One (row, KV head): its T x G queries as lanes. q: token t's query g at q + t * q_stride + g * D,
// before RoPE (tables cos_t, sin_t [T, D / 2]); out [T, H, G, D] at this head; mask [T, S]; sink [G]: each
// query head's sink logit (-inf: none).
void Head(const float* q, int64_t q_stride, const float* cos_t, const float* sin_t, const float* k, const float* v,
          const bool* mask, const float* sink, float* out, int64_t t_dim, int64_t h_dim, int64_t g_dim,
          int64_t s_dim, int64_t d_dim, float scale, float softcap) {
  const int64_t queries = t_dim * g_dim, vecs = (queries + kLanes - 1) / kLanes;
  // Rotated and scaled queries, lane t * G + g: qt [D][vecs].
  std::vector<Vec> qt(d_dim * vecs, Vec{});
  float rotated[kMaxHeadDim];
  for (int64_t t = 0; t < t_dim; ++t)
    for (int64_t g = 0; g < g_dim; ++g) {
      Rope(q + t * q_stride + g * d_dim, cos_t + t * d_dim / 2, sin_t + t * d_dim / 2, d_dim, rotated);
      const int64_t lane = t * g_dim + g;
      for (int64_t d = 0; d < d_dim; ++d) qt[d * vecs + lane / kLanes][lane % kLanes] = rotated[d] * scale;
    }
  // The slots some query sees, and each one's lane mask.
  std::vector<int64_t> live;
  std::vector<IVec> sees;
  for (int64_t s = 0; s < s_dim; ++s) {
    bool any = false;
    for (int64_t t = 0; t < t_dim; ++t) any |= mask[t * s_dim + s];
    if (!any) continue;
    live.push_back(s);
    for (int64_t j = 0; j < vecs; ++j) sees.push_back(IVec{});
    IVec* m = &sees[sees.size() - vecs];
    for (int64_t t = 0; t < t_dim; ++t)
      for (int64_t g = 0; g < g_dim; ++g) m[(t * g_dim + g) / kLanes][(t * g_dim + g) % kLanes] = mask[t * s_dim + s] ? -1 : 0;
  }
  // Scores, their max, then probabilities (unnormalised) and their sum: each lane in slot order.
  std::vector<Vec> p(live.size() * vecs);
  std::vector<Vec> top(vecs, Vec{} - INFINITY), sum(vecs, Vec{});
  for (size_t i0 = 0; i0 < live.size(); i0 += kSlots) {  // kSlots slots at once: independent chains
    const int64_t n = std::min<int64_t>(kSlots, live.size() - i0);
    const float* key[kSlots];
    for (int64_t u = 0; u < kSlots; ++u) key[u] = k + live[i0 + std::min(u, n - 1)] * d_dim;
    for (int64_t j = 0; j < vecs; ++j) {
      Vec acc[kSlots] = {};
      for (int64_t d = 0; d < d_dim; ++d) {
        const Vec qd = qt[d * vecs + j];
        for (int64_t u = 0; u < kSlots; ++u) acc[u] += qd * key[u][d];
      }
      for (int64_t u = 0; u < n; ++u) {
        if (softcap > 0)  // Gemma 2's soft cap: cap tanh(score / cap)
          for (int l = 0; l < kLanes; ++l) acc[u][l] = softcap * std::tanh(acc[u][l] / softcap);
        Vec& score = p[(i0 + u) * vecs + j];
        score = sees[(i0 + u) * vecs + j] ? acc[u] : Vec{} - INFINITY;
        top[j] = score > top[j] ? score : top[j];
      }
    }
  }
  // GPT-OSS's sinks join each softmax as a logit with no value: in its max, and last in its sum.
  for (int64_t lane = 0; lane < queries; ++lane)
    top[lane / kLanes][lane % kLanes] = std::max(top[lane / kLanes][lane % kLanes], sink[lane % g_dim]);
  for (size_t i = 0; i < live.size(); ++i)
    for (int64_t j = 0; j < vecs; ++j) {
      const IVec seen = sees[i * vecs + j];
      p[i * vecs + j] = seen ? Exp(seen ? p[i * vecs + j] - top[j] : Vec{}) : Vec{};
      sum[j] += p[i * vecs + j];
    }
  for (int64_t lane = 0; lane < queries; ++lane)
    if (std::isfinite(sink[lane % g_dim]))
      sum[lane / kLanes][lane % kLanes] += std::exp(sink[lane % g_dim] - top[lane / kLanes][lane % kLanes]);
  // Weighted values: out[lane] = sum over the lane's slots of p v, in slot order, over the sum.
  std::vector<Vec> acc(queries * (d_dim / kLanes));
  kWeighted[d_dim / kLanes - 1](p.data(), v, live, queries, vecs, acc.data());
  for (int64_t t = 0; t < t_dim; ++t)
    for (int64_t g = 0; g < g_dim; ++g) {
      const int64_t lane = t * g_dim + g;
      const float total = sum[lane / kLanes][lane % kLanes];
      for (int64_t d = 0; d < d_dim; ++d) out[(t * h_dim * g_dim + g) * d_dim + d] = acc[lane * d_dim / kLanes + d / kLanes][d % kLanes] / total;
    }
}

// One layer's attention step for T new tokens, the layer's index a scalar operand (a scan over the layers
// passes its counter). qkv [B, T, H, G + 2, D]: per KV head its G queries, the
// key and the value, before RoPE (tables cos, sin [B, T, D / 2]). First the cache buffers k and v
// [layers, B, H, S, D] get, in place, the layer's pending entries from pending_k and pending_v [layers,
// B, P, H, D] and then the new tokens' rotated keys and values, at slots [B, P + T] (a slot outside
// [0, S) is dropped); then the queries attend over the layer, slot s visible to query t where mask
// [B, T, S], its scores soft-capped where softcap > 0, with each query head's sink logit from sinks [H, G]
// (-inf: none) in its softmax. Returns out [B, T, H, G, D], the new tokens' keys
// (rotated) and values [B, T, H, D], and the buffers.
ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> cos,
                     ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                     ffi::Buffer<ffi::F32> pending_k, ffi::Buffer<ffi::F32> pending_v, ffi::Buffer<ffi::S32> slots,
                     ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> sinks, ffi::Buffer<ffi::S32> layer_index,
                     ffi::ResultBuffer<ffi::F32> out,
                     ffi::ResultBuffer<ffi::F32> k_new, ffi::ResultBuffer<ffi::F32> v_new,
                     ffi::ResultBuffer<ffi::F32> k_out, ffi::ResultBuffer<ffi::F32> v_out, float softcap) {
  const int64_t layer = layer_index.dimensions().size() == 0 ? layer_index.typed_data()[0] : -1;
  auto qd = qkv.dimensions(), cd = cos.dimensions(), kd = k.dimensions(), pd = pending_k.dimensions(),
       sd = slots.dimensions(), md = mask.dimensions();
  const bool ok =
      qd.size() == 5 && cd.size() == 3 && kd.size() == 5 && pd.size() == 5 && sd.size() == 2 && md.size() == 3 &&
      qd[3] >= 3 && qd[4] % kLanes == 0 && qd[4] <= kMaxHeadDim && qd[1] * (qd[3] - 2) <= kMaxQueries &&
      std::equal(cd.begin(), cd.end(), sin.dimensions().begin(), sin.dimensions().end()) && cd[0] == qd[0] &&
      cd[1] == qd[1] && 2 * cd[2] == qd[4] &&
      std::equal(kd.begin(), kd.end(), v.dimensions().begin(), v.dimensions().end()) && kd[1] == qd[0] &&
      kd[2] == qd[2] && kd[4] == qd[4] && layer >= 0 && layer < kd[0] &&
      std::equal(pd.begin(), pd.end(), pending_v.dimensions().begin(), pending_v.dimensions().end()) &&
      pd[0] == kd[0] && pd[1] == qd[0] && pd[3] == qd[2] && pd[4] == qd[4] && sd[0] == qd[0] &&
      sd[1] == pd[2] + qd[1] &&
      md[0] == qd[0] && md[1] == qd[1] && md[2] == kd[3] && sinks.dimensions().size() == 2 &&
      sinks.dimensions()[0] == qd[2] && sinks.dimensions()[1] == qd[3] - 2;
  if (!ok) {
    return ffi::Error::InvalidArgument(
        "attention: expects qkv [B, T, H, G + 2, D] with T * G <= 256 and D in 16, 32, ..., 256, cos and sin "
        "[B, T, D / 2], k and v [layers, B, H, S, D], pending_k and pending_v [layers, B, P, H, D], slots "
        "[B, P + T], mask [B, T, S], sinks [H, G] and a layer index in [0, layers)");
  }
  const int64_t b_dim = qd[0], t_dim = qd[1], h_dim = qd[2], g_dim = qd[3] - 2, d_dim = qd[4], s_dim = kd[3],
                p_dim = pd[2], half = d_dim / 2;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d_dim));
  const float *qp = qkv.typed_data(), *cp = cos.typed_data(), *sp = sin.typed_data();
  const int64_t pending_layer = layer * b_dim * p_dim * h_dim * d_dim;  // this layer's entries
  const float *pkp = pending_k.typed_data() + pending_layer, *pvp = pending_v.typed_data() + pending_layer;
  const int32_t* slot = slots.typed_data();
  const bool* mp = mask.typed_data();
  float *op = out->typed_data(), *knp = k_new->typed_data(), *vnp = v_new->typed_data();
  float *kp = k_out->typed_data(), *vp = v_out->typed_data();  // k and v themselves (aliased)
  const size_t bytes = d_dim * sizeof(float);
  // One task per (row, KV head): it writes that head's slots of the layer, then reads them.
  redrafter::ParallelFor(pool, b_dim * h_dim, [=](int64_t task, int64_t) {
    const int64_t b = task / h_dim, h = task % h_dim;
    float* kc = kp + ((layer * b_dim + b) * h_dim + h) * s_dim * d_dim;
    float* vc = vp + ((layer * b_dim + b) * h_dim + h) * s_dim * d_dim;
    const int32_t* row_slots = slot + b * (p_dim + t_dim);
    auto put = [&](int32_t s, const float* key, const float* value) {  // slots outside the cache: dropped
      if (s < 0 || s >= s_dim) return;
      std::memcpy(kc + s * d_dim, key, bytes);
      std::memcpy(vc + s * d_dim, value, bytes);
    };
    for (int64_t j = 0; j < p_dim; ++j) {
      const int64_t entry = ((b * p_dim + j) * h_dim + h) * d_dim;
      put(row_slots[j], pkp + entry, pvp + entry);
    }
    const float* q = qp + (b * t_dim * h_dim + h) * (g_dim + 2) * d_dim;  // token 0's first query
    const int64_t q_stride = h_dim * (g_dim + 2) * d_dim;
    for (int64_t t = 0; t < t_dim; ++t) {
      float* key = knp + ((b * t_dim + t) * h_dim + h) * d_dim;
      float* value = vnp + ((b * t_dim + t) * h_dim + h) * d_dim;
      Rope(q + t * q_stride + g_dim * d_dim, cp + (b * t_dim + t) * half, sp + (b * t_dim + t) * half, d_dim, key);
      std::memcpy(value, q + t * q_stride + (g_dim + 1) * d_dim, bytes);
      put(row_slots[p_dim + t], key, value);
    }
    Head(q, q_stride, cp + b * t_dim * half, sp + b * t_dim * half, kc, vc, mp + b * t_dim * s_dim,
         sinks.typed_data() + h * g_dim, op + (b * t_dim * h_dim + h) * g_dim * d_dim, t_dim, h_dim, g_dim, s_dim,
         d_dim, scale, softcap);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(redrafter_attention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // qkv
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cos
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sin
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v
                                  .Arg<ffi::Buffer<ffi::F32>>()   // pending_k
                                  .Arg<ffi::Buffer<ffi::F32>>()   // pending_v
                                  .Arg<ffi::Buffer<ffi::S32>>()   // slots
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sinks
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer (a scalar)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>()   // k_new
                                  .Ret<ffi::Buffer<ffi::F32>>()   // v_new
                                  .Ret<ffi::Buffer<ffi::F32>>()   // k (aliased)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // v (aliased)
                                  .Attr<float>("softcap"));
