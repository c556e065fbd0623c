// backward_impl: BPTT of one layer-direction (see recurrence.cpp for the phases).
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

}  // namespace lk
