// The checks a prepared step makes on every call, one call each from Python: no NaN or
// infinity in its tensors (first_nonfinite), plain eager CPU code (step_ready).
#pragma once
#include <torch/extension.h>
#include <ATen/SavedTensorHooks.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>
#include "vec_math.h"

namespace lk {

// The index of the first tensor that holds a NaN or an infinity (-1: none): the finite checks of
// a call's input and state in one call (lstmkit/nn.py), floating CPU tensors of any layout.
// v - v is 0 for a finite v and NaN otherwise; the lanes' sums stay 0 until one is not.
template <typename scalar_t>
inline bool all_finite(const scalar_t* p, int64_t n) {
  bool bad = false;
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    using V = Vectorized<scalar_t>;
    constexpr int64_t W = V::size();
    V acc0(scalar_t(0)), acc1(scalar_t(0)), acc2(scalar_t(0)), acc3(scalar_t(0));  // v - v: 0, or NaN
    int64_t j = 0;                                                              // for a NaN or inf
    for (; j + 4 * W <= n; j += 4 * W) {  // four chains: the adds' latency, not one chain, bounds it
      const V v0 = V::loadu(p + j), v1 = V::loadu(p + j + W), v2 = V::loadu(p + j + 2 * W),
              v3 = V::loadu(p + j + 3 * W);
      acc0 = acc0 + (v0 - v0); acc1 = acc1 + (v1 - v1); acc2 = acc2 + (v2 - v2); acc3 = acc3 + (v3 - v3);
    }
    for (; j + W <= n; j += W) {
      const V v = V::loadu(p + j);
      acc0 = acc0 + (v - v);
    }
    const V acc = (acc0 + acc1) + (acc2 + acc3);
    scalar_t lanes[V::size()];
    acc.store(lanes);
    for (int k = 0; k < V::size(); ++k) bad = bad || !std::isfinite(lanes[k]);
    for (; j < n; ++j) bad = bad || !std::isfinite(p[j]);
  } else {  // bfloat16 / float16: non-finite iff every exponent bit is set (a loop that vectorises)
    constexpr uint16_t e = std::is_same_v<scalar_t, at::BFloat16> ? 0x7F80 : 0x7C00;
    const uint16_t* u = reinterpret_cast<const uint16_t*>(p);
    for (int64_t j0 = 0; j0 < n && !bad; j0 += 4096) {
      uint16_t any = 0;
      const int64_t j1 = std::min<int64_t>(n, j0 + 4096);
      for (int64_t j = j0; j < j1; ++j) any |= (uint16_t)(((u[j] & e) == e) ? 1 : 0);
      bad = any != 0;
    }
  }
  return !bad;
}

inline int64_t first_nonfinite(const std::vector<at::Tensor>& tensors) {
  // a large tensor is split among torch's threads: reading it from memory, not the adds, bounds the
  // check, and each core brings its own share of the bandwidth (one thread below the grain)
  constexpr int64_t kGrain = 1 << 17;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor t = tensors[i].contiguous();
    const int64_t n = t.numel();
    std::atomic<bool> bad{false};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "lstmkit_finite", [&] {
      const scalar_t* p = t.data_ptr<scalar_t>();
      if (n <= kGrain) {  // a step's input and state: no thread pool to ask
        if (!all_finite(p, n)) bad.store(true, std::memory_order_relaxed);
        return;
      }
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        if (!all_finite(p + begin, end - begin)) bad.store(true, std::memory_order_relaxed);
      });
    });
    if (bad.load()) return (int64_t)i;
  }
  return -1;
}

// A prepared step's checks in one call (lstmkit/kernels/fused.py, PreparedStep.run): true when
// this thread runs plain eager CPU code — no autocast on the CPU, no functorch transform, no
// TorchScript trace (torch.is_autocast_enabled("cpu"), torch._C._functorch.peek_interpreter_stack(),
// torch.jit.is_tracing(): each would make the operator road behave otherwise), no default hooks on
// saved tensors (torch.autograd.graph.saved_tensors_hooks: non-reentrant checkpointing compares
// what the forward and its recomputation save, so both must take the general road, whichever
// signatures are kept by then) — and, with check_finite, no NaN or inf in `tensors`
// (first_nonfinite). Dynamo's tracing is Python's to see.
// A functorch transform is active exactly while its front dispatch key is in this thread's
// included set (functorch adds it with the first interpreter it pushes, removes it with the last).
inline bool step_ready(const std::vector<at::Tensor>& tensors, bool check_finite) {
  if (at::autocast::is_autocast_enabled(at::kCPU) ||
      c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
      torch::jit::tracer::isTracing() || !at::SavedTensorDefaultHooks::get_tls_state().stack.empty() ||
      c10::impl::TorchDispatchModeTLS::any_modes_set())  // a Python dispatch mode: the operator, which it sees
    return false;
  return !check_finite || first_nonfinite(tensors) == -1;
}

}  // namespace lk
