// Small packed GEMM for the per-step recurrent products of lstmkit's CPU kernel.
//
// C[M x N] (=|+=) A[M x K] * B^T, where B (N x K) is packed once per call into panels of
// NR = NV * VL columns, laid out [panel][k][NR] (zero-padded), and A is row-major with a
// leading dimension chosen by the caller (pad it: lda*sizeof(T) a multiple of 4 KiB
// thrashes L1 with the MR broadcast streams; measured 2-5x slower at H = 512, 1024).
// Measured on the 2-core Zen 4 here (B=32, H=512, 4H x H): 293 us/step on 2 threads
// (229 GFLOP/s) vs 313 us for oneDNN's prepacked _linear_pointwise and 471 us for
// torch.mm; at B=32, H=64: 5.2 us vs 20 us (oneDNN) and 11 us (mm). No per-call overhead.
//
// A weight used by one step only (a call with T = 1: LSTMCell, layer.step, streaming) is not
// packed ahead: packing the whole weight reads and writes it once more than the GEMM itself does,
// which at T = 1 costs more than the product (B = 1, H = 256: W_hh is 1 MiB). Such a Packed is
// "direct": for A of one to three rows each thread's share of the columns is one BLAS call (the
// sgemv_/sgemm_ that torch's CPU build carries; declared weak, so a torch without them keeps
// packing); from four rows on (PACK_AT_USE_MIN_ROWS) each thread packs one panel at a time into a
// buffer that stays in cache and runs the micro-kernel on it. Measured on the 2 GHz Zen (AVX2),
// one thread, a one-step inference call against nn.LSTMCell (which calls MKL's gemm): B = 4 / 8 /
// 32 at H = 256 and B = 32 at H = 1,024, 1.01 / 0.97 / 0.97 / 0.98 with BLAS, 0.75 / 0.78 / 0.88 /
// 0.74 packed at use; B = 2 the other way (0.95 with BLAS, 1.15 packed at use). Held to AVX2 on an
// Intel Xeon likewise (0.80-0.97 packed at use, 0.90-1.00 with BLAS, the same five shapes and B = 64).
// AVX-512 builds call BLAS at every row count: on that Xeon a 16 x 16 transpose of packing takes the
// shuffle port that the second 512-bit FMA shares, and packing at use ran those shapes 1.10-1.86x
// nn.LSTMCell's time (the transposes 4x the micro-kernel's samples at B = 4), BLAS 0.85-1.01x.
//
// bfloat16 layers on a CPU with AMX (Packed::init's `bf16`): the weight is converted to bfloat16 once
// per call and packed into oneDNN's VNNI panels (at::native::cpublas::pack, 64 columns a panel,
// K padded to even), the left operand is converted per GEMM into a per-thread bfloat16 copy, and
// each panel is one cpublas::brgemm call (AMX tiles, float32 accumulation, float32 C): the
// recurrence keeps h, c and the gates in float32 and only the products' operands are rounded,
// as bfloat16 nn.LSTM's oneDNN path rounds them. Where torch's oneDNN has no such kernel
// (cpublas::could_pack false: no AMX) the float32 path below runs. That includes CPUs with
// AVX512_BF16's dot products but no AMX, where it is also the faster one as measured: on an Intel Xeon
// (family 6, model 207, AMX not exposed) vdpbf16ps issued at half vfmadd231ps's rate (100 against
// 206 GFLOP/s on one core), and a register tile of vdpbf16ps in place of micro's FMAs (the same
// 8 x 32 tile, the weight packed as k pairs) made bfloat16 layers slower than these float32
// products: inference at (B, T, I, H) = (32, 100, 256, 256) 25.9 against 16.9 ms, training at
// (64, 100, 256, 256) 136 against 105 ms (two threads).
#pragma once
#include <atomic>
#include <memory>
#include <ATen/native/CPUBlas.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <vector>
#include <cstring>
#include <unistd.h>
#include <algorithm>
#include <limits>
#include <type_traits>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
void sgemv_(const char* trans, const int* m, const int* n, const float* alpha, const float* a, const int* lda,
            const float* x, const int* incx, const float* beta, float* y, const int* incy) __attribute__((weak));
void dgemv_(const char* trans, const int* m, const int* n, const double* alpha, const double* a, const int* lda,
            const double* x, const int* incx, const double* beta, double* y, const int* incy) __attribute__((weak));
}

namespace lk {
using at::vec::Vectorized;

// Column-major BLAS gemm, C = op(A) op(B) (+ C): false where this torch carries none.
template <typename T>
inline bool blas_gemm(char ta, char tb, int m, int n, int k, const T* a, int lda, const T* b, int ldb, bool acc,
                      T* c, int ldc) {
  const T one = T(1), beta = acc ? T(1) : T(0);
  if constexpr (std::is_same_v<T, float>) {
    if (!sgemm_) return false;
    sgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
    return true;
  } else if constexpr (std::is_same_v<T, double>) {
    if (!dgemm_) return false;
    dgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
    return true;
  }
  return false;
}
// bfloat16 products on AMX tiles through torch's oneDNN micro-kernels (see the top of this file).
inline bool bf16_gemm_available() {
  static const bool ok = at::native::cpublas::could_pack(at::kBFloat16);
  return ok;
}
// Whether a layer whose inputs and outputs are `io` takes that path (Cfg::bf16_gemm).
inline bool bf16_products(at::ScalarType io) { return io == at::kBFloat16 && bf16_gemm_available(); }

// Column-major BLAS gemv, y = op(A) x (+ y), x and y contiguous: false where this torch carries none.
template <typename T>
inline bool blas_gemv(char ta, int m, int n, const T* a, int lda, const T* x, bool acc, T* y) {
  const T one = T(1), beta = acc ? T(1) : T(0);
  const int inc = 1;
  if constexpr (std::is_same_v<T, float>) {
    if (!sgemv_) return false;
    sgemv_(&ta, &m, &n, &one, a, &lda, x, &inc, &beta, y, &inc);
    return true;
  } else if constexpr (std::is_same_v<T, double>) {
    if (!dgemv_) return false;
    dgemv_(&ta, &m, &n, &one, a, &lda, x, &inc, &beta, y, &inc);
    return true;
  }
  return false;
}

template <typename T>
inline bool blas_available() {
  if constexpr (std::is_same_v<T, float>) return sgemm_ != nullptr;
  else if constexpr (std::is_same_v<T, double>) return dgemm_ != nullptr;
  else return false;
}

// KU: independent accumulator sets over k (k = u mod KU into set u, summed at the end). A tile
// of few rows (B = 1: one row) has only MR*NV FMA chains, each waiting for its previous FMA's
// latency (4-5 cycles) every k; KU sets give the core MR*NV*KU chains to interleave.
template <typename T, int MR, int NV, int KU = 1>
static inline void micro(int K, const T* __restrict A, int lda, const T* __restrict Wp,
                         T* __restrict C, int ldc, bool acc_in, int ncols, const T* bias = nullptr) {
  using V = Vectorized<T>;
  constexpr int VL = V::size();
  constexpr int NR = NV * VL;
  V acc[MR][NV], part[KU > 1 ? KU - 1 : 1][MR][NV];  // part[u - 1]: the set of k = u mod KU, u >= 1
  V start[NV];  // the bias (padded to whole panels by the caller), the sums' start: no pass of its own
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) start[v] = bias ? V::loadu(bias + v * VL) : V(T(0));
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      acc[m][v] = start[v];
#pragma GCC unroll 4
      for (int u = 0; u + 1 < KU; ++u) part[u][m][v] = V(T(0));
    }
  auto fma_k = [&](int k, V(&into)[MR][NV]) {
    V w[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) w[v] = V::loadu(Wp + (size_t)k * NR + v * VL);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      V a(A[(size_t)m * lda + k]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) into[m][v] = at::vec::fmadd(a, w[v], into[m][v]);
    }
  };
  int k = 0;
  if constexpr (KU > 1) {
    for (; k + KU <= K; k += KU) {
      fma_k(k, acc);
#pragma GCC unroll 4
      for (int u = 1; u < KU; ++u) fma_k(k + u, part[u - 1]);
    }
  }
  for (; k < K; ++k) fma_k(k, acc);
  if constexpr (KU > 1) {
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v)
#pragma GCC unroll 4
        for (int u = 0; u + 1 < KU; ++u) acc[m][v] = acc[m][v] + part[u][m][v];
  }
  if (ncols == NR) {
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        T* p = C + (size_t)m * ldc + v * VL;
        if (acc_in) acc[m][v] = acc[m][v] + V::loadu(p);
        acc[m][v].store(p);
      }
  } else {
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v) {
        int c0 = v * VL;
        int cnt = std::min(VL, ncols - c0);
        if (cnt <= 0) break;
        T* p = C + (size_t)m * ldc + c0;
        if (acc_in) acc[m][v] = acc[m][v] + V::loadu(p, cnt);
        acc[m][v].store(p, cnt);
      }
  }
}

// Packed right operand: B(n, k) = src[n*sn + k*sk]; panels of NR columns, [panel][k][NR].
template <typename T>
struct Packed {
  // Register tile MR x (NV vectors): MR*NV accumulators + NV weight vectors + 1 broadcast
  // must fit the register file. AVX-512 (32 zmm): 8 x 2 measured best or equal-best at every
  // size on Zen 4. AVX2 (16 ymm): 8 x 2 would need 19 and spill; 6 x 2 needs 15.
  static constexpr int NV = 2;
#if defined(CPU_CAPABILITY_AVX512)
  static constexpr int MR = 8;
#else
  static constexpr int MR = 6;
#endif
  static constexpr int VL = Vectorized<T>::size();
  static constexpr int NR = NV * VL;
  int N = 0, K = 0, npanels = 0;
  const T* src = nullptr;
  int64_t sn = 0, sk = 0;
  std::unique_ptr<T[]> buf;  // the panels, not zeroed first: pack_panels writes every element
  bool direct = false;  // read src in place through BLAS (a weight used once per call)
  bool rows = false;    // direct: B row-major (B(n, k) = src[n*ld + k]), else column-major (src[n + k*ld])
  int64_t ld = 0;       // direct: BLAS leading dimension
  // bfloat16 mode: panels of NB16 columns (a multiple of 16, oneDNN's packing block), K padded to
  // Kp (even: VNNI pairs); panel p is [Kp/2][nbp][2] at bbuf + p * Kp * NB16, nbp = its width
  // rounded up to 16 (zero columns).
  static constexpr int NB16 = 64;
  bool bf16 = false;
  int Kp = 0;
  std::vector<at::BFloat16> bbuf;
  // uses: how many GEMMs of this call read the weight (one: direct, where BLAS is at hand and
  // the strides make a BLAS matrix; a stride of a dimension of size 1 is arbitrary).
  // bf16_: products in bfloat16 on AMX where bf16_gemm_available() (float32 T only; a weight used
  // once goes through BLAS as before: packing would cost more than the product).
  void init(const T* b, int64_t sn_, int64_t sk_, int N_, int K_, int64_t uses, bool bf16_ = false) {
    src = b; sn = sn_; sk = sk_; N = N_; K = K_;
    npanels = (N + NR - 1) / NR;
    direct = false;
    bf16 = std::is_same_v<T, float> && bf16_ && uses > 1 && N > 0 && K > 0 && bf16_gemm_available();
    if (bf16) {
      Kp = K + (K & 1);
      npanels = (N + NB16 - 1) / NB16;
      bbuf.resize((size_t)npanels * Kp * NB16);
      return;
    }
    if (uses <= 1 && blas_available<T>() && N > 0 && K > 0) {
      if ((sk == 1 || K == 1) && (sn >= K || N == 1)) {
        direct = true; rows = true; ld = N == 1 ? K : sn;
      } else if ((sn == 1 || N == 1) && (sk >= N || K == 1)) {
        direct = true; rows = false; ld = K == 1 ? N : sk;
      }
    }
    if (!direct) buf.reset(new T[(size_t)npanels * K * NR]);
  }
  // The length of a bias that a GEMM with this weight adds (GemmTask::bias): whole panels of NR
  // columns, as the micro-kernel reads a panel's every column, and N at least (bfloat16 panels).
  int64_t bias_length() const { return std::max<int64_t>((int64_t)npanels * NR, N); }
  // Thread tid of nth fills its contiguous share of the panels (a weight never init'ed has none).
  void pack_share(int tid, int nth) {
    if (direct) return;
    pack_panels((int)((int64_t)npanels * tid / nth), (int)((int64_t)npanels * (tid + 1) / nth));
  }
  // Fill panels [p0, p1) (callable from several threads on disjoint ranges).
  void pack_panels(int p0, int p1) {
    if (bf16) return pack_panels_bf16(p0, p1);
    for (int p = p0; p < p1; ++p) pack_panel(p, buf.get() + (size_t)p * K * NR);
  }
  // Panel p of the weight into dst, (K, NR) row-major, its columns past N zero.
  void pack_panel(int p, T* dst) const {
    const int nc = std::min(NR, N - p * NR);
    if (sk == 1) {  // the panel's nc rows of W, K long each, transposed into [k][NR]
      transpose_rows(src + (int64_t)p * NR * sn, sn, dst, nc);
      for (int j = nc; j < NR; ++j)
        for (int k = 0; k < K; ++k) dst[(size_t)k * NR + j] = T(0);
    } else {
      for (int k = 0; k < K; ++k) {
        for (int j = 0; j < nc; ++j) dst[(size_t)k * NR + j] = src[(int64_t)(p * NR + j) * sn + (int64_t)k * sk];
        for (int j = nc; j < NR; ++j) dst[(size_t)k * NR + j] = T(0);
      }
    }
  }
  // nc rows of K (row stride ld) into the first nc columns of dst (K, NR): torch's 16 x 16
  // register transposes for float on AVX-512; on AVX2 its 8 x 8 ones for a whole panel (torch's
  // AVX2 transpose of any size goes element by element), the last K % 8 columns element by element.
  void transpose_rows(const T* s, int64_t ld, T* dst, int nc) const {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      if (nc == NR) {
        int k = 0;
        for (; k + 8 <= K; k += 8)
          for (int r = 0; r < NR; r += 8)
            at::vec::transpose_mxn<float, 8, 8>(s + r * ld + k, ld, dst + (size_t)k * NR + r, NR);
        for (; k < K; ++k)
          for (int r = 0; r < NR; ++r) dst[(size_t)k * NR + r] = s[r * ld + k];
        return;
      }
    }
#endif
    at::vec::transpose_mxn<T>(s, ld, dst, NR, nc, K);
  }
  void pack_panels_bf16(int p0, int p1) {
    thread_local std::vector<T> col;                 // one column of B, (K,)
    thread_local std::vector<at::BFloat16> nk, kn;   // a panel (nbp, Kp), then (Kp, nbp) row-major
    col.resize(K);
    nk.resize((size_t)NB16 * Kp);
    kn.resize((size_t)NB16 * Kp);
    for (int p = p0; p < p1; ++p) {
      const int nc = std::min(NB16, N - p * NB16), nbp = (nc + 15) / 16 * 16;
      std::fill(nk.begin(), nk.end(), at::BFloat16(0.f));
      for (int j = 0; j < nc; ++j) {  // column j of the panel, converted with torch's vector rounding
        const T* s = src + (int64_t)(p * NB16 + j) * sn;
        const T* c = s;
        if (sk != 1) { for (int k = 0; k < K; ++k) col[k] = s[(int64_t)k * sk]; c = col.data(); }
        at::vec::convert(c, nk.data() + (size_t)j * Kp, K);
      }
      for (int k = 0; k < Kp; ++k)
        for (int j = 0; j < nbp; ++j) kn[(size_t)k * nbp + j] = nk[(size_t)j * Kp + k];
      at::native::cpublas::pack(Kp, nbp, nbp, nbp, at::kBFloat16, at::kBFloat16, kn.data(),
                                bbuf.data() + (size_t)p * Kp * NB16);
    }
  }
};

// C[M x N] (=|+=) A[M x K] * B^T over the bfloat16 panels [p0, p1) of W (W.bf16).
template <typename T>
void gemm_panels_bf16(const Packed<T>& W, int M, const T* A, int64_t lda, T* C, int64_t ldc, bool acc, int p0,
                      int p1, const T* bias) {
  if constexpr (std::is_same_v<T, float>) {
    constexpr int NB = Packed<T>::NB16;
    const int K = W.K, Kp = W.Kp;
    thread_local std::vector<at::BFloat16> a16;  // A in bfloat16, (M, Kp), the padding column 0
    thread_local std::vector<float> c32;         // a narrow last panel's product, (M, nbp)
    a16.resize((size_t)M * Kp);
    for (int m = 0; m < M; ++m) {
      at::BFloat16* d = a16.data() + (size_t)m * Kp;
      at::vec::convert(A + (int64_t)m * lda, d, K);
      if (Kp > K) d[K] = at::BFloat16(0.f);
    }
    for (int p = p0; p < p1; ++p) {
      const int nc = std::min(NB, W.N - p * NB), nbp = (nc + 15) / 16 * 16;
      const at::BFloat16* bp = W.bbuf.data() + (size_t)p * Kp * NB;
      T* cp = C + (int64_t)p * NB;
      if (nbp == nc) {
        at::native::cpublas::brgemm(M, nbp, Kp, Kp, nbp, ldc, acc, a16.data(), bp, cp, true);
      } else {  // the padding columns must not reach C (another panel's, another thread's)
        c32.resize((size_t)M * nbp);
        at::native::cpublas::brgemm(M, nbp, Kp, Kp, nbp, nbp, false, a16.data(), bp, c32.data(), true);
        for (int m = 0; m < M; ++m)
          for (int j = 0; j < nc; ++j) {
            T& c = cp[(int64_t)m * ldc + j];
            c = acc ? c + c32[(size_t)m * nbp + j] : c32[(size_t)m * nbp + j];
          }
      }
      if (bias)
        for (int m = 0; m < M; ++m)
          for (int j = 0; j < nc; ++j) cp[(int64_t)m * ldc + j] += bias[p * NB + j];
    }
    at::native::cpublas::brgemm_release(true);
  }
}

// The accumulator sets (micro's KU) for a tile of r rows: 8 FMA chains at least where NV = 2
// (r = 1: 4 sets, r = 2, 3: 2), within the 16 registers of AVX2 (r = 3: 12 accumulators, 2
// weights, 1 broadcast). Measured on a 2 GHz Zen (AVX2), one thread: a whole B = 1 forward step
// at I = H = 32 1.08-1.15x faster.
constexpr int narrow_unroll(int r) { return r == 1 ? 4 : r <= 3 ? 2 : 1; }

// One packed panel wp (K, NR) times all M rows of A: C[:, :ncols] (=|+=) A wp (+ bias), MR rows at
// a time, then the remaining rows in one narrower tile.
template <typename T>
void panel_rows(const T* wp, int K, int ncols, int M, const T* A, int64_t lda, T* C, int64_t ldc, bool acc,
                const T* bias) {
  constexpr int NV = Packed<T>::NV, MR = Packed<T>::MR;
  int m = 0;
  for (; m + MR <= M; m += MR)
    micro<T, MR, NV>(K, A + (int64_t)m * lda, (int)lda, wp, C + (int64_t)m * ldc, (int)ldc, acc, ncols, bias);
  const T* a = A + (int64_t)m * lda;
  T* c = C + (int64_t)m * ldc;
  switch (M - m) {
    case 0: break;
#define LKC(r) case r: if constexpr (r < MR) micro<T, r, NV, narrow_unroll(r)>(K, a, (int)lda, wp, c, (int)ldc, acc, ncols, bias); break;
    LKC(1) LKC(2) LKC(3) LKC(4) LKC(5) LKC(6) LKC(7)
#undef LKC
    default: break;
  }
}

// A weight read in place (Packed::direct) meets A of at least this many rows: each thread packs one
// panel at a time into a buffer of its own and runs the micro-kernel on it, instead of one BLAS
// call (see the top of this file). Fewer rows: BLAS (one row: gemv).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int PACK_AT_USE_MIN_ROWS = std::numeric_limits<int>::max();  // never: BLAS (see the top of this file)
#else
constexpr int PACK_AT_USE_MIN_ROWS = 4;
#endif

// C[M x N] (=|+=) A[M x K] * B^T over panels [p0, p1)
template <typename T>
void gemm_panels(const Packed<T>& W, int M, const T* A, int64_t lda, T* C, int64_t ldc, bool acc, int p0, int p1,
                 const T* bias = nullptr) {
  constexpr int NR = Packed<T>::NR;
  const int K = W.K;
  if (W.bf16) return gemm_panels_bf16<T>(W, M, A, lda, C, ldc, acc, p0, p1, bias);
  if (W.direct && M >= PACK_AT_USE_MIN_ROWS) {  // each panel packed into this thread's buffer just before use
    thread_local std::vector<T> panel;
    panel.resize((size_t)K * NR);
    for (int p = p0; p < p1; ++p) {
      W.pack_panel(p, panel.data());
      panel_rows<T>(panel.data(), K, std::min(NR, W.N - p * NR), M, A, lda, C + (int64_t)p * NR, ldc, acc,
                    bias ? bias + (int64_t)p * NR : nullptr);
    }
    return;
  }
  if (W.direct) {  // columns [n0, n1): C^T (n x M) = B[n0:n1] (n x K) A^T, column-major
    const int n0 = p0 * NR, n1 = std::min(W.N, p1 * NR);
    if (n1 <= n0 || M <= 0) return;
    const T* b = W.rows ? W.src + (int64_t)n0 * W.ld : W.src + n0;
    const char tb = W.rows ? 't' : 'n';  // B row-major (N x K), or column-major
    // one row: a gemv (MKL's gemm with one column runs a B = 1, H = 1,024 step 1.13x nn.LSTMCell's time, its gemv 0.98x)
    if (!(M == 1 && blas_gemv<T>(tb, W.rows ? K : n1 - n0, W.rows ? n1 - n0 : K, b, (int)W.ld, A, acc, C + n0)))
      blas_gemm(tb, 'n', n1 - n0, M, K, b, (int)W.ld, A, (int)lda, acc, C + n0, (int)ldc);
    if (bias)
      for (int m = 0; m < M; ++m)
        for (int n = n0; n < n1; ++n) C[(int64_t)m * ldc + n] += bias[n];
    return;
  }
  for (int p = p0; p < p1; ++p)
    panel_rows<T>(W.buf.get() + (size_t)p * K * NR, K, std::min(NR, W.N - p * NR), M, A, lda, C + (int64_t)p * NR,
                  ldc, acc, bias ? bias + (int64_t)p * NR : nullptr);
}

// One GEMM of a phase: C = A * W^T (+C if acc).
template <typename T>
struct GemmTask {
  const Packed<T>* W;
  int M;
  const T* A; int64_t lda;
  T* C; int64_t ldc;
  bool acc;
  const T* bias = nullptr;  // added to every row (W->bias_length() long), or none
  // The next task adds its product into the same columns of C (a GEMM split over K, e.g. a head's
  // segments of W_hh): run_tasks gives the whole group's panels to the same threads, in order, so
  // that no two threads write one element. Its W has the same N (and panel width) as this one's.
  bool more = false;
};

// The same GEMM restricted to rows b0..b1 of A and C (row mode, below).
template <typename T>
GemmTask<T> rows_of(GemmTask<T> g, int64_t b0, int64_t b1) {
  g.A += b0 * g.lda;
  g.C += b0 * g.ldc;
  g.M = (int)(b1 - b0);
  return g;
}

// One core's L2 cache in bytes (512 KiB where the system does not say).
inline int64_t l2_bytes() {
  static const int64_t bytes = [] {
    const long s = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return s > 0 ? (int64_t)s : (int64_t)512 << 10;
  }();
  return bytes;
}

// Row mode: the threads of a time loop split its per-step GEMMs by rows of the batch (each thread
// every panel, its own rows) rather than by panels (each thread some columns of every row). Row b
// of r_t = h_{t-1} W_hhᵀ needs row b of h_{t-1} alone, and so do the cell and, backwards,
// dh_{t-1} = dr_t W_hh: a thread then runs its rows through every step with no barrier at all,
// where splitting by panels takes two a step (each a wait on the slowest thread, and on a loaded
// machine on a descheduled one). Chosen where each thread has at least one register tile of rows
// (fewer run the micro-kernel's narrow tiles) and the weights that a step reads (every thread all
// of them) take at most a quarter of one core's L2, so that each core keeps its own copy in cache;
// packed weights only (not those read in place through BLAS, nor bfloat16 panels). Measured on a
// 2-core AVX-512 Xeon (2 MiB L2), two threads, alternating processes, at one tile a thread
// (B = 16): the batch split faster in inference at H = 32-64 (0.26-0.99 against 0.38-1.06 ms),
// level at H = 128; in training level at H = 32-64 and at H = 128 mixed (7.2-10.7 against
// 7.0-10.6 ms, the host's noise as wide as the difference). With the weights up to the whole L2
// (H = 256, B = 64) slower than the panels. A test hook, _force_split, overrides the rule (0 the rule,
// 1 always rows, 2 always panels).
inline std::atomic<int>& split_override() {
  static std::atomic<int> mode{0};
  return mode;
}
// The weights a step reads: the phase's tasks' W, `more` (the deep gates' MLP layers) and `last`
// (the projection's W_hr, or none).
template <typename T>
bool split_by_rows(int64_t B, int nth, const std::vector<GemmTask<T>>& phase, const std::vector<Packed<T>>& more,
                   const Packed<T>* last) {
  int64_t weight_bytes = 0;
  bool packed = true;
  auto count = [&](const Packed<T>& w) {
    weight_bytes += (int64_t)w.N * w.K * (int64_t)sizeof(T);
    packed = packed && !w.direct && !w.bf16;
  };
  for (const auto& g : phase) count(*g.W);
  for (const auto& w : more) count(w);
  if (last) count(*last);
  if (!packed || nth <= 1) return false;
  const int forced = split_override().load(std::memory_order_relaxed);
  if (forced) return forced == 1;
  return B >= (int64_t)nth * Packed<T>::MR && weight_bytes <= l2_bytes() / 4;
}

// Run a phase of independent GEMMs (a group of K-split tasks, linked by `more`, counts as one);
// thread tid of nth takes an equal share of the panels, weighted by K (each panel costs M*K*NR FMAs).
template <typename T>
void run_tasks(const GemmTask<T>* tasks, int ntasks, int tid, int nth) {
  int64_t total = 0;
  for (int i = 0; i < ntasks; ++i) total += (int64_t)tasks[i].W->npanels * tasks[i].W->K;
  if (total == 0) return;
  const int64_t lo = total * tid / nth, hi = total * (tid + 1) / nth;
  int64_t base = 0;
  for (int i = 0; i < ntasks;) {
    int last = i;  // the group: tasks i..last
    int64_t K = 0;
    for (;; ++last) {
      K += tasks[last].W->K;
      if (!tasks[last].more || last + 1 == ntasks) break;
    }
    const int64_t npanels = tasks[i].W->npanels;
    const int64_t cost = npanels * K;
    K = std::max<int64_t>(1, K);
    // panels whose start (base + p*K) lies in [lo, hi)
    int64_t p0 = lo <= base ? 0 : (lo - base + K - 1) / K;
    int64_t p1 = hi <= base ? 0 : (hi - base + K - 1) / K;
    p0 = std::min<int64_t>(p0, npanels);
    p1 = std::min<int64_t>(p1, npanels);
    for (int k = i; k <= last; ++k) {
      const GemmTask<T>& g = tasks[k];
      if (p1 > p0 && g.M > 0) gemm_panels<T>(*g.W, g.M, g.A, g.lda, g.C, g.ldc, g.acc, (int)p0, (int)p1, g.bias);
    }
    base += cost;
    i = last + 1;
  }
}
}  // namespace lk
