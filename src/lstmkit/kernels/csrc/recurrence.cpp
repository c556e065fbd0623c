// lstmkit fused CPU recurrence: forward and hand-written BPTT for ONE layer, ONE direction —
// the CPU kernel of the lstmkit::recurrence operators (schemas, fake shapes and autograd:
// lstmkit/kernels/ops.py; the order of flags, parameters and buffers: lstmkit_abi.h, generated
// from lstmkit/kernels/abi.py).
//
// The input projection is computed outside (PyTorch autograd): xg = x W_ih^T + b_ih + b_hh,
// (T, B, R), for every variant except layernorm, where xg is the RAW a = x W_ih^T (no bias,
// no LN) and the kernel applies the input LN, its gain ln_ih_weight and bias = b_ih + b_hh
// (optional) itself. This file runs the whole time loop in C++ inside ONE parallel region
// (parallel.h; layernorm backward: one region per chunk of steps, see backward_impl); per step:
//   forward : phase A  GEMMs   r = h_{t-1} W_hh^T            (B, R)   [+ fgr: s_{t-1} W_gg^T]
//             phase B  pointwise, rows split over threads (layernorm: z = LN(a) g_ih +
//                      LN(r) g_hh + bias, both LNs' stats in one fused pass; gates, c, LN of c, h)
//             [projection: phase C GEMM y_t = m_t W_hr^T, phase D state copy / masking]
//   backward: [projection: dh -> dm = dh W_hr]
//             phase B  pointwise (rows), phase A GEMMs dh_{t-1} = dr W_hh [+ ds = du_S W_gg]
// separated by barriers (parallel.h: spin briefly, then sleep). The GEMMs are the packed
// kernel of gemm.h (W packed once per call; register tile per CPU capability); the pointwise
// pass uses at::vec::Vectorized (Sleef exp/tanh, the same functions torch's CPU sigmoid/tanh
// use). No allocation inside the time loop. The after-loop reductions (dW_hh, dW_hr, dW_gg)
// are large GEMMs (at::mm) in recurrence_backward; layernorm's dW_hh is accumulated chunk by
// chunk inside the loop (its dr_t differs from dXG and is not kept for all T steps).
// bfloat16 / float16 layers compute in float32 (recurrence_forward / recurrence_backward).
//
// What is saved for backward (forward with save=true), all (T, B, .):
//   every LSTM variant : G (T,B,R) gate activations of the computed gates, in order i,f,g,o
//                        (these are the "trace" i, f, g, o), C (T,B,H) the (clipped) c_t,
//                        (the caller keeps y, h0, c0, the weights and lengths for backward).
//   layernorm          : G is NOT saved (without fgr); instead
//                        AH (T,B,R) the normalised a-hat of the input LN, AS (T,B,G) its 1/std
//                        per gate chunk, RH (T,B,R) the normalised r-hat of the recurrent LN,
//                        RS (T,B,G) its 1/std.
//                        Backward recomputes the gate activations from a-hat, r-hat (the same
//                        instructions on the same stored values: bit-identical), and the LN of
//                        c from C. The raw a is not kept (the caller may free it).
//                        layernorm + fgr saves G as well (s_{t-1} is read from it).
//   projection         : nothing more (o*tanh(LN(c)) is recomputed from G and C in backward).
//   fgr                : nothing more (s_{t-1} is read from G).
//   rnn                : y only.
// Steps t >= len_b: h, c, s carry over, y = 0, G/AH/RH/AS/RS rows = 0, C row = carried c.
#include <torch/extension.h>
#include <cmath>
#include <vector>
#include "gemm.h"
#include "lstmkit_abi.h"  // generated from lstmkit/kernels/abi.py: flags, parameter and buffer order
#include "parallel.h"

namespace lk {

using namespace lk::abi;

constexpr double LN_EPS = 1e-5;

struct Cfg {
  bool rnn, relu, has_i, has_f, has_o, cifg, peep, fgr, ln, niaf, noaf, clip;
  double clipv;
  int64_t H, P, Hout, R, G, nS;
  int64_t oi, of, og, oo;  // column offsets in R (-1 absent)
  int64_t si, sf, so;      // column offsets in s (nS*H) (-1 absent)
  Cfg(int64_t flags, double clip_, int64_t H_, int64_t P_) {
    rnn = flags & F_RNN; relu = flags & F_RELU;
    has_i = !rnn && !(flags & F_NIG);
    cifg = !rnn && (flags & F_CIFG);
    has_f = !rnn && !(flags & F_NFG) && !cifg;
    has_o = !rnn && !(flags & F_NOG);
    peep = !rnn && (flags & F_PEEPHOLE); fgr = !rnn && (flags & F_FGR);
    ln = flags & F_LAYERNORM; niaf = flags & F_NIAF; noaf = flags & F_NOAF;
    clip = !rnn && (flags & F_CLIP); clipv = clip_;
    H = H_; P = rnn ? 0 : P_; Hout = P > 0 ? P : H;
    int64_t k = 0;
    oi = has_i ? H * k++ : -1;
    of = has_f ? H * k++ : -1;
    og = H * k++;
    oo = has_o ? H * k++ : -1;
    G = k; R = G * H;
    int64_t s = 0;
    si = has_i ? H * s++ : -1;
    sf = has_f ? H * s++ : -1;
    so = has_o ? H * s++ : -1;
    nS = s;
  }
};

// The per-parameter reductions of the backward (summed over steps and rows), one vector per
// thread: where each parameter's gradient sits in it. Written here once; backward_impl
// accumulates into these slices and recurrence_backward reads them out.
struct AccLayout {
  int64_t H, R;
  int64_t peephole(int k) const { return k * H; }  // k = 0, 1, 2: i, f, o (H each)
  int64_t ln_c_weight() const { return 3 * H; }
  int64_t ln_c_bias() const { return 4 * H; }
  int64_t ln_hh_weight() const { return 5 * H; }  // R each from here on
  int64_t ln_ih_weight() const { return 5 * H + R; }
  int64_t bias() const { return 5 * H + 2 * R; }
  int64_t size() const { return 5 * H + 3 * R; }
};

// The cell's own parameters as raw pointers, nullptr where the variant has none; read the
// same way by forward_impl and backward_impl.
template <typename T>
struct CellParams {
  const T *pi, *pf, *po;  // peephole weights (H each)
  const T *gln, *glnih;   // layernorm gains of r = h W_hh^T and of a = x W_ih^T (R each)
  const T* biasp;         // layernorm: the bias added after both norms (R)
  const T *cw, *cb;       // layernorm of c: gain and bias (H each)
  T clipv;                // clip: |c| bound
  CellParams(const Cfg& cf, const at::Tensor& p_i, const at::Tensor& p_f, const at::Tensor& p_o,
             const at::Tensor& lnhh_w, const at::Tensor& lnih_w, const at::Tensor& bias,
             const at::Tensor& lnc_w, const at::Tensor& lnc_b) {
    pi = cf.peep && cf.has_i ? p_i.data_ptr<T>() : nullptr;
    pf = cf.peep && cf.has_f ? p_f.data_ptr<T>() : nullptr;
    po = cf.peep && cf.has_o ? p_o.data_ptr<T>() : nullptr;
    gln = cf.ln ? lnhh_w.data_ptr<T>() : nullptr;
    glnih = cf.ln ? lnih_w.data_ptr<T>() : nullptr;
    biasp = (cf.ln && bias.defined() && bias.numel() > 0) ? bias.data_ptr<T>() : nullptr;
    cw = (cf.ln && !cf.rnn) ? lnc_w.data_ptr<T>() : nullptr;
    cb = (cf.ln && !cf.rnn) ? lnc_b.data_ptr<T>() : nullptr;
    clipv = (T)cf.clipv;
  }
};

static inline int64_t pad_ld(int64_t K, int VL) {
  // round up to whole vectors, then one more vector: breaks 4 KiB aliasing of row starts
  return (K + VL - 1) / VL * VL + VL;
}

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
// Activations. float on AVX-512: inline Cephes-style exp (max rel. err. ~2e-7) and tanh
// (polynomial below |x| = 0.625, 1 - 2/(e^{2|x|}+1) above; ~2 ulp): measured ~2x faster for
// the whole pointwise pass than the out-of-line Sleef u10 calls. double: Sleef (1 ulp).
template <typename T>
static inline Vectorized<T> vexp(const Vectorized<T>& x) { return x.exp(); }
template <typename T>
static inline Vectorized<T> vtanh(const Vectorized<T>& x) { return x.tanh(); }
#if defined(CPU_CAPABILITY_AVX512)
template <>
inline Vectorized<float> vexp<float>(const Vectorized<float>& xv) {
  __m512 x = xv;
  // max/min return their SECOND operand when either is NaN: x goes second so NaN propagates
  // (as torch's own activations do) instead of being clamped into a finite value.
  x = _mm512_min_ps(_mm512_set1_ps(89.f), _mm512_max_ps(_mm512_set1_ps(-104.f), x));
  // n = round(x / ln2); r = x - n ln2 (ln2 split in two for accuracy)
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  __m512 r2 = _mm512_mul_ps(r, r);
  p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);  // p * 2^n, with correct overflow / underflow
}
template <>
inline Vectorized<float> vtanh<float>(const Vectorized<float>& xv) {
  const __m512 x = xv;
  const __m512 ax = _mm512_abs_ps(x);
  // large: 1 - 2 / (exp(2|x|) + 1), sign restored
  const __m512 e = vexp<float>(Vectorized<float>(_mm512_add_ps(ax, ax)));
  __m512 big = _mm512_sub_ps(_mm512_set1_ps(1.f),
                             _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(e, _mm512_set1_ps(1.f))));
  big = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(big),
        _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000))));
  // small: x + x^3 P(x^2)
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 p = _mm512_set1_ps(-5.70498872745e-3f);
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(2.06390887954e-2f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-5.37397155531e-2f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.33314422036e-1f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-3.33332819422e-1f));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, z), x, x);
  const __mmask16 m = _mm512_cmp_ps_mask(ax, _mm512_set1_ps(0.625f), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(m, big, small);
}
#endif
template <typename T>
static inline Vectorized<T> sigm(const Vectorized<T>& x) {
  const Vectorized<T> one(T(1));
  return one / (one + vexp<T>(Vectorized<T>(T(0)) - x));
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
  const T var = hsum(q0 + q1) / T(n);
  rstd = T(1) / std::sqrt(var + T(LN_EPS));
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
  rx = T(1) / std::sqrt(hsum(qx0 + qx1) / T(n) + T(LN_EPS));
  ry = T(1) / std::sqrt(hsum(qy0 + qy1) / T(n) + T(LN_EPS));
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


// ----------------------------------------------------------------------------------------
// forward
// ----------------------------------------------------------------------------------------
template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& xg, const at::Tensor& whh, const at::Tensor& h0,
                                     const at::Tensor& c0, const std::vector<int64_t>& len,
                                     const at::Tensor& p_i, const at::Tensor& p_f, const at::Tensor& p_o,
                                     const at::Tensor& wgg, const at::Tensor& lnhh_w, const at::Tensor& lnc_w,
                                     const at::Tensor& lnc_b, const at::Tensor& whr, const at::Tensor& lnih_w,
                                     const at::Tensor& bias, const Cfg& cf, bool save, int nthreads) {
  using V = Vectorized<T>;
  constexpr int VL = V::size();
  const int64_t Tn = xg.size(0), B = xg.size(1), R = cf.R, H = cf.H, Hout = cf.Hout, P = cf.P;
  const bool lstm = !cf.rnn;
  auto opt = xg.options();
  at::Tensor Y = at::empty({Tn, B, Hout}, opt);
  at::Tensor Gs, Cs, RH, RS, AH, AS;
  // layernorm (without fgr) saves a_hat and r_hat instead of G: backward recomputes the gates
  const bool saveC = save && lstm;
  const bool saveG = saveC && (!cf.ln || cf.fgr);
  if (saveG) Gs = at::empty({Tn, B, R}, opt);
  if (saveC) Cs = at::empty({Tn, B, H}, opt);
  if (save && cf.ln) {
    RH = at::empty({Tn, B, R}, opt); RS = at::empty({Tn, B, cf.G}, opt);
    AH = at::empty({Tn, B, R}, opt); AS = at::empty({Tn, B, cf.G}, opt);
  }
  // workspaces (one allocation per call)
  const int64_t ldh = pad_ld(Hout, VL), ldr = pad_ld(R, VL), lds = pad_ld(std::max<int64_t>(cf.nS * H, 1), VL),
                ldm = pad_ld(H, VL);
  at::Tensor hs = at::zeros({B, ldh}, opt), rws = at::zeros({B, ldr}, opt);
  at::Tensor cs = lstm ? c0.contiguous().clone() : at::Tensor();
  at::Tensor ss, fws, mws;
  if (cf.fgr) { ss = at::zeros({B, lds}, opt); fws = at::zeros({B, lds}, opt); }
  if (P > 0) mws = at::zeros({B, ldm}, opt);
  hs.narrow(1, 0, Hout).copy_(h0);

  Packed<T> Wp, Wgg, Whr;
  const T* whh_p = whh.data_ptr<T>();
  Wp.init(whh_p, whh.stride(0), whh.stride(1), (int)R, (int)Hout);
  if (cf.fgr) Wgg.init(wgg.data_ptr<T>(), wgg.stride(0), wgg.stride(1), (int)(cf.nS * H), (int)(cf.nS * H));
  if (P > 0) Whr.init(whr.data_ptr<T>(), whr.stride(0), whr.stride(1), (int)P, (int)H);

  const T* xgp = xg.data_ptr<T>();
  T* Yp = Y.data_ptr<T>();
  T* Gp = saveG ? Gs.data_ptr<T>() : nullptr;
  T* Cp = saveC ? Cs.data_ptr<T>() : nullptr;
  T* RHp = RH.defined() ? RH.data_ptr<T>() : nullptr;
  T* RSp = RS.defined() ? RS.data_ptr<T>() : nullptr;
  T* AHp = AH.defined() ? AH.data_ptr<T>() : nullptr;
  T* ASp = AS.defined() ? AS.data_ptr<T>() : nullptr;
  T* hsp = hs.data_ptr<T>();
  T* rwp = rws.data_ptr<T>();
  T* csp = lstm ? cs.data_ptr<T>() : nullptr;
  T* ssp = cf.fgr ? ss.data_ptr<T>() : nullptr;
  T* fwp = cf.fgr ? fws.data_ptr<T>() : nullptr;
  T* mwp = P > 0 ? mws.data_ptr<T>() : nullptr;
  const CellParams<T> prm(cf, p_i, p_f, p_o, lnhh_w, lnih_w, bias, lnc_w, lnc_b);

  GemmTask<T> phaseA[2];
  int nA = 0;
  phaseA[nA++] = GemmTask<T>{&Wp, (int)B, hsp, ldh, rwp, ldr, false};
  if (cf.fgr) phaseA[nA++] = GemmTask<T>{&Wgg, (int)B, ssp, lds, fwp, lds, false};

  parallel_region(nthreads, [&](const int tid, const int nth, Barrier& bar) {
    Wp.pack_share(tid, nth); Wgg.pack_share(tid, nth); Whr.pack_share(tid, nth);  // absent ones: no panels
    int64_t b0, b1;
    split_range(B, tid, nth, b0, b1);
    bar.wait();
    for (int64_t t = 0; t < Tn; ++t) {
      run_tasks<T>(phaseA, nA, tid, nth);
      bar.wait();
      for (int64_t b = b0; b < b1; ++b) {
        const bool valid = t < len[b];
        const int64_t tb = t * B + b;
        T* yr = Yp + tb * Hout;
        T* rr = rwp + b * ldr;
        const T* xr = xgp + tb * R;
        if (!lstm) {  // plain RNN
          T* hr = hsp + b * ldh;
          if (!valid) { if (P == 0) std::fill(yr, yr + Hout, T(0)); continue; }
          for (int64_t j = 0; j < H; j += VL) {
            const int n = (int)std::min<int64_t>(VL, H - j);
            V u = ldv(xr + j, n) + ldv(rr + j, n);
            V h = cf.relu ? at::vec::maximum(u, V(T(0))) : vtanh<T>(u);
            stv(h, hr + j, n); stv(h, yr + j, n);
          }
          continue;
        }
        T* gr = saveG ? Gp + tb * R : nullptr;  // gate activations are stored only when saved
        T* cr = csp + b * H;
        if (!valid) {
          if (P == 0) std::fill(yr, yr + Hout, T(0));
          if (saveG) std::fill(gr, gr + R, T(0));
          if (saveC) std::copy(cr, cr + H, Cp + tb * H);
          if (RHp) {
            std::fill(RHp + tb * R, RHp + tb * R + R, T(0)); std::fill(RSp + tb * cf.G, RSp + tb * cf.G + cf.G, T(0));
            std::fill(AHp + tb * R, AHp + tb * R + R, T(0)); std::fill(ASp + tb * cf.G, ASp + tb * cf.G + cf.G, T(0));
          }
          continue;
        }
        if (cf.ln) {  // r <- z = LN(a) g_ih + LN(r) g_hh (+ bias), per gate chunk; a_hat, r_hat, 1/std saved
          for (int64_t k = 0; k < cf.G; ++k) {
            const T* ach = xr + k * H;
            T* rch = rr + k * H;
            T ma, ra, mr, rs;
            row_stats2(ach, rch, H, ma, ra, mr, rs);
            T* ah = AHp ? AHp + tb * R + k * H : nullptr;
            T* rh = RHp ? RHp + tb * R + k * H : nullptr;
            if (AHp) { ASp[tb * cf.G + k] = ra; RSp[tb * cf.G + k] = rs; }
            const V vma(ma), vra(ra), vmr(mr), vrs(rs);
            for (int64_t j = 0; j < H; j += VL) {
              const int n = (int)std::min<int64_t>(VL, H - j);
              const V ahat = (ldv(ach + j, n) - vma) * vra;
              const V rhat = (ldv(rch + j, n) - vmr) * vrs;
              if (ah) { stv(ahat, ah + j, n); stv(rhat, rh + j, n); }
              stv(ln_z(ahat, rhat, prm.glnih, prm.gln, prm.biasp, k * H + j, n), rch + j, n);
            }
          }
        }
        const T* fr = cf.fgr ? fwp + b * lds : nullptr;
        T* sr = cf.fgr ? ssp + b * lds : nullptr;
        auto pre = [&](int64_t off, int64_t j, int n) -> V {  // z = xg + r, or the LN z from above
          if (cf.ln) return ldv(rr + off + j, n);
          return ldv(xr + off + j, n) + ldv(rr + off + j, n);
        };
        // a sigmoid gate at column offset off (s offset soff): sigma(z [+ p * c] [+ fgr's input]),
        // saved to G and to fgr's s
        auto sig_gate = [&](int64_t off, int64_t soff, const T* peep, const V& c, int64_t j, int n) -> V {
          V u = pre(off, j, n);
          if (peep) u = at::vec::fmadd(ldv(peep + j, n), c, u);
          if (fr) u = u + ldv(fr + soff + j, n);
          const V a = sigm(u);
          if (gr) stv(a, gr + off + j, n);
          if (sr) stv(a, sr + soff + j, n);
          return a;
        };
        const V one(T(1));
        // loop 1: i, f, g -> c
        for (int64_t j = 0; j < H; j += VL) {
          const int n = (int)std::min<int64_t>(VL, H - j);
          const V cp = ldv(cr + j, n);
          V i = one, f = one, g;
          if (cf.has_i) i = sig_gate(cf.oi, cf.si, prm.pi, cp, j, n);
          if (cf.has_f) {
            f = sig_gate(cf.of, cf.sf, prm.pf, cp, j, n);
          } else if (cf.cifg) {
            f = one - i;
          }
          {
            V u = pre(cf.og, j, n);
            g = cf.niaf ? u : vtanh<T>(u);
            if (gr) stv(g, gr + cf.og + j, n);
          }
          V c = at::vec::fmadd(f, cp, i * g);
          if (cf.clip) c = at::vec::clamp(c, V(-prm.clipv), V(prm.clipv));
          stv(c, cr + j, n);
        }
        if (saveC) std::copy(cr, cr + H, Cp + tb * H);
        T cmean = 0, crstd = 1;
        if (prm.cw) row_stats(cr, H, cmean, crstd);
        T* hout = P > 0 ? mwp + b * ldm : hsp + b * ldh;
        // loop 2: o, h
        for (int64_t j = 0; j < H; j += VL) {
          const int n = (int)std::min<int64_t>(VL, H - j);
          const V c = ldv(cr + j, n);
          V o = one;
          if (cf.has_o) o = sig_gate(cf.oo, cf.so, prm.po, c, j, n);
          V m = c;
          if (prm.cw) m = at::vec::fmadd((c - V(cmean)) * V(crstd), ldv(prm.cw + j, n), ldv(prm.cb + j, n));
          V h = o * (cf.noaf ? m : vtanh<T>(m));
          stv(h, hout + j, n);
          if (P == 0) stv(h, yr + j, n);
        }
      }
      bar.wait();
      if (P > 0) {
        GemmTask<T> pc{&Whr, (int)B, mwp, ldm, Yp + t * B * P, P, false};
        run_tasks<T>(&pc, 1, tid, nth);
        bar.wait();
        for (int64_t b = b0; b < b1; ++b) {
          T* yr = Yp + (t * B + b) * P;
          if (t < len[b]) std::copy(yr, yr + P, hsp + b * ldh);
          else std::fill(yr, yr + P, T(0));
        }
        bar.wait();
      }
    }
  });
  at::Tensor hn = hs.narrow(1, 0, Hout).contiguous();
  at::Tensor cn = lstm ? cs : at::Tensor();
  // a separate empty tensor per absent output: outputs of an operator must not alias each other
  auto e = [&] { return at::empty({0}, opt); };
  return {Y, hn, cn.defined() ? cn : e(), saveG ? Gs : e(), saveC ? Cs : e(), RH.defined() ? RH : e(),
          RS.defined() ? RS : e(), AH.defined() ? AH : e(), AS.defined() ? AS : e()};
}

// ----------------------------------------------------------------------------------------
// backward
// ----------------------------------------------------------------------------------------
// Returns dXG (T,B,R) (layernorm: the gradient w.r.t. the RAW a = x W_ih^T, through the
// input LN), dWhh (R,H_out) (layernorm only; other variants: empty, the wrapper computes it
// from dXG), dHP (T,B,P) and M (T,B,H) (projection: gradient w.r.t. y_t before masking, and
// o*tanh(LN(c)) for dW_hr), dh0, dc0, acc (the per-parameter reductions, AccLayout),
// dZS (T,B,nS*H) (layernorm + fgr only: the gradient w.r.t. the sigmoid gates' u, for dW_gg).
// layernorm: dr_t (the gradient w.r.t. the raw r_t) is kept for a chunk of Tc steps only;
// after each chunk dW_hh += dr_chunk^T h_prev_chunk (at::addmm_, outside the OpenMP region).
// dY may have any strides (an expanded gradient such as that of y.sum() is not copied).
template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& Gs, const at::Tensor& Cs, const at::Tensor& Y,
                                      const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& whh,
                                      const std::vector<int64_t>& len, const at::Tensor& p_i,
                                      const at::Tensor& p_f, const at::Tensor& p_o, const at::Tensor& wgg,
                                      const at::Tensor& lnhh_w, const at::Tensor& lnc_w, const at::Tensor& lnc_b,
                                      const at::Tensor& whr, const at::Tensor& lnih_w, const at::Tensor& bias,
                                      const at::Tensor& RH, const at::Tensor& RS, const at::Tensor& AH,
                                      const at::Tensor& AS, const at::Tensor& dY, const at::Tensor& dhn,
                                      const at::Tensor& dcn, const Cfg& cf, int nthreads) {
  using V = Vectorized<T>;
  constexpr int VL = V::size();
  const int64_t Tn = Y.size(0), B = Y.size(1), R = cf.R, H = cf.H, Hout = cf.Hout, P = cf.P;
  const bool lstm = !cf.rnn;
  const bool regate = cf.ln && !cf.fgr;  // gates recomputed from a_hat, r_hat (G not saved)
  auto opt = Y.options();
  at::Tensor dXG = at::empty({Tn, B, R}, opt);
  at::Tensor dHP = P > 0 ? at::empty({Tn, B, P}, opt) : at::Tensor();
  at::Tensor Mo = P > 0 ? at::empty({Tn, B, H}, opt) : at::Tensor();
  at::Tensor dZS = (cf.ln && cf.fgr) ? at::empty({Tn, B, cf.nS * H}, opt) : at::Tensor();
  const int64_t ldr = pad_ld(R, VL), lds = pad_ld(std::max<int64_t>(cf.nS * H, 1), VL), ldp = pad_ld(std::max<int64_t>(P, 1), VL);
  // layernorm: dW_hh accumulated chunk by chunk (about 512 rows of dr at a time)
  const int64_t Tc = cf.ln ? std::max<int64_t>(1, std::min<int64_t>(Tn, (512 + B - 1) / std::max<int64_t>(B, 1)))
                           : std::max<int64_t>(Tn, 1);
  // rows padded to ldr: the chunk rows of step t are also that step's GEMM input (dh = dr W_hh)
  at::Tensor dRc = cf.ln ? at::zeros({Tc * B, ldr}, opt) : at::Tensor();
  at::Tensor dWhh = cf.ln ? at::zeros({R, Hout}, opt) : at::Tensor();
    at::Tensor dH = at::zeros({B, Hout}, opt);      // GEMM output: dr_t W_hh
  at::Tensor dRw = at::zeros({cf.ln ? 0 : B, ldr}, opt);  // GEMM input (padded; layernorm: dRc rows)
  at::Tensor dcs = lstm ? dcn.clone() : at::Tensor();
  at::Tensor dS, dUS, dHPw, dMo;
  if (cf.fgr) { dS = at::zeros({B, cf.nS * H}, opt); dUS = at::zeros({B, lds}, opt); }
  if (P > 0) { dHPw = at::zeros({B, ldp}, opt); dMo = at::zeros({B, H}, opt); }
  const AccLayout al{H, R};
  const int64_t NACC = al.size();
  at::Tensor acc = at::zeros({nthreads, NACC}, opt);
  // per thread: LN-c row temp (H), gathered dy row (H_out), recomputed gate row (R)
  const int64_t ldtmp = pad_ld(H, VL) + pad_ld(Hout, VL) + (regate ? pad_ld(R, VL) : 0);
  at::Tensor rowtmp = at::zeros({nthreads, ldtmp}, opt);

  Packed<T> Wt, Wggt, Whrt;
  Wt.init(whh.data_ptr<T>(), whh.stride(1), whh.stride(0), (int)Hout, (int)R);
  if (cf.fgr) Wggt.init(wgg.data_ptr<T>(), wgg.stride(1), wgg.stride(0), (int)(cf.nS * H), (int)(cf.nS * H));
  if (P > 0) Whrt.init(whr.data_ptr<T>(), whr.stride(1), whr.stride(0), (int)H, (int)P);

  const T* Gp = (lstm && !regate) ? Gs.data_ptr<T>() : nullptr;
  const T* Cp = lstm ? Cs.data_ptr<T>() : nullptr;
  const T* Yp = Y.data_ptr<T>();
  const T* c0p = lstm ? c0.data_ptr<T>() : nullptr;
  const T* dYp = dY.data_ptr<T>();
  const int64_t dys0 = dY.stride(0), dys1 = dY.stride(1), dys2 = dY.stride(2);
  const T* dhnp = dhn.data_ptr<T>();
  T* dXGp = dXG.data_ptr<T>();
  T* dRcp = cf.ln ? dRc.data_ptr<T>() : nullptr;
  T* dZSp = dZS.defined() ? dZS.data_ptr<T>() : nullptr;
  T* dHPp = P > 0 ? dHP.data_ptr<T>() : nullptr;
  T* Mop = P > 0 ? Mo.data_ptr<T>() : nullptr;
  T* dHp = dH.data_ptr<T>();
  T* dRwp = dRw.data_ptr<T>();
  T* dcp = lstm ? dcs.data_ptr<T>() : nullptr;
  T* dSp = cf.fgr ? dS.data_ptr<T>() : nullptr;
  T* dUSp = cf.fgr ? dUS.data_ptr<T>() : nullptr;
  T* dHPwp = P > 0 ? dHPw.data_ptr<T>() : nullptr;
  T* dMop = P > 0 ? dMo.data_ptr<T>() : nullptr;
  const T* RHp = cf.ln ? RH.data_ptr<T>() : nullptr;
  const T* RSp = cf.ln ? RS.data_ptr<T>() : nullptr;
  const T* AHp = cf.ln ? AH.data_ptr<T>() : nullptr;
  const T* ASp = cf.ln ? AS.data_ptr<T>() : nullptr;
  const CellParams<T> prm(cf, p_i, p_f, p_o, lnhh_w, lnih_w, bias, lnc_w, lnc_b);
  T* accp = acc.data_ptr<T>();
  T* rowtmpp = rowtmp.data_ptr<T>();

  GemmTask<T> phaseA[2];
  int nA = 0;
  phaseA[nA++] = GemmTask<T>{&Wt, (int)B, dRwp, ldr, dHp, Hout, false};
  if (cf.fgr) phaseA[nA++] = GemmTask<T>{&Wggt, (int)B, dUSp, lds, dSp, cf.nS * H, false};

  bool packed = false;
  for (int64_t t1 = Tn; t1 > 0 || (Tn == 0 && !packed); t1 -= Tc) {
    const int64_t t0 = std::max<int64_t>(0, t1 - Tc);
  parallel_region(nthreads, [&](const int tid, const int nth, Barrier& bar) {
    if (!packed) { Wt.pack_share(tid, nth); Wggt.pack_share(tid, nth); Whrt.pack_share(tid, nth); }
    int64_t b0, b1;
    split_range(B, tid, nth, b0, b1);
    T* A = accp + tid * NACC;  // this thread's accumulators (AccLayout)
    T* A_pi = A + al.peephole(0);
    T* A_pf = A + al.peephole(1);
    T* A_po = A + al.peephole(2);
    T* A_cw = A + al.ln_c_weight();
    T* A_cb = A + al.ln_c_bias();
    T* A_hh = A + al.ln_hh_weight();
    T* A_ih = A + al.ln_ih_weight();
    T* A_bi = A + al.bias();
    T* dchat = rowtmpp + tid * ldtmp;
    T* dybuf = dchat + pad_ld(H, VL);
    T* gbuf = regate ? dybuf + pad_ld(Hout, VL) : nullptr;
    auto dy_row = [&](int64_t t, int64_t b) -> const T* {  // row (t, b) of dY, gathered if strided
      const T* p = dYp + t * dys0 + b * dys1;
      if (dys2 == 1) return p;
      for (int64_t j = 0; j < Hout; ++j) dybuf[j] = p[j * dys2];
      return dybuf;
    };
    bar.wait();
    for (int64_t t = t1 - 1; t >= t0; --t) {
      if (P > 0) {  // dh_total = dy + carried dh  ->  dm = dh_total W_hr
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t tb = t * B + b;
          T* w = dHPwp + b * ldp;
          T* d = dHPp + tb * P;
          if (t < len[b]) {
            const T* carry = (t + 1 < len[b]) ? dHp + b * Hout : dhnp + b * Hout;
            const T* dy = dy_row(t, b);
            for (int64_t j = 0; j < P; ++j) { T v = dy[j] + carry[j]; w[j] = v; d[j] = v; }
          } else {
            std::fill(w, w + P, T(0)); std::fill(d, d + P, T(0));
          }
        }
        bar.wait();
        GemmTask<T> pc{&Whrt, (int)B, dHPwp, ldp, dMop, H, false};
        run_tasks<T>(&pc, 1, tid, nth);
        bar.wait();
      }
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t tb = t * B + b;
        const bool valid = t < len[b];
        T* dxr = dXGp + tb * R;
        T* drc = dRcp ? dRcp + ((t - t0) * B + b) * ldr : nullptr;
        T* dwr = drc ? drc : dRwp + b * ldr;  // GEMM input row
        if (!valid) {
          std::fill(dxr, dxr + R, T(0));
          std::fill(dwr, dwr + R, T(0));
          if (dZSp) std::fill(dZSp + tb * cf.nS * H, dZSp + (tb + 1) * cf.nS * H, T(0));
          if (dUSp) std::fill(dUSp + b * lds, dUSp + b * lds + cf.nS * H, T(0));
          if (Mop) std::fill(Mop + tb * H, Mop + tb * H + H, T(0));
          continue;
        }
        const bool carry_in = t + 1 < len[b];
        const T* dhc = carry_in ? dHp + b * Hout : dhnp + b * Hout;
        const T* dy = P > 0 ? nullptr : dy_row(t, b);
        if (!lstm) {
          const T* y = Yp + tb * H;
          for (int64_t j = 0; j < H; j += VL) {
            const int n = (int)std::min<int64_t>(VL, H - j);
            V dh = ldv(dy + j, n) + ldv(dhc + j, n);
            V yv = ldv(y + j, n);
            V du = cf.relu ? V::blendv(V(T(0)), dh, yv > V(T(0))) : dh * (V(T(1)) - yv * yv);
            stv(du, dxr + j, n); stv(du, dwr + j, n);
          }
          continue;
        }
        const T* cr = Cp + tb * H;
        const T* cpr = t > 0 ? Cp + (tb - B) * H : c0p + b * H;
        const V one(T(1)), zero(T(0));
        const T* gr = Gp ? Gp + tb * R : gbuf;
        if (regate) {  // the forward's gate activations, recomputed exactly as it did
          const T* ah = AHp + tb * R;
          const T* rh = RHp + tb * R;
          for (int64_t j = 0; j < H; j += VL) {
            const int n = (int)std::min<int64_t>(VL, H - j);
            const V cp = ldv(cpr + j, n);
            if (cf.has_i) {
              const int64_t o = cf.oi + j;
              V u = ln_z(ldv(ah + o, n), ldv(rh + o, n), prm.glnih, prm.gln, prm.biasp, o, n);
              if (prm.pi) u = at::vec::fmadd(ldv(prm.pi + j, n), cp, u);
              stv(sigm(u), gbuf + o, n);
            }
            if (cf.has_f) {
              const int64_t o = cf.of + j;
              V u = ln_z(ldv(ah + o, n), ldv(rh + o, n), prm.glnih, prm.gln, prm.biasp, o, n);
              if (prm.pf) u = at::vec::fmadd(ldv(prm.pf + j, n), cp, u);
              stv(sigm(u), gbuf + o, n);
            }
            {
              const int64_t o = cf.og + j;
              const V u = ln_z(ldv(ah + o, n), ldv(rh + o, n), prm.glnih, prm.gln, prm.biasp, o, n);
              stv(cf.niaf ? u : vtanh<T>(u), gbuf + o, n);
            }
            if (cf.has_o) {
              const int64_t o = cf.oo + j;
              V u = ln_z(ldv(ah + o, n), ldv(rh + o, n), prm.glnih, prm.gln, prm.biasp, o, n);
              if (prm.po) u = at::vec::fmadd(ldv(prm.po + j, n), ldv(cr + j, n), u);
              stv(sigm(u), gbuf + o, n);
            }
          }
        }
        T* dcr = dcp + b * H;
        const T* dsr = (cf.fgr && carry_in) ? dSp + b * cf.nS * H : nullptr;
        T* dus = cf.fgr ? dUSp + b * lds : nullptr;
        T cmean = 0, crstd = 1;
        if (prm.cw) row_stats(cr, H, cmean, crstd);
        T s1 = 0, s2 = 0;  // LN-c backward sums: sum(dchat), sum(dchat*chat)
        // loop 2': o, dm
        {
          V a1(T(0)), a2(T(0));
          for (int64_t j = 0; j < H; j += VL) {
            const int n = (int)std::min<int64_t>(VL, H - j);
            const V c = ldv(cr + j, n);
            const V dh = P > 0 ? ldv(dMop + b * H + j, n) : ldv(dy + j, n) + ldv(dhc + j, n);
            V chat, m = c;
            if (prm.cw) { chat = (c - V(cmean)) * V(crstd); m = at::vec::fmadd(chat, ldv(prm.cw + j, n), ldv(prm.cb + j, n)); }
            const V tm = cf.noaf ? m : vtanh<T>(m);
            V o = one;
            if (cf.has_o) {
              o = ldv(gr + cf.oo + j, n);
              V dO = dh * tm;
              if (dsr) dO = dO + ldv(dsr + cf.so + j, n);
              const V du = dO * o * (one - o);
              stv(du, dxr + cf.oo + j, n);
              if (dus) stv(du, dus + cf.so + j, n);
              if (prm.po) stv(at::vec::fmadd(du, c, ldv(A_po + j, n)), A_po + j, n);
            }
            if (Mop) stv(o * tm, Mop + tb * H + j, n);
            V dm = dh * o;
            if (!cf.noaf) dm = dm * (one - tm * tm);
            if (prm.cw) {
              stv(at::vec::fmadd(dm, chat, ldv(A_cw + j, n)), A_cw + j, n);
              stv(ldv(A_cb + j, n) + dm, A_cb + j, n);
              V dch = dm * ldv(prm.cw + j, n);
              if (n < VL) { dch = V::set(zero, dch, n); chat = V::set(zero, chat, n); }
              a1 = a1 + dch; a2 = at::vec::fmadd(dch, chat, a2);
              stv(dch, dchat + j, n);
            } else {
              stv(dm, dchat + j, n);
            }
          }
          if (prm.cw) { s1 = hsum(a1) / T(H); s2 = hsum(a2) / T(H); }
        }
        // loop 1': dc -> i, f, g, c_prev
        for (int64_t j = 0; j < H; j += VL) {
          const int n = (int)std::min<int64_t>(VL, H - j);
          const V c = ldv(cr + j, n), cp = ldv(cpr + j, n);
          V dc = ldv(dcr + j, n);
          if (prm.cw) {
            const V chat = (c - V(cmean)) * V(crstd);
            dc = dc + V(crstd) * (ldv(dchat + j, n) - V(s1) - chat * V(s2));
          } else {
            dc = dc + ldv(dchat + j, n);
          }
          if (prm.po) dc = at::vec::fmadd(ldv(dxr + cf.oo + j, n), ldv(prm.po + j, n), dc);
          if (cf.clip) dc = V::blendv(zero, dc, c.abs() < V(prm.clipv));
          const V i = cf.has_i ? ldv(gr + cf.oi + j, n) : one;
          const V g = ldv(gr + cf.og + j, n);
          V f = one;
          if (cf.has_f) f = ldv(gr + cf.of + j, n);
          else if (cf.cifg) f = one - i;
          V dcp = dc * f;
          // g
          {
            V dg = dc * i;
            if (!cf.niaf) dg = dg * (one - g * g);
            stv(dg, dxr + cf.og + j, n);
          }
          const V df = dc * cp;
          if (cf.has_f) {
            V d = df;
            if (dsr) d = d + ldv(dsr + cf.sf + j, n);
            const V du = d * f * (one - f);
            stv(du, dxr + cf.of + j, n);
            if (dus) stv(du, dus + cf.sf + j, n);
            if (prm.pf) { dcp = at::vec::fmadd(du, ldv(prm.pf + j, n), dcp); stv(at::vec::fmadd(du, cp, ldv(A_pf + j, n)), A_pf + j, n); }
          }
          if (cf.has_i) {
            V d = dc * g;
            if (cf.cifg) d = d - df;
            if (dsr) d = d + ldv(dsr + cf.si + j, n);
            const V du = d * i * (one - i);
            stv(du, dxr + cf.oi + j, n);
            if (dus) stv(du, dus + cf.si + j, n);
            if (prm.pi) { dcp = at::vec::fmadd(du, ldv(prm.pi + j, n), dcp); stv(at::vec::fmadd(du, cp, ldv(A_pi + j, n)), A_pi + j, n); }
          }
          stv(dcp, dcr + j, n);
        }
        if (cf.ln) {
          // dz (in dxr) -> both LN backwards, per gate chunk:
          //   dr = rs (g_hh dz - mean(g_hh dz) - r_hat mean(g_hh dz r_hat))  -> GEMM input, chunk rows
          //   da = ra (g_ih dz - mean(g_ih dz) - a_hat mean(g_ih dz a_hat))  -> dXG (over dz)
          if (dZSp) std::copy(dus, dus + cf.nS * H, dZSp + tb * cf.nS * H);
          for (int64_t k = 0; k < cf.G; ++k) {
            T* dz = dxr + k * H;
            const T* ah = AHp + tb * R + k * H;
            const T* rh = RHp + tb * R + k * H;
            const T* gi = prm.glnih + k * H;
            const T* gh = prm.gln + k * H;
            T* aih = A_ih + k * H;
            T* ahh = A_hh + k * H;
            T* abi = A_bi + k * H;
            const T ra = ASp[tb * cf.G + k], rs = RSp[tb * cf.G + k];
            V sa1(T(0)), sa2(T(0)), sr1(T(0)), sr2(T(0));
            for (int64_t j = 0; j < H; j += VL) {  // tails: the loads zero-fill, so the sums stay exact
              const int n = (int)std::min<int64_t>(VL, H - j);
              const V d = ldv(dz + j, n), av = ldv(ah + j, n), rv = ldv(rh + j, n);
              stv(at::vec::fmadd(d, av, ldv(aih + j, n)), aih + j, n);
              stv(at::vec::fmadd(d, rv, ldv(ahh + j, n)), ahh + j, n);
              if (prm.biasp) stv(ldv(abi + j, n) + d, abi + j, n);
              const V dai = d * ldv(gi + j, n), drh = d * ldv(gh + j, n);
              sa1 = sa1 + dai; sa2 = at::vec::fmadd(dai, av, sa2);
              sr1 = sr1 + drh; sr2 = at::vec::fmadd(drh, rv, sr2);
            }
            const V ma1(hsum(sa1) / T(H)), ma2(hsum(sa2) / T(H)), mr1(hsum(sr1) / T(H)), mr2(hsum(sr2) / T(H));
            const V vra(ra), vrs(rs);
            T* dwk = dwr + k * H;
            for (int64_t j = 0; j < H; j += VL) {
              const int n = (int)std::min<int64_t>(VL, H - j);
              const V d = ldv(dz + j, n);
              const V dr = vrs * (d * ldv(gh + j, n) - mr1 - ldv(rh + j, n) * mr2);
              const V da = vra * (d * ldv(gi + j, n) - ma1 - ldv(ah + j, n) * ma2);
              stv(dr, dwk + j, n);
              stv(da, dz + j, n);
            }
          }
        } else {
          std::copy(dxr, dxr + R, dwr);
        }
      }
      bar.wait();
      GemmTask<T> tasks[2] = {phaseA[0], phaseA[1]};
      if (dRcp) tasks[0].A = dRcp + (t - t0) * B * ldr;  // layernorm: this step's chunk rows
      run_tasks<T>(tasks, nA, tid, nth);
      bar.wait();
    }
  });
    packed = true;
    if (cf.ln && t1 > t0) {  // dW_hh += dr_t^T h_{t-1} over this chunk (h_{-1} = h0, then y)
      at::Tensor d = dRc.narrow(0, 0, (t1 - t0) * B).narrow(1, 0, R);
      if (t0 == 0) {
        dWhh.addmm_(d.narrow(0, 0, B).t(), h0);
        if (t1 > 1) dWhh.addmm_(d.narrow(0, B, (t1 - 1) * B).t(), Y.narrow(0, 0, t1 - 1).reshape({-1, Hout}));
      } else {
        dWhh.addmm_(d.t(), Y.narrow(0, t0 - 1, t1 - t0).reshape({-1, Hout}));
      }
    }
    if (Tn == 0) break;
  }
  at::Tensor dh0 = at::empty({B, Hout}, opt);
  for (int64_t b = 0; b < B; ++b) {
    const T* src = len[b] > 0 ? dHp + b * Hout : dhnp + b * Hout;
    std::copy(src, src + Hout, dh0.data_ptr<T>() + b * Hout);
  }
  at::Tensor accs = acc.sum(0);
  auto e = [&] { return at::empty({0}, opt); };
  return {dXG, cf.ln ? dWhh : e(), P > 0 ? dHP : e(), P > 0 ? Mo : e(), dh0, lstm ? dcs : e(), accs,
          dZS.defined() ? dZS : e()};
}

static std::vector<int64_t> lengths_vec(const at::Tensor& lengths, int64_t B, int64_t Tn) {
  std::vector<int64_t> len(B, Tn);
  if (lengths.defined() && lengths.numel() > 0) {
    TORCH_CHECK(lengths.numel() == B, "lstmkit recurrence: lengths must have B entries");
    auto l = lengths.to(at::kLong).contiguous();
    const int64_t* lp = l.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) len[b] = std::max<int64_t>(0, std::min<int64_t>(lp[b], Tn));
  }
  return len;
}

// bfloat16 / float16 layers: parameters, inputs and outputs stay in their dtype; the recurrence
// computes in float32 (GEMM accumulation, gates, cell state) and keeps its buffers in float32.
static at::ScalarType compute_type(at::ScalarType t) {
  return (t == at::kBFloat16 || t == at::kHalf) ? at::kFloat : t;
}
static at::Tensor to_compute(const at::Tensor& t, at::ScalarType ct) {
  return (t.defined() && t.numel() > 0 && t.is_floating_point() && t.scalar_type() != ct) ? t.to(ct) : t;
}
static at::Tensor to_dtype(const at::Tensor& t, at::ScalarType dt) {
  return (t.defined() && t.numel() > 0 && t.scalar_type() != dt) ? t.to(dt) : t;
}
static std::vector<at::Tensor> to_compute(const std::vector<at::Tensor>& ts, at::ScalarType ct) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(to_compute(t, ct).contiguous());
  return out;
}

// lstmkit::recurrence (CPU): see lstmkit/kernels/ops.py for the schema and the contract.
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> recurrence_forward(
    const at::Tensor& xg_in, const at::Tensor& whh_in, const at::Tensor& h0_in, const at::Tensor& c0_in,
    const at::Tensor& lengths, const std::vector<at::Tensor>& params_in, int64_t flags, double clip, int64_t H,
    int64_t P, bool save) {
  Cfg cf(flags, clip, H, P);
  TORCH_CHECK((int64_t)params_in.size() == N_PARAMS, "lstmkit::recurrence: expected ", (int)N_PARAMS,
              " params, got ", params_in.size());
  TORCH_CHECK(xg_in.dim() == 3 && xg_in.size(2) == cf.R, "lstmkit::recurrence: xg must be (T, B, R=", cf.R, ")");
  const at::ScalarType io = xg_in.scalar_type(), ct = compute_type(io);
  const auto params = to_compute(params_in, ct);
  if (cf.ln) {
    TORCH_CHECK(params[P_LN_IH_WEIGHT].numel() == cf.R, "lstmkit::recurrence: layernorm needs ln_ih_weight (R=", cf.R, ")");
    TORCH_CHECK(params[P_BIAS].numel() == 0 || params[P_BIAS].numel() == cf.R,
                "lstmkit::recurrence: bias must be (R=", cf.R, ") or empty");
  }
  const at::Tensor xg = to_compute(xg_in, ct).contiguous(), whh = to_compute(whh_in, ct);
  const at::Tensor h0 = to_compute(h0_in, ct).contiguous();
  at::Tensor c0 = to_compute(c0_in, ct);
  const int64_t Tn = xg.size(0), B = xg.size(1);
  if (!cf.rnn && c0.numel() == 0) c0 = at::zeros({B, H}, xg.options());
  const auto len = lengths_vec(lengths, B, Tn);
  const int nt = choose_threads(B * cf.R * cf.Hout, B);
  const bool ln = cf.ln;
  auto param = [&](int k) { return (ln || (k != P_LN_IH_WEIGHT && k != P_BIAS)) ? params[k] : at::Tensor(); };
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(ct, "lstmkit_fwd", [&] {
    out = forward_impl<scalar_t>(xg, whh, h0, c0, len, params[P_PEEPHOLE_I], params[P_PEEPHOLE_F],
                                 params[P_PEEPHOLE_O], params[P_WEIGHT_GG], params[P_LN_HH_WEIGHT],
                                 params[P_LN_C_WEIGHT], params[P_LN_C_BIAS], params[P_WEIGHT_HR],
                                 param(P_LN_IH_WEIGHT), param(P_BIAS), cf, save, nt);
  });
  // out = {Y, h_n, c_n, G, C, RH, RS, AH, AS}
  std::vector<at::Tensor> buffers(N_BUFFERS);
  buffers[B_G] = out[3]; buffers[B_C] = out[4]; buffers[B_RH] = out[5];
  buffers[B_RS] = out[6]; buffers[B_AH] = out[7]; buffers[B_AS] = out[8];
  return {to_dtype(out[0], io), to_dtype(out[1], io), to_dtype(out[2], io), buffers};
}

// lstmkit::recurrence_backward (CPU). Empty dy / dh_n / dc_n mean zero.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> recurrence_backward(
    const at::Tensor& dy_in, const at::Tensor& dhn_in, const at::Tensor& dcn_in, const at::Tensor& y_in,
    const at::Tensor& h0_in, const at::Tensor& c0_in, const at::Tensor& whh_in, const at::Tensor& lengths,
    const std::vector<at::Tensor>& params_in, const std::vector<at::Tensor>& buffers, int64_t flags, double clip,
    int64_t H, int64_t P) {
  Cfg cf(flags, clip, H, P);
  TORCH_CHECK((int64_t)params_in.size() == N_PARAMS && (int64_t)buffers.size() == N_BUFFERS,
              "lstmkit::recurrence_backward: expected ", (int)N_PARAMS, " params and ", (int)N_BUFFERS, " buffers");
  const at::ScalarType io = y_in.scalar_type(), ct = compute_type(io);
  const auto params = to_compute(params_in, ct);
  const at::Tensor y = to_compute(y_in, ct).contiguous(), h0 = to_compute(h0_in, ct).contiguous();
  const at::Tensor whh = to_compute(whh_in, ct);
  const int64_t Tn = y.size(0), B = y.size(1), R = cf.R, Hout = cf.Hout;
  const bool lstm = !cf.rnn;
  const auto opt = y.options();
  at::Tensor c0 = to_compute(c0_in, ct);
  if (lstm && c0.numel() == 0) c0 = at::zeros({B, H}, opt);
  at::Tensor dy = dy_in.numel() ? to_compute(dy_in, ct) : at::zeros({1}, opt).expand({Tn, B, Hout});
  at::Tensor dhn = dhn_in.numel() ? to_compute(dhn_in, ct) : at::zeros({B, Hout}, opt);
  at::Tensor dcn = !lstm ? at::empty({0}, opt) : dcn_in.numel() ? to_compute(dcn_in, ct) : at::zeros({B, H}, opt);
  const auto len = lengths_vec(lengths, B, Tn);
  const int nt = choose_threads(B * R * Hout, B);
  auto param = [&](int k) { return (cf.ln || (k != P_LN_IH_WEIGHT && k != P_BIAS)) ? params[k] : at::empty({0}, opt); };
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(ct, "lstmkit_bwd", [&] {
    out = backward_impl<scalar_t>(buffers[B_G].contiguous(), buffers[B_C].contiguous(), y, h0, c0.contiguous(), whh,
                                  len, params[P_PEEPHOLE_I], params[P_PEEPHOLE_F], params[P_PEEPHOLE_O],
                                  params[P_WEIGHT_GG], params[P_LN_HH_WEIGHT], params[P_LN_C_WEIGHT],
                                  params[P_LN_C_BIAS], params[P_WEIGHT_HR], param(P_LN_IH_WEIGHT), param(P_BIAS),
                                  buffers[B_RH].contiguous(), buffers[B_RS].contiguous(), buffers[B_AH].contiguous(),
                                  buffers[B_AS].contiguous(), dy, dhn.contiguous(), dcn.contiguous(), cf, nt);
  });
  // out = {dXG, dWhh (layernorm), dHP, Mo, dh0, dc0, acc, dZS}
  const at::Tensor& dXG = out[0];
  at::Tensor dwhh;
  if (cf.ln) {  // accumulated in the kernel from the gradient w.r.t. r_t = h_{t-1} W_hh^T
    dwhh = out[1];
  } else {  // dW_hh = sum_t dxg_t^T h_{t-1}; h_{t-1} = h0 at t = 0, else y_{t-1} (0 on padded steps)
    dwhh = at::mm(dXG[0].t(), h0);
    if (Tn > 1) dwhh.addmm_(dXG.narrow(0, 1, Tn - 1).reshape({-1, R}).t(), y.narrow(0, 0, Tn - 1).reshape({-1, Hout}));
  }
  std::vector<at::Tensor> dparams(N_PARAMS);
  for (auto& d : dparams) d = at::empty({0}, opt);
  if (lstm) {
    const at::Tensor& acc = out[6];  // AccLayout, summed over threads
    const AccLayout al{H, R};
    if (cf.peep) {
      if (cf.has_i) dparams[P_PEEPHOLE_I] = acc.narrow(0, al.peephole(0), H).clone();
      if (cf.has_f) dparams[P_PEEPHOLE_F] = acc.narrow(0, al.peephole(1), H).clone();
      if (cf.has_o) dparams[P_PEEPHOLE_O] = acc.narrow(0, al.peephole(2), H).clone();
    }
    if (cf.ln) {
      dparams[P_LN_C_WEIGHT] = acc.narrow(0, al.ln_c_weight(), H).clone();
      dparams[P_LN_C_BIAS] = acc.narrow(0, al.ln_c_bias(), H).clone();
      dparams[P_LN_HH_WEIGHT] = acc.narrow(0, al.ln_hh_weight(), R).clone();
      dparams[P_LN_IH_WEIGHT] = acc.narrow(0, al.ln_ih_weight(), R).clone();
      if (params[P_BIAS].numel()) dparams[P_BIAS] = acc.narrow(0, al.bias(), R).clone();
    }
    if (P > 0) dparams[P_WEIGHT_HR] = at::mm(out[2].reshape({-1, P}).t(), out[3].reshape({-1, H}));
    if (cf.fgr) {  // dW_gg = sum_t du_S,t^T s_{t-1}, the sigmoid gates i, f, o in order
      const int64_t nS = cf.nS * H;
      if (Tn > 1) {
        std::vector<int64_t> cols;
        for (int64_t c : {cf.oi, cf.of, cf.oo}) if (c >= 0) cols.push_back(c);
        auto gather = [&](const at::Tensor& t, int64_t t0) {  // (T-1, B, nS) from column blocks of t
          std::vector<at::Tensor> parts;
          for (int64_t c : cols) parts.push_back(t.narrow(0, t0, Tn - 1).narrow(2, c, H));
          return at::cat(parts, -1).reshape({-1, nS});
        };
        const at::Tensor dus = cf.ln ? out[7].narrow(0, 1, Tn - 1).reshape({-1, nS}) : gather(dXG, 1);
        dparams[P_WEIGHT_GG] = at::mm(dus.t(), gather(buffers[B_G], 0));
      } else {
        dparams[P_WEIGHT_GG] = at::zeros({nS, nS}, opt);
      }
    }
  }
  for (int k = 0; k < N_PARAMS; ++k) dparams[k] = to_dtype(dparams[k], params_in[k].scalar_type());
  at::Tensor dc0 = lstm ? to_dtype(out[5], c0_in.numel() ? c0_in.scalar_type() : io) : at::empty({0}, y_in.options());
  return {to_dtype(dXG, io), to_dtype(dwhh, whh_in.scalar_type()), to_dtype(out[4], h0_in.scalar_type()), dc0,
          dparams};
}

// The ABI this extension was compiled with (a test compares it with lstmkit/kernels/abi.py).
py::dict compiled_abi() {
  py::dict d;
  py::list flags, params, buffers;
  for (const char* n : FLAG_NAMES) flags.append(n);
  for (const char* n : PARAM_NAMES) params.append(n);
  for (const char* n : BUFFER_NAMES) buffers.append(n);
  d["flags"] = flags; d["params"] = params; d["buffers"] = buffers;
  d["flag_bits"] = py::make_tuple(F_RNN, F_RELU, F_NIG, F_NFG, F_NOG, F_CIFG, F_PEEPHOLE, F_FGR, F_LAYERNORM,
                                  F_NIAF, F_NOAF, F_CLIP);
  d["gemm_tile"] = py::make_tuple(Packed<float>::MR, Packed<float>::NV * Packed<float>::VL);
  return d;
}

// test hook: the vectorised activations on a contiguous tensor (0 exp, 1 tanh, 2 sigmoid)
at::Tensor act_test(at::Tensor x, int64_t which) {
  x = x.contiguous();
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstmkit_act", [&] {
    using V = Vectorized<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t n = x.numel();
    for (int64_t j = 0; j < n; j += V::size()) {
      const int c = (int)std::min<int64_t>(V::size(), n - j);
      V v = ldv(xp + j, c);
      V r = which == 0 ? vexp<scalar_t>(v) : which == 1 ? vtanh<scalar_t>(v) : sigm<scalar_t>(v);
      stv(r, yp + j, c);
    }
  });
  return y;
}

}  // namespace lk

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Pure C++ on at::Tensors: the GIL is released, so other Python threads (data loading,
  // a second direction or model) run while the recurrence does.
  m.def("forward", &lk::recurrence_forward, "lstmkit::recurrence on the CPU",
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", &lk::recurrence_backward, "lstmkit::recurrence_backward on the CPU",
        py::call_guard<py::gil_scoped_release>());
  m.def("abi", &lk::compiled_abi, "the variant ABI compiled in (flags, parameter and buffer order)");
  m.def("_act_test", &lk::act_test, "test hook: vectorised exp/tanh/sigmoid");
}
