// CPU kernels for the engine's hot path, built on first use (disagg/kernels/cpu.py).
//
// Every op has a pure-PyTorch reference in disagg/kernels/ops.py that it is
// tested against; these exist because on a CPU the reference spends its time
// in places a fused loop does not:
//
//   linear             small-M GEMM (decode batches): both cores stream the
//                      weight once per 4 rows of x (MKL's GEMV uses one core)
//   paged_attention    decode attention read in place from the paged cache,
//                      no per-step gather of K/V into a padded batch
//   write_kv           new K/V rows into their cache slots
//   rms_norm / add_rms_norm / silu_and_mul / rotary
//                      one pass instead of 3-8 elementwise ops each
//
// Numerics: float32 and bfloat16 (accumulation always in float32). Elementwise
// ops round exactly where the reference rounds (bf16 after every op, like
// PyTorch eager) and are built with -ffp-contract=off so no multiply-add is
// fused behind our back. A linear output row depends only on its own input
// row, never on how many rows share the call, so batching keeps outputs the
// same.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DISAGG_AVX2 1
#endif

namespace {

using bf16 = c10::BFloat16;

inline float to_f(float v) { return v; }
inline float to_f(bf16 v) { return static_cast<float>(v); }
template <typename T> inline T from_f(float v) { return static_cast<T>(v); }
// The value a float takes once stored in T (identity for float).
template <typename T> inline float round_as(float v) { return to_f(from_f<T>(v)); }

void check_dtype(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              what, " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), what, " must be on the CPU");
}

#ifdef DISAGG_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline float hsum(__m256 v) {  // fixed order: (lo + hi) then pairwise
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}
#endif

// ---- linear: y (M, N) = x (M, K) @ w (N, K)^T + b ---------------------------
//
// x is first widened to float32 (M x K, small). Each task owns a range of
// weight rows; per pair of weight rows it walks x four rows at a time, so each
// weight element is read from memory once per call and reused from L1.

template <int MR, typename W>
inline void dot_rows(const float* x, int64_t K, const W* w0, const W* w1, float* out0, float* out1,
                     int64_t ldo) {
  // out0[m * ldo] = x[m] . w0, out1[m * ldo] = x[m] . w1 for m < MR (w1 may be null)
  int64_t k8 = 0;
  float s0[MR], s1[MR];
#ifdef DISAGG_AVX2
  k8 = K - K % 8;
  __m256 a0[MR], a1[MR];
  for (int i = 0; i < MR; ++i) { a0[i] = _mm256_setzero_ps(); a1[i] = _mm256_setzero_ps(); }
  if (w1) {
    for (int64_t k = 0; k < k8; k += 8) {
      __m256 v0 = load8(w0 + k), v1 = load8(w1 + k);
      for (int i = 0; i < MR; ++i) {
        __m256 xv = _mm256_loadu_ps(x + i * K + k);
        a0[i] = _mm256_fmadd_ps(xv, v0, a0[i]);
        a1[i] = _mm256_fmadd_ps(xv, v1, a1[i]);
      }
    }
  } else {
    for (int64_t k = 0; k < k8; k += 8) {
      __m256 v0 = load8(w0 + k);
      for (int i = 0; i < MR; ++i) a0[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * K + k), v0, a0[i]);
    }
  }
  for (int i = 0; i < MR; ++i) { s0[i] = hsum(a0[i]); s1[i] = hsum(a1[i]); }
#else
  for (int i = 0; i < MR; ++i) { s0[i] = 0.f; s1[i] = 0.f; }
#endif
  for (int i = 0; i < MR; ++i) {
    for (int64_t k = k8; k < K; ++k) {
      s0[i] += x[i * K + k] * to_f(w0[k]);
      if (w1) s1[i] += x[i * K + k] * to_f(w1[k]);
    }
    out0[i * ldo] = s0[i];
    if (w1) out1[i * ldo] = s1[i];
  }
}

template <typename W>
void linear_impl(const float* x, const W* w, const W* bias, float* y, int64_t M, int64_t N,
                 int64_t K) {
  int64_t pairs = (N + 1) / 2;
  int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  at::parallel_for(0, pairs, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      int64_t n = 2 * p;
      const W* w0 = w + n * K;
      const W* w1 = n + 1 < N ? w0 + K : nullptr;
      float* y0 = y + n;
      float* y1 = y + n + 1;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) dot_rows<4>(x + m * K, K, w0, w1, y0 + m * N, y1 + m * N, N);
      switch (M - m) {  // the same per-row arithmetic as above, so batching never changes a row
        case 3: dot_rows<3>(x + m * K, K, w0, w1, y0 + m * N, y1 + m * N, N); break;
        case 2: dot_rows<2>(x + m * K, K, w0, w1, y0 + m * N, y1 + m * N, N); break;
        case 1: dot_rows<1>(x + m * K, K, w0, w1, y0 + m * N, y1 + m * N, N); break;
        default: break;
      }
      if (bias) {
        for (int64_t m = 0; m < M; ++m) {
          y[m * N + n] += to_f(bias[n]);
          if (w1) y[m * N + n + 1] += to_f(bias[n + 1]);
        }
      }
    }
  });
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  check_dtype(x, "x");
  check_dtype(w, "weight");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "weight must be a contiguous (N, K) matrix");
  TORCH_CHECK(x.size(-1) == w.size(1), "x has ", x.size(-1), " features, weight expects ", w.size(1));
  int64_t K = w.size(1), N = w.size(0);
  at::Tensor xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
  int64_t M = xf.size(0);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (b.has_value()) {
    TORCH_CHECK(b->scalar_type() == w.scalar_type() && b->numel() == N && b->is_contiguous(),
                "bias must be a contiguous (N,) tensor of the weight's dtype");
  }
  if (w.scalar_type() == at::kFloat) {
    linear_impl<float>(xf.data_ptr<float>(), w.data_ptr<float>(),
                       b.has_value() ? b->data_ptr<float>() : nullptr, y.data_ptr<float>(), M, N, K);
  } else {
    linear_impl<bf16>(xf.data_ptr<float>(), w.data_ptr<bf16>(),
                      b.has_value() ? b->data_ptr<bf16>() : nullptr, y.data_ptr<float>(), M, N, K);
  }
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.to(x.scalar_type()).view(shape);
}

// ---- elementwise -------------------------------------------------------------

template <typename T>
void rms_norm_row(const T* in, const T* weight, T* out, int64_t H, float eps) {
  // HF: h = x.float(); h *= rsqrt(mean(h^2) + eps); weight * h.to(dtype)
  float ss = 0.f;
  for (int64_t i = 0; i < H; ++i) { float v = to_f(in[i]); ss += v * v; }
  float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
  for (int64_t i = 0; i < H; ++i) {
    float h = round_as<T>(to_f(in[i]) * inv);
    out[i] = from_f<T>(to_f(weight[i]) * h);
  }
}

template <typename T>
void rms_norm_impl(const at::Tensor& x, const at::Tensor& w, at::Tensor& out, double eps,
                   at::Tensor* residual) {
  int64_t H = x.size(-1), rows = x.numel() / H;
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* op = out.data_ptr<T>();
  T* rp = residual ? residual->data_ptr<T>() : nullptr;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* src = xp + r * H;
      if (rp) {  // residual += x, then normalise the sum
        T* res = rp + r * H;
        for (int64_t i = 0; i < H; ++i) res[i] = from_f<T>(to_f(res[i]) + to_f(src[i]));
        src = res;
      }
      rms_norm_row<T>(src, wp, op + r * H, H, static_cast<float>(eps));
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_dtype(x, "x");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && w.scalar_type() == x.scalar_type() &&
              w.numel() == x.size(-1), "rms_norm: contiguous x (..., H) and weight (H,) of one dtype");
  at::Tensor out = at::empty_like(x);
  if (x.scalar_type() == at::kFloat) rms_norm_impl<float>(x, w, out, eps, nullptr);
  else rms_norm_impl<bf16>(x, w, out, eps, nullptr);
  return out;
}

// residual += x (in place); returns rms_norm(residual).
at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor& residual, const at::Tensor& w, double eps) {
  check_dtype(x, "x");
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && w.is_contiguous() &&
              residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type() &&
              w.scalar_type() == x.scalar_type() && w.numel() == x.size(-1),
              "add_rms_norm: contiguous x, residual (..., H) and weight (H,) of one dtype");
  at::Tensor out = at::empty_like(x);
  if (x.scalar_type() == at::kFloat) rms_norm_impl<float>(x, w, out, eps, &residual);
  else rms_norm_impl<bf16>(x, w, out, eps, &residual);
  return out;
}

template <typename T>
void silu_and_mul_impl(const T* x, T* out, int64_t rows, int64_t I) {
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* gate = x + r * 2 * I;
      const T* up = gate + I;
      T* o = out + r * I;
      for (int64_t i = 0; i < I; ++i) {
        float g = to_f(gate[i]);
        float s = round_as<T>(g / (1.f + std::exp(-g)));
        o[i] = from_f<T>(s * to_f(up[i]));
      }
    }
  });
}

// (..., 2I) -> (..., I): silu(first half) * second half
at::Tensor silu_and_mul(const at::Tensor& x) {
  check_dtype(x, "x");
  TORCH_CHECK(x.is_contiguous() && x.size(-1) % 2 == 0, "silu_and_mul: contiguous x (..., 2I)");
  int64_t I = x.size(-1) / 2, rows = x.numel() / (2 * I);
  auto shape = x.sizes().vec();
  shape.back() = I;
  at::Tensor out = at::empty(shape, x.options());
  if (x.scalar_type() == at::kFloat) silu_and_mul_impl<float>(x.data_ptr<float>(), out.data_ptr<float>(), rows, I);
  else silu_and_mul_impl<bf16>(x.data_ptr<bf16>(), out.data_ptr<bf16>(), rows, I);
  return out;
}

template <typename T>
void rotate_rows(T* base, int64_t T_, int64_t heads, int64_t stride_t, int64_t stride_h, int64_t D,
                 const int64_t* pos, const float* cos, const float* sin) {
  int64_t half = D / 2;
  at::parallel_for(0, T_, 16, [&](int64_t t0, int64_t t1) {
    std::vector<float> tmp(D);
    for (int64_t t = t0; t < t1; ++t) {
      const float* c = cos + pos[t] * D;
      const float* s = sin + pos[t] * D;
      for (int64_t h = 0; h < heads; ++h) {
        T* v = base + t * stride_t + h * stride_h;
        for (int64_t i = 0; i < D; ++i) tmp[i] = to_f(v[i]);
        // HF: x * cos + rotate_half(x) * sin, each product rounded to T, then the sum
        for (int64_t i = 0; i < D; ++i) {
          float rot = i < half ? -tmp[i + half] : tmp[i - half];
          float a = round_as<T>(tmp[i] * round_as<T>(c[i]));
          float b = round_as<T>(rot * round_as<T>(s[i]));
          v[i] = from_f<T>(a + b);
        }
      }
    }
  });
}

// In place: q (T, H, D), k (T, Hkv, D) rotated at positions (T,) with fp32 (P, D) tables.
void rotary(const at::Tensor& positions, at::Tensor& q, at::Tensor& k, const at::Tensor& cos,
            const at::Tensor& sin) {
  check_dtype(q, "q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "rotary: q and k must share a dtype");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1,
              "rotary: q, k must be (T, heads, D) with contiguous head rows");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
              cos.is_contiguous() && sin.is_contiguous() && cos.size(1) == q.size(2),
              "rotary: cos/sin must be contiguous float32 (P, D)");
  at::Tensor pos = positions.to(at::kLong).contiguous();
  int64_t n = q.size(0), D = q.size(2);
  TORCH_CHECK(pos.numel() == n && k.size(0) == n, "rotary: one position per token");
  if (n == 0) return;
  int64_t maxp = pos.max().item<int64_t>(), minp = pos.min().item<int64_t>();
  TORCH_CHECK(minp >= 0 && maxp < cos.size(0), "rotary: position outside the precomputed table");
  const int64_t* pp = pos.data_ptr<int64_t>();
  if (q.scalar_type() == at::kFloat) {
    rotate_rows<float>(q.data_ptr<float>(), n, q.size(1), q.stride(0), q.stride(1), D, pp,
                       cos.data_ptr<float>(), sin.data_ptr<float>());
    rotate_rows<float>(k.data_ptr<float>(), n, k.size(1), k.stride(0), k.stride(1), D, pp,
                       cos.data_ptr<float>(), sin.data_ptr<float>());
  } else {
    rotate_rows<bf16>(q.data_ptr<bf16>(), n, q.size(1), q.stride(0), q.stride(1), D, pp,
                      cos.data_ptr<float>(), sin.data_ptr<float>());
    rotate_rows<bf16>(k.data_ptr<bf16>(), n, k.size(1), k.stride(0), k.stride(1), D, pp,
                      cos.data_ptr<float>(), sin.data_ptr<float>());
  }
}

// ---- KV cache ---------------------------------------------------------------
// kv_cache (num_blocks, 2, Hkv, bs, D); k, v (T, Hkv, D); slot = block * bs + offset.

template <typename T>
void write_kv_impl(at::Tensor& cache, const at::Tensor& k, const at::Tensor& v, const int64_t* slots,
                   int64_t n) {
  int64_t H = cache.size(2), bs = cache.size(3), D = cache.size(4);
  T* c = cache.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  for (int64_t t = 0; t < n; ++t) {
    int64_t blk = slots[t] / bs, off = slots[t] % bs;
    for (int64_t h = 0; h < H; ++h) {
      std::memcpy(c + (((blk * 2 + 0) * H + h) * bs + off) * D, kp + t * k.stride(0) + h * k.stride(1),
                  D * sizeof(T));
      std::memcpy(c + (((blk * 2 + 1) * H + h) * bs + off) * D, vp + t * v.stride(0) + h * v.stride(1),
                  D * sizeof(T));
    }
  }
}

void write_kv(at::Tensor& cache, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slot_mapping) {
  check_dtype(cache, "kv_cache");
  TORCH_CHECK(cache.is_contiguous() && cache.dim() == 5 && cache.size(1) == 2,
              "kv_cache must be a contiguous (blocks, 2, Hkv, bs, D) tensor");
  TORCH_CHECK(k.scalar_type() == cache.scalar_type() && v.scalar_type() == cache.scalar_type(),
              "write_kv: k, v must have the cache's dtype");
  TORCH_CHECK(k.dim() == 3 && k.stride(2) == 1 && v.stride(2) == 1 && k.size(1) == cache.size(2) &&
              k.size(2) == cache.size(4) && v.sizes() == k.sizes(), "write_kv: k, v must be (T, Hkv, D)");
  at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  int64_t n = slots.numel();
  TORCH_CHECK(n == k.size(0), "write_kv: one slot per token");
  if (n == 0) return;
  int64_t capacity = cache.size(0) * cache.size(3);
  TORCH_CHECK(slots.min().item<int64_t>() >= 0 && slots.max().item<int64_t>() < capacity,
              "write_kv: slot outside the cache");
  if (cache.scalar_type() == at::kFloat) write_kv_impl<float>(cache, k, v, slots.data_ptr<int64_t>(), n);
  else write_kv_impl<bf16>(cache, k, v, slots.data_ptr<int64_t>(), n);
}

// ---- decode attention over the paged cache -------------------------------------
// One task per (sequence, KV head): the G = H / Hkv query heads sharing that KV
// head are scored together, so each cached K and V row is read once.

#ifdef DISAGG_AVX2
// exp on 8 lanes: Cody-Waite range reduction and a degree-6 polynomial
// (relative error ~1e-7 over the softmax's range x <= 0).
inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-88.3762626647949f);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  __m256 x2 = _mm256_mul_ps(x, x);
  y = _mm256_fmadd_ps(y, x2, _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

template <typename T>
inline float dot_d(const float* q, const T* k, int64_t D) {
  int64_t d8 = 0;
  float s = 0.f;
#ifdef DISAGG_AVX2
  d8 = D - D % 8;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t d = 0; d < d8; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), acc);
  s = hsum(acc);
#endif
  for (int64_t d = d8; d < D; ++d) s += q[d] * to_f(k[d]);
  return s;
}

template <typename T>
inline void axpy_d(float a, const T* v, float* acc, int64_t D) {
  int64_t d8 = 0;
#ifdef DISAGG_AVX2
  d8 = D - D % 8;
  __m256 av = _mm256_set1_ps(a);
  for (int64_t d = 0; d < d8; d += 8)
    _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(av, load8(v + d), _mm256_loadu_ps(acc + d)));
#endif
  for (int64_t d = d8; d < D; ++d) acc[d] += a * to_f(v[d]);
}

inline void softmax_inplace(float* s, int64_t L, float& sum_out) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < L; ++i) mx = std::max(mx, s[i]);
  int64_t i = 0;
  float sum = 0.f;
#ifdef DISAGG_AVX2
  __m256 mv = _mm256_set1_ps(mx), acc = _mm256_setzero_ps();
  for (; i + 8 <= L; i += 8) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), mv));
    _mm256_storeu_ps(s + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; i < L; ++i) { s[i] = std::exp(s[i] - mx); sum += s[i]; }
  sum_out = sum;
}

template <typename T>
void paged_attention_impl(at::Tensor& out, const at::Tensor& q, const at::Tensor& cache,
                          const int32_t* tables, int64_t table_width, const int32_t* lens, float scale) {
  int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  int64_t Hkv = cache.size(2), bs = cache.size(3), G = H / Hkv;
  const T* qp = q.data_ptr<T>();
  const T* cp = cache.data_ptr<T>();
  T* op = out.data_ptr<T>();
  int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t j0, int64_t j1) {
    std::vector<float> qf, scores, acc;
    for (int64_t j = j0; j < j1; ++j) {
      int64_t b = j / Hkv, h = j % Hkv, L = lens[b];
      qf.assign(G * D, 0.f);
      scores.resize(G * L);
      acc.assign(G * D, 0.f);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = to_f(qp[b * qs0 + (h * G + g) * qs1 + d]);
      const int32_t* table = tables + b * table_width;
      for (int64_t t0 = 0; t0 < L; t0 += bs) {
        const T* kblk = cp + ((static_cast<int64_t>(table[t0 / bs]) * 2 + 0) * Hkv + h) * bs * D;
        int64_t n = std::min(bs, L - t0);
        for (int64_t t = 0; t < n; ++t)
          for (int64_t g = 0; g < G; ++g)
            scores[g * L + t0 + t] = dot_d(qf.data() + g * D, kblk + t * D, D) * scale;
      }
      std::vector<float> sums(G);
      for (int64_t g = 0; g < G; ++g) softmax_inplace(scores.data() + g * L, L, sums[g]);
      for (int64_t t0 = 0; t0 < L; t0 += bs) {
        const T* vblk = cp + ((static_cast<int64_t>(table[t0 / bs]) * 2 + 1) * Hkv + h) * bs * D;
        int64_t n = std::min(bs, L - t0);
        for (int64_t t = 0; t < n; ++t)
          for (int64_t g = 0; g < G; ++g)
            axpy_d(scores[g * L + t0 + t], vblk + t * D, acc.data() + g * D, D);
      }
      for (int64_t g = 0; g < G; ++g) {
        float inv = 1.f / sums[g];
        T* o = op + (b * H + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = from_f<T>(acc[g * D + d] * inv);
      }
    }
  });
}

// q (B, H, D) one query per sequence; returns (B, H, D).
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& block_tables,
                           const at::Tensor& seq_lens, double scale) {
  check_dtype(q, "q");
  TORCH_CHECK(cache.scalar_type() == q.scalar_type() && cache.is_contiguous() && cache.dim() == 5,
              "paged_attention: contiguous (blocks, 2, Hkv, bs, D) cache of q's dtype");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.size(2) == cache.size(4) &&
              q.size(1) % cache.size(2) == 0, "paged_attention: q must be (B, H, D), H a multiple of Hkv");
  at::Tensor tables = block_tables.to(at::kInt).contiguous();
  at::Tensor lens = seq_lens.to(at::kInt).contiguous();
  int64_t B = q.size(0);
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == B && lens.numel() == B,
              "paged_attention: one block table row and one length per sequence");
  at::Tensor out = at::empty({B, q.size(1), q.size(2)}, q.options());
  if (B == 0) return out;
  const int32_t* lp = lens.data_ptr<int32_t>();
  const int32_t* tp = tables.data_ptr<int32_t>();
  int64_t bs = cache.size(3);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] > 0 && (lp[b] + bs - 1) / bs <= tables.size(1), "paged_attention: bad length");
    for (int64_t i = 0; i < (lp[b] + bs - 1) / bs; ++i)
      TORCH_CHECK(tp[b * tables.size(1) + i] >= 0 && tp[b * tables.size(1) + i] < cache.size(0),
                  "paged_attention: block id outside the cache");
  }
  if (q.scalar_type() == at::kFloat)
    paged_attention_impl<float>(out, q, cache, tp, tables.size(1), lp, static_cast<float>(scale));
  else
    paged_attention_impl<bf16>(out, q, cache, tp, tables.size(1), lp, static_cast<float>(scale));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "disagg CPU kernels (see cpu_ops.cpp)";
  m.def("linear", &linear, "y = x @ w.T + b, float32/bfloat16, fp32 accumulation");
  m.def("rms_norm", &rms_norm);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("silu_and_mul", &silu_and_mul);
  m.def("rotary", &rotary);
  m.def("write_kv", &write_kv);
  m.def("paged_attention", &paged_attention);
}
