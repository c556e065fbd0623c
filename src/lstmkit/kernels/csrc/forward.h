// forward_impl: the forward of one layer-direction (see recurrence.cpp for the phases and
// what is saved for backward).
#pragma once
#include <torch/extension.h>
#include <algorithm>
#include <vector>
#include "cell_config.h"
#include "gemm.h"
#include "parallel.h"
#include "vec_math.h"

namespace lk {

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

}  // namespace lk
