"""Fits the rational tanh of the CPU kernels' softcap (csrc/cpu/tanh_fit.h): tanh(x) ~ x P(x^2) / Q(x^2),
P and Q of degree 4 in x^2, Q(0) = 1, on [0, 9] (tanh is odd, and rounds to 1 in float32 beyond 9).
Linearised least squares (P - tanh Q = 0, weighted by 1/|Q|), reweighted by the error (Lawson) towards
the minimax fit; prints the coefficients and the largest error of the float32 Horner evaluation.

    python tools/fit_tanh.py
"""

from __future__ import annotations

import numpy as np

DEGREE, LIMIT = 4, 9.0


def fit():
    xs = np.concatenate([np.linspace(0, LIMIT, 30000)[1:], np.geomspace(1e-5, 1, 3000)])
    t, x2 = np.tanh(xs), xs**2
    powers = np.arange(DEGREE + 1)
    lawson = np.ones_like(xs)
    for _ in range(60):
        q_abs = np.ones_like(xs)
        for _ in range(4):
            a = np.concatenate(
                [xs[:, None] * x2[:, None] ** powers, -t[:, None] * x2[:, None] ** powers[1:]], 1
            )
            w = lawson / q_abs
            c, *_ = np.linalg.lstsq(a * w[:, None], t * w, rcond=None)
            p, q = c[: DEGREE + 1], np.concatenate([[1.0], c[DEGREE + 1 :]])
            q_abs = np.abs(np.polyval(q[::-1], x2))
        err = np.abs(xs * np.polyval(p[::-1], x2) / np.polyval(q[::-1], x2) - t)
        lawson = lawson * np.sqrt(err / err.max() + 1e-3)
        lawson /= lawson.mean()
    return p, q


def float32_error(p, q) -> float:
    x = np.linspace(0, LIMIT, 400001).astype(np.float32)
    x2 = x * x
    pv, qv = np.float32(p[-1]), np.float32(q[-1])
    for i in range(DEGREE - 1, -1, -1):
        pv, qv = pv * x2 + np.float32(p[i]), qv * x2 + np.float32(q[i])
    return float(np.abs((x * pv / qv).astype(np.float64) - np.tanh(x.astype(np.float64))).max())


if __name__ == "__main__":
    p, q = fit()
    print("kTanhP =", ", ".join(f"{v:.10e}f" for v in p))
    print("kTanhQ =", ", ".join(f"{v:.10e}f" for v in q))
    print(f"largest |error| of the float32 evaluation on [0, {LIMIT}]: {float32_error(p, q):.2e}")
