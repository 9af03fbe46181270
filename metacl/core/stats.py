"""Small statistics shared by every report: Student-t confidence intervals, without scipy."""

from __future__ import annotations

import math


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of its Student-t confidence interval (nan for fewer than 2 values)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = float(sum(values) / n)
    if n < 2:
        return mean, math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile(confidence, n - 1) * std / math.sqrt(n)


def t_quantile(confidence: float, df: int) -> float:
    """t such that P(|T| < t) = confidence for Student's t with integer `df` degrees of freedom."""
    low, high = 0.0, 1.0
    while _t_central(high, df) < confidence:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_central(mid, df) < confidence else (low, mid)
    return (low + high) / 2


def _t_central(t: float, df: int) -> float:
    """P(|T| < t), exact for integer df (Abramowitz & Stegun 26.7.3)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:
        total, term = 0.0, math.cos(theta)
        for k in range(1, (df - 1) // 2 + 1):  # cos θ (1 + 2/3 cos²θ + 2·4/(3·5) cos⁴θ + ...)
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return (2 / math.pi) * (theta + s * total) if df > 1 else 2 * theta / math.pi
    total, term = 0.0, 1.0
    for k in range(1, df // 2 + 1):  # 1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + ...
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return s * total
