// The pointwise pass's vector helpers: padded leading dimensions, partial loads and stores,
// the activations (exp, tanh, sigmoid), layer-norm row statistics and pre-activation, and the
// split of a range over threads.
#pragma once
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>
#include "lstmkit_abi.h"  // LN_EPS

namespace lk {

using at::vec::Vectorized;
using lk::abi::LN_EPS;

// Inlined into the per-unit loops whatever the compiler's size budget (GCC and Clang): the
// activations and the cell step's per-gate lambdas. Kept out of line, a call reloads every
// constant of its polynomial from memory; inlined, the loop keeps them in registers (the
// forward pointwise pass measured 3-8 % faster for the whole layer on AVX2).
#define LK_INLINE __attribute__((always_inline))

static inline int64_t pad_ld(int64_t K, int VL) {
  // round up to whole vectors, then one more vector: breaks 4 KiB aliasing of row starts
  return (K + VL - 1) / VL * VL + VL;
}

// A test hook (_poison_workspaces): the parts a call writes before reading (Carve::take_rows) are
// filled with NaN instead of left as they are, so that a read before the write shows in the results.
inline std::atomic<bool>& poison_workspaces() {
  static std::atomic<bool> on{false};
  return on;
}

// A call's workspaces carved from one allocation: take(p, n) for a zeroed part of n elements,
// take_rows(p, rows, cols, ld) for `rows` rows of ld elements whose first `cols` the call writes
// before it reads them (a GEMM's output: only each row's padding is zeroed — at B = 32, H = 256 one
// step's r and xg_t are 94 % of its workspace, and zeroing it all took 1.6 % of an sLSTM step's
// samples); every part starts on a 64-byte line. allocate() once points each p at its part — valid
// for as long as the returned tensor lives. (A one-step call spends more on allocations, each a
// dispatcher round trip, than on its arithmetic.)
template <typename T>
struct Carve {
  struct Part {
    T** where;
    int64_t offset, rows, cols, ld;  // zeroed: rows == 1, cols == 0, ld == n
  };
  std::vector<Part> parts;
  int64_t total = 0;
  void take(T*& p, int64_t n) { take_rows(p, 1, 0, n); }
  void take_rows(T*& p, int64_t rows, int64_t cols, int64_t ld) {
    constexpr int64_t line = 64 / sizeof(T);
    const int64_t n = std::max<int64_t>(rows * ld, 0);
    parts.push_back(Part{&p, total, rows, cols, ld});
    total += (n + line - 1) / line * line;
  }
  at::Tensor allocate(const at::TensorOptions& opt) {
    at::Tensor mem = at::empty({std::max<int64_t>(total, 1)}, opt);  // CPU allocations: 64-byte aligned
    T* base = mem.data_ptr<T>();
    const bool poison = poison_workspaces().load(std::memory_order_relaxed);
    for (const Part& part : parts) {
      T* p = base + part.offset;
      *part.where = p;
      for (int64_t row = 0; row < part.rows; ++row, p += part.ld) {
        if (poison) std::fill(p, p + part.cols, std::numeric_limits<T>::quiet_NaN());
        std::memset(p + part.cols, 0, (size_t)(part.ld - part.cols) * sizeof(T));
      }
    }
    return mem;
  }
};

template <typename T>
static inline T hsum(const Vectorized<T>& v) {
  alignas(64) T tmp[Vectorized<T>::size()];
  v.store(tmp);
  T s = 0;
  for (int i = 0; i < Vectorized<T>::size(); ++i) s += tmp[i];
  return s;
}

template <typename T>
static inline Vectorized<T> ldv(const T* p, int n) {
  return n == Vectorized<T>::size() ? Vectorized<T>::loadu(p) : Vectorized<T>::loadu(p, n);
}
template <typename T>
static inline void stv(const Vectorized<T>& v, T* p, int n) {
  if (n == Vectorized<T>::size()) v.store(p); else v.store(p, n);
}
// Activations. float on AVX-512 and AVX2: an inline Cephes-style exp (max rel. err. ~2e-7; the
// sigmoid is 1 / (1 + e^-x)), measured ~2x faster for the whole pointwise pass than the
// out-of-line Sleef u10 calls on AVX-512 and, on AVX2 (a 2 GHz Zen), whole steps 1.09-1.14x
// faster at B = 1-32, H = 32-64 (1.04x at H = 256); and tanh as one rational function
// x P(x^2) / Q(x^2), clamped at |x| = 9 (max rel. err. 2.8e-7, worst near +-1): no exp, 16
// vector operations, written once for both instruction sets. double: Sleef (1 ulp).
template <typename T>
static inline Vectorized<T> vexp(const Vectorized<T>& x) { return x.exp(); }
template <typename T>
static inline Vectorized<T> vtanh(const Vectorized<T>& x) { return x.tanh(); }
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// The inline float activations' constants, shared by both instruction sets. exp: x clamped to
// [EXP_LO, EXP_HI]; n = round(x / ln2), r = x - n ln2 (ln2 = LN2_HI + LN2_LO); e^r = 1 + r +
// r^2 P(r), P's coefficients highest first. tanh(x) = x P(x^2) / Q(x^2) on |x| <= TANH_CLAMP
// (tanh rounds to +-1 beyond), highest first: a minimax fit of the relative error that
// tools/fit_tanh.py reproduces.
constexpr float EXP_LO = -104.f, EXP_HI = 89.f, LOG2E = 1.44269504088896341f;
constexpr float LN2_HI = 0.693359375f, LN2_LO = -2.12194440e-4f;
constexpr float EXP_P[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f,
                           1.6666665459e-1f, 5.0000001201e-1f};
constexpr float TANH_CLAMP = 9.f;
constexpr float TANH_P[] = {-8.489191405e-14f, 5.278138223e-11f, -2.022562591e-08f, 1.115440834e-05f,
                            3.103965884e-03f, 1.308401879e-01f, 9.999999934e-01f};
constexpr float TANH_Q[] = {2.546159237e-04f, 2.449521701e-02f, 4.641734590e-01f, 1.000000000e+00f};

template <>
LK_INLINE inline Vectorized<float> vtanh<float>(const Vectorized<float>& xv) {
  using V = Vectorized<float>;
  const V x = at::vec::clamp(xv, V(-TANH_CLAMP), V(TANH_CLAMP));  // NaN passes through (x is min's 2nd operand)
  const V x2 = x * x;
  V p(TANH_P[0]), q(TANH_Q[0]);
  for (int i = 1; i < 7; ++i) p = at::vec::fmadd(p, x2, V(TANH_P[i]));
  for (int i = 1; i < 4; ++i) q = at::vec::fmadd(q, x2, V(TANH_Q[i]));
  // near +-1 the rounding of the ratio reached 1 + 2 ulp: kept within [-1, 1] as tanh is (NaN
  // passes, the ratio being clamp's second operand)
  return at::vec::clamp(p * x / q, V(-1.f), V(1.f));
}

// p 2^n for exp below (n integral, within [-150, 129] after its clamp): scalef on AVX-512; on
// AVX2 two normal powers of two 2^n1 2^n2 (n = n1 + n2), so that overflow gives inf and underflow
// rounds gradually through subnormals.
LK_INLINE static inline Vectorized<float> times_pow2(const Vectorized<float>& p, const Vectorized<float>& n) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(p, n);
#else
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
#endif
}

template <>
LK_INLINE inline Vectorized<float> vexp<float>(const Vectorized<float>& xv) {
  using V = Vectorized<float>;
  // clamp's max and min take x as their second operand, which they return when it is NaN: NaN
  // propagates (as torch's own activations do) instead of being clamped into a finite value
  const V x = at::vec::clamp(xv, V(EXP_LO), V(EXP_HI));
  const V n = (x * V(LOG2E)).round();  // to the nearest integer
  V r = at::vec::fmadd(n, V(-LN2_HI), x);  // x - n ln2, in two parts
  r = at::vec::fmadd(n, V(-LN2_LO), r);
  V p(EXP_P[0]);
  for (int i = 1; i < 6; ++i) p = at::vec::fmadd(p, r, V(EXP_P[i]));
  p = at::vec::fmadd(p, r * r, r + V(1.f));
  return times_pow2(p, n);
}
#endif
// log(1 + y) for y in [0, 1] (the sLSTM's log sigmoid takes it of e^-|x|). float on AVX-512 and
// AVX2: 2 atanh(z), z = y / (2 + y) in [0, 1/3], as z's odd series to z^15 (truncation below
// 2e-9 relative; the log sigmoid built on it measured max rel. err. 2.4e-7 over x in [-30, 30]
// against float64, torch's float32 one 1.1e-7) — a division and eight FMAs
// inline, where Sleef's out-of-line log1p took ~3 % of a one-step sLSTM call (B = 32, H = 256)
// on AVX-512. NaN passes through. double: Sleef.
template <typename T>
static inline Vectorized<T> log1p_unit(const Vectorized<T>& y) { return y.log1p(); }
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
template <>
LK_INLINE inline Vectorized<float> log1p_unit<float>(const Vectorized<float>& y) {
  using V = Vectorized<float>;
  const V z = y / (V(2.f) + y), z2 = z * z;
  V p(1.f / 15.f);
  for (const float c : {1.f / 13.f, 1.f / 11.f, 1.f / 9.f, 1.f / 7.f, 1.f / 5.f, 1.f / 3.f, 1.f})
    p = at::vec::fmadd(p, z2, V(c));
  return V(2.f) * z * p;
}
#endif

template <typename T>
LK_INLINE static inline Vectorized<T> sigm(const Vectorized<T>& x) {
  const Vectorized<T> one(T(1));
  return one / (one + vexp<T>(Vectorized<T>(T(0)) - x));
}

// 1/sqrt(var + eps) of a layer norm; NaN where the variance overflowed to inf (values beyond about
// 1.8e19 in float32), as torch's layer_norm gives: 1/sqrt(inf) = 0 would norm every value to 0.
template <typename T>
static inline T ln_rstd(T var) {
  return std::isinf(var) ? std::numeric_limits<T>::quiet_NaN() : T(1) / std::sqrt(var + T(LN_EPS));
}

// mean and 1/sqrt(var+eps) of n values (two-pass, biased variance; two accumulators per
// pass to halve the add-latency chain). NaN anywhere gives NaN stats (no max/min here).
template <typename T>
static inline void row_stats(const T* x, int64_t n, T& mean, T& rstd) {
  using V = Vectorized<T>;
  constexpr int VL = V::size();
  V s0(T(0)), s1(T(0));
  int64_t j = 0;
  for (; j + 2 * VL <= n; j += 2 * VL) { s0 = s0 + V::loadu(x + j); s1 = s1 + V::loadu(x + j + VL); }
  for (; j < n; j += VL) s0 = s0 + ldv(x + j, (int)std::min<int64_t>(VL, n - j));
  mean = hsum(s0 + s1) / T(n);
  const V m(mean);
  V q0(T(0)), q1(T(0));
  for (j = 0; j + 2 * VL <= n; j += 2 * VL) {
    const V d0 = V::loadu(x + j) - m, d1 = V::loadu(x + j + VL) - m;
    q0 = at::vec::fmadd(d0, d0, q0); q1 = at::vec::fmadd(d1, d1, q1);
  }
  for (; j < n; j += VL) {
    const int c = (int)std::min<int64_t>(VL, n - j);
    V d = ldv(x + j, c) - m;
    if (c < VL) d = V::set(V(T(0)), d, c);
    q0 = at::vec::fmadd(d, d, q0);
  }
  rstd = ln_rstd(hsum(q0 + q1) / T(n));
}

// The same for two n-vectors at once (the input and recurrent chunks of one gate).
template <typename T>
static inline void row_stats2(const T* x, const T* y, int64_t n, T& mx, T& rx, T& my, T& ry) {
  using V = Vectorized<T>;
  constexpr int VL = V::size();
  V sx0(T(0)), sx1(T(0)), sy0(T(0)), sy1(T(0));
  int64_t j = 0;
  for (; j + 2 * VL <= n; j += 2 * VL) {
    sx0 = sx0 + V::loadu(x + j); sx1 = sx1 + V::loadu(x + j + VL);
    sy0 = sy0 + V::loadu(y + j); sy1 = sy1 + V::loadu(y + j + VL);
  }
  for (; j < n; j += VL) {
    const int c = (int)std::min<int64_t>(VL, n - j);
    sx0 = sx0 + ldv(x + j, c); sy0 = sy0 + ldv(y + j, c);
  }
  mx = hsum(sx0 + sx1) / T(n);
  my = hsum(sy0 + sy1) / T(n);
  const V vmx(mx), vmy(my);
  V qx0(T(0)), qx1(T(0)), qy0(T(0)), qy1(T(0));
  for (j = 0; j + 2 * VL <= n; j += 2 * VL) {
    const V dx0 = V::loadu(x + j) - vmx, dx1 = V::loadu(x + j + VL) - vmx;
    const V dy0 = V::loadu(y + j) - vmy, dy1 = V::loadu(y + j + VL) - vmy;
    qx0 = at::vec::fmadd(dx0, dx0, qx0); qx1 = at::vec::fmadd(dx1, dx1, qx1);
    qy0 = at::vec::fmadd(dy0, dy0, qy0); qy1 = at::vec::fmadd(dy1, dy1, qy1);
  }
  for (; j < n; j += VL) {
    const int c = (int)std::min<int64_t>(VL, n - j);
    V dx = ldv(x + j, c) - vmx, dy = ldv(y + j, c) - vmy;
    if (c < VL) { dx = V::set(V(T(0)), dx, c); dy = V::set(V(T(0)), dy, c); }
    qx0 = at::vec::fmadd(dx, dx, qx0); qy0 = at::vec::fmadd(dy, dy, qy0);
  }
  rx = ln_rstd(hsum(qx0 + qx1) / T(n));
  ry = ln_rstd(hsum(qy0 + qy1) / T(n));
}

// layernorm: the gate pre-activation z = a_hat * g_ih + r_hat * g_hh (+ bias) at column off.
// Forward and backward both call this on the same stored a_hat, r_hat, so the backward's
// recomputed gate activations are bit-identical to the forward's.
template <typename T>
static inline Vectorized<T> ln_z(const Vectorized<T>& ah, const Vectorized<T>& rh, const T* gih, const T* ghh,
                                 const T* bias, int64_t off, int n) {
  Vectorized<T> z = ah * ldv(gih + off, n) + rh * ldv(ghh + off, n);
  if (bias) z = z + ldv(bias + off, n);
  return z;
}

static inline void split_range(int64_t n, int tid, int nth, int64_t& lo, int64_t& hi) {
  lo = n * tid / nth; hi = n * (tid + 1) / nth;
}

}  // namespace lk
