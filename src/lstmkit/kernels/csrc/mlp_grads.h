// The deep gates' weight gradients in the backward: dW_j = Σ dv_jᵀ a_j, db_j = Σ dv_j, summed chunk
// by chunk of steps while the chunk's dV rows are in cache (backward_impl).
#pragma once
#include <torch/extension.h>
#include <algorithm>
#include <vector>
#include "cell_config.h"
#include "gemm.h"
#include "vec_math.h"

namespace lk {

// Over one chunk's rows (t0·B .. t1·B) each product is added to the sums so far, written into its
// slot of the flat gradient (mlp.wtot,): every element is some W_j's or b_j's; into dmlp_out where
// that is defined, with `add` added to its values. With BLAS (blas_gemm) the products are on the
// rows in place, inside the parallel region while the chunk is in cache (in_region, columns): each
// thread the columns c0..c1 of every W_j and b_j (BLAS runs on one thread there; no fork and join
// of its own per product, no K split) — no per-gate views, copies or zero fill, which at one step
// per call cost more than the products. Without BLAS symbols in this torch: its operators, after
// the region (after_chunk).
template <typename T>
struct MlpGradSums {
  const MlpLayout& mlp;
  int64_t B, Tc;           // rows per step; steps per chunk
  const at::Tensor& dV;    // (Tc, B, ldV): the chunk's dL/dv rows, step t's at (t − t0)·B
  int64_t ldV;
  const at::Tensor& acts;  // (T, B, atot): every layer's input a_j, kept by the forward (B_MLP)
  at::Tensor sums;         // (mlp.wtot,) the flat gradient
  bool written;            // whether sums holds a sum yet (else the next chunk writes it)
  bool in_region;          // BLAS: columns() in the parallel region
  std::vector<T> ones;     // (Tc·B,) db_j = dv_jᵀ 1

  MlpGradSums(const MlpLayout& mlp_, int64_t B_, int64_t Tc_, const at::Tensor& dV_, int64_t ldV_,
              const at::Tensor& acts_, const at::Tensor& dmlp_out, bool add, const at::TensorOptions& opt)
      : mlp(mlp_), B(B_), Tc(Tc_), dV(dV_), ldV(ldV_), acts(acts_) {
    sums = mlp.any() ? (dmlp_out.defined() ? dmlp_out : at::empty({mlp.wtot}, opt)) : at::Tensor();
    written = add && dmlp_out.defined();  // (add without dmlp_out: a fresh sum all the same)
    in_region = mlp.any() && blas_available<T>();
    ones.assign(mlp.bias && in_region ? Tc * B : 0, T(1));
  }

  // BLAS, thread tid of nth: its columns of every product over the chunk t0..t1 (the whole
  // chunk's dV rows complete). Every thread reads `written` as it was before the chunk.
  void columns(int64_t t0, int64_t t1, int tid, int nth) const {
    constexpr int VL = Vectorized<T>::size();
    const int N = (int)((t1 - t0) * B);  // rows: dv (N, vtot) with row stride ldV, a (N, atot), row-major
    if (N == 0) return;
    T* dm = sums.data_ptr<T>();
    const T* dv = dV.data_ptr<T>();
    const T* act = acts.data_ptr<T>() + t0 * B * mlp.atot;
    for (const MlpGate& mg : mlp.gates)
      for (int j = 0; j < mg.m; ++j) {
        const int64_t n_out = mg.w[j + 1], n_in = mg.w[j];
        int64_t c0, c1;  // this thread's columns, whole vectors
        split_range((n_out + VL - 1) / VL, tid, nth, c0, c1);
        c0 *= VL;
        c1 = std::min(c1 * VL, n_out);
        if (c1 <= c0) continue;
        // row-major (n_out, n_in) dW_j: column-major dW_jᵀ = a_jᵀ dv_j, its columns c0..c1
        blas_gemm<T>('N', 'T', (int)n_in, (int)(c1 - c0), N, act + mg.aoff[j], (int)mlp.atot, dv + mg.voff[j] + c0,
                     (int)ldV, written, dm + mg.woff[j] + c0 * n_in, (int)n_in);
        if (mg.boff[j] >= 0)
          blas_gemm<T>('N', 'N', (int)(c1 - c0), 1, N, dv + mg.voff[j] + c0, (int)ldV, ones.data(), N, written,
                       dm + mg.boff[j] + c0, (int)(c1 - c0));
      }
  }

  // After the parallel region of chunk t0..t1: without BLAS, the products by torch's operators.
  void after_chunk(int64_t t0, int64_t t1) {
    if (!mlp.any() || t1 <= t0 || B == 0) return;  // (no rows, B = 0: nothing written; zeroed by result)
    if (!in_region) {
      const int64_t N = (t1 - t0) * B, Tn = acts.size(0);
      for (const MlpGate& mg : mlp.gates)
        for (int j = 0; j < mg.m; ++j) {
          const int64_t n_out = mg.w[j + 1], n_in = mg.w[j];
          const at::Tensor dvj = dV.view({Tc * B, ldV}).narrow(0, 0, N).narrow(1, mg.voff[j], n_out);
          at::Tensor dw_slot = sums.narrow(0, mg.woff[j], n_out * n_in).view({n_out, n_in});
          const at::Tensor aj = acts.view({Tn * B, mlp.atot}).narrow(0, t0 * B, N).narrow(1, mg.aoff[j], n_in);
          if (written) dw_slot.addmm_(dvj.t(), aj);
          else at::mm_out(dw_slot, dvj.t(), aj);
          if (mg.boff[j] >= 0) {
            at::Tensor db_slot = sums.narrow(0, mg.boff[j], n_out);
            if (written) db_slot.add_(dvj.sum(0));
            else at::sum_out(db_slot, dvj, 0);
          }
        }
    }
    written = true;
  }

  // The flat gradient (zero where no step ran: every sum empty); undefined without deep gates.
  at::Tensor result() {
    if (mlp.any() && !written) sums.zero_();
    return sums;
  }
};

}  // namespace lk
