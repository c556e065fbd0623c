"""Fit the fused kernel's float tanh: tanh(x) ≈ x P(x²) / Q(x²) on [-9, 9], clamped beyond.

    python tools/fit_tanh.py        # prints the coefficients for csrc/vec_math.h and their error

P has degree 6 and Q degree 3 in x² (Q(0) = 1). The fit minimises the maximum relative error
in float64 by Lawson's iteratively reweighted least squares on the linearised problem
f Q - P = 0 (f = tanh(x) / x, in the scaled variable s = x² / 81 for conditioning). Its float64
error is ~7e-9; the kernel's float32 evaluation (Horner with FMA, one division) then adds the
rounding of ~10 operations, measured here by emulating each rounding: ~2.8e-7 at most, worst
where tanh is near ±1. Beyond |x| = 9, tanh(x) rounds to ±1 in float32.
"""

from __future__ import annotations

import numpy as np

CLAMP = 9.0
N_P, N_Q = 7, 3  # coefficients of P (t^0..t^6) and of Q beyond its constant 1 (t^1..t^3)


def fit(rounds: int = 150) -> tuple[list[float], list[float], float]:
    """Return (P, Q, max relative error in float64); P[k], Q[k] multiply (x²)^k."""
    scale = CLAMP * CLAMP
    x = np.sort(np.concatenate([np.linspace(0, CLAMP, 60001)[1:], np.geomspace(1e-5, 1e-2, 500)]))
    s = x * x / scale
    f = np.tanh(x) / x

    def ratio(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = sum(c[k] * s**k for k in range(N_P))
        q = 1 + sum(c[N_P + k] * s ** (k + 1) for k in range(N_Q))
        return p / q, q

    a = np.concatenate([-np.stack([s**k for k in range(N_P)], 1),
                        np.stack([f * s ** (k + 1) for k in range(N_Q)], 1)], 1)
    w = np.ones_like(x)
    q_prev = np.ones_like(s)
    best_err, best = np.inf, None
    for it in range(rounds):
        rw = np.sqrt(w) / (q_prev * f)  # relative error of the linearised residual
        c, *_ = np.linalg.lstsq(a * rw[:, None], -f * rw, rcond=None)
        approx, q_prev = ratio(c)
        err = np.abs(approx / f - 1)
        if err.max() < best_err:
            best_err, best = err.max(), c.copy()
        if it >= 10:  # Lawson: weight the points by their error, towards equal ripples
            w = w * err
            w /= w.sum()
    p = [float(best[k] / scale**k) for k in range(N_P)]
    q = [1.0] + [float(best[N_P + k] / scale ** (k + 1)) for k in range(N_Q)]
    return p, q, float(best_err)


def float32_error(p: list[float], q: list[float]) -> tuple[float, float]:
    """Max relative error of the kernel's float32 evaluation over [-12, 12], and where."""
    f32 = np.float32
    xs = f32(np.linspace(-12, 12, 1200001))
    xc = np.clip(xs, f32(-CLAMP), f32(CLAMP))
    x2 = f32(xc * xc)
    pv = f32(p[-1])
    for k in range(len(p) - 2, -1, -1):  # an FMA: one rounding per step
        pv = f32(np.float64(pv) * x2 + np.float64(f32(p[k])))
    pv = f32(pv * xc)
    qv = f32(q[-1])
    for k in range(len(q) - 2, -1, -1):
        qv = f32(np.float64(qv) * x2 + np.float64(f32(q[k])))
    want = np.tanh(xs.astype(np.float64))
    rel = np.abs(f32(pv / qv) - want) / np.maximum(np.abs(want), 1e-30)
    return float(rel.max()), float(xs[rel.argmax()])


def main() -> None:
    p, q, err = fit()
    err32, where = float32_error(p, q)
    fmt = ", ".join
    print(f"constexpr float TANH_P[] = {{{fmt(f'{v:.9e}f' for v in reversed(p))}}};  // highest first")
    print(f"constexpr float TANH_Q[] = {{{fmt(f'{v:.9e}f' for v in reversed(q))}}};")
    print(f"max relative error: float64 {err:.2e}; float32 evaluation {err32:.2e} (at x = {where:.4f})")


if __name__ == "__main__":
    main()
