"""Fits the exp of the CPU kernels' softmax (csrc/cpu/exp2_fit.h): 2^f ~ P(f) on [-1/2, 1/2], P of degree 6
(exp(x) = 2^n 2^f with n = round(x log2(e)), the kernels' exp8 and exp16). Least squares on Chebyshev
nodes, weighted by the relative error and reweighted by it (Lawson) towards the minimax fit; prints the
coefficients, the fit's relative error and the largest relative error of the float32 Horner evaluation
(with fused multiply-adds, as the kernels evaluate it).

    python tools/fit_exp2.py
"""

from __future__ import annotations

import numpy as np

DEGREE, HALF = 6, 0.5


def fit() -> np.ndarray:
    f = HALF * np.cos(np.pi * (np.arange(4000) + 0.5) / 4000)
    y = 2.0**f
    powers = f[:, None] ** np.arange(DEGREE + 1)
    lawson = np.ones_like(f)
    for _ in range(200):
        w = np.sqrt(lawson) / y
        c, *_ = np.linalg.lstsq(powers * w[:, None], y * w, rcond=None)
        err = np.abs(powers @ c - y) / y
        lawson = lawson * err
        lawson /= lawson.sum()
    return c


def float32_error(c: np.ndarray) -> float:
    f = np.linspace(-HALF, HALF, 400001).astype(np.float32)
    c32 = c.astype(np.float32)
    p = np.full_like(f, c32[-1]).astype(np.float64)
    for coef in c32[-2::-1]:  # a fused multiply-add rounds once: the product is exact in float64
        p = (p * f.astype(np.float64) + np.float64(coef)).astype(np.float32).astype(np.float64)
    exact = 2.0 ** f.astype(np.float64)
    return float((np.abs(p - exact) / exact).max())


if __name__ == "__main__":
    c = fit()
    f = np.linspace(-HALF, HALF, 100001)
    fit_error = np.abs(np.polyval(c[::-1], f) - 2.0**f) / 2.0**f
    print("kExp2 =", ", ".join(f"{v:.10e}f" for v in c))
    print(f"largest relative error of the fit: {fit_error.max():.2e}")
    print(f"largest relative error of the float32 evaluation on [-{HALF}, {HALF}]: {float32_error(c):.2e}")
