"""The gradient noise scale ``B_simple = tr(Σ) / |G|²`` from two gradient estimates of different batch sizes.

McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training" (2018), appendix A.1: for a
gradient estimated from ``B`` i.i.d. samples, ``E|G_B|² = |G|² + tr(Σ)/B``. Two estimates at the same
parameters, of sizes ``B_small < B_big``, give unbiased estimates of both terms::

    |G|²  ≈ (B_big |G_big|² − B_small |G_small|²) / (B_big − B_small)
    tr Σ  ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

Each single estimate is very noisy (|G|² is often negative early on), so we keep separate moving averages of
the two and divide the averages: the ratio of noisy estimates is biased, the ratio of averages is not (to first
order). ``B_simple`` approximates the critical batch size: below it, steps are dominated by gradient noise.

Where the two estimates come from is up to the caller (no Lightning here):
  * a batch split: the gradient of half of a batch (``B_small = B/2``) and of the whole batch (``B_big = B``);
  * gradient accumulation: one micro-batch gradient (``B_small``) and the accumulated one (``B_big = k·B_small``);
  * DDP: a rank's local gradient (``B_small`` = per-rank batch, ``|G_small|²`` averaged over ranks) and the
    all-reduced gradient (``B_big`` = global batch). Combining: a local half batch vs the global gradient works too.
The squared norms must be of *mean* (not summed) per-sample losses, as ``|G_B|²`` is assumed to shrink with ``B``.
"""

from __future__ import annotations

import math
from typing import Dict, Optional


def two_batch_estimates(small_sq_norm: float, big_sq_norm: float, b_small: float, b_big: float) -> Dict[str, float]:
    """Unbiased single-sample estimates of ``|G|²`` and ``tr(Σ)`` (McCandlish et al. 2018, eq. A.2–A.3)."""
    if not b_big > b_small > 0:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    gradient_sq = (b_big * big_sq_norm - b_small * small_sq_norm) / (b_big - b_small)
    trace_cov = (small_sq_norm - big_sq_norm) / (1.0 / b_small - 1.0 / b_big)
    return {"gradient_sq": float(gradient_sq), "trace_cov": float(trace_cov)}


class GradientNoiseScale:
    """Streaming ``B_simple`` estimator: ``update`` with two squared gradient norms, ``compute`` the ratio of averages.

    Args:
        beta: EMA decay of the two averaged terms (bias-corrected like Adam's moments); ``None`` keeps the
            plain arithmetic mean of all updates, with the standard error of the ``|G|²`` mean and a conservative
            ``noise_scale_lower`` (used for judging a fixed window, and in tests against brute force).

    Example::

        gns = GradientNoiseScale(beta=0.9)
        gns.update(small_sq_norm=0.8, big_sq_norm=0.5, b_small=32, b_big=64)
        gns.compute()["noise_scale"]
    """

    def __init__(self, beta: Optional[float] = 0.9) -> None:
        if beta is not None and not 0.0 <= beta < 1.0:
            raise ValueError(f"`beta` must be in [0, 1) or None, got {beta!r}.")
        self.beta = beta
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self._gradient_sq = 0.0
        self._trace_cov = 0.0
        self._weight = 0.0  # EMA normalizer (bias correction)
        self.last_b_small = 0.0
        self.last_b_big = 0.0
        self._m2_gradient_sq = 0.0  # Welford sum of squared deviations (arithmetic-mean mode only)

    def update(self, small_sq_norm: float, big_sq_norm: float, b_small: float, b_big: float) -> None:
        est = two_batch_estimates(small_sq_norm, big_sq_norm, b_small, b_big)
        if not (math.isfinite(est["gradient_sq"]) and math.isfinite(est["trace_cov"])):
            return  # an overflowed (AMP) or diverged step says nothing about the noise
        self.count += 1
        self.last_b_small, self.last_b_big = float(b_small), float(b_big)
        if self.beta is None:
            w = 1.0 / self.count
            delta = est["gradient_sq"] - self._gradient_sq
            self._gradient_sq += w * delta
            self._m2_gradient_sq += delta * (est["gradient_sq"] - self._gradient_sq)
            self._trace_cov += w * (est["trace_cov"] - self._trace_cov)
            self._weight = 1.0
        else:
            self._gradient_sq = self.beta * self._gradient_sq + (1 - self.beta) * est["gradient_sq"]
            self._trace_cov = self.beta * self._trace_cov + (1 - self.beta) * est["trace_cov"]
            self._weight = self.beta * self._weight + (1 - self.beta)

    def compute(self) -> Dict[str, float]:
        """``gradient_sq`` (|G|²), ``trace_cov`` (tr Σ) and ``noise_scale`` (B_simple; inf when |G|² ≤ 0)."""
        if self.count == 0 or self._weight <= 0:
            return {"gradient_sq": float("nan"), "trace_cov": float("nan"), "noise_scale": float("nan")}
        g = self._gradient_sq / self._weight
        t = self._trace_cov / self._weight
        if g > 0:
            scale = t / g
        else:  # the noise swamps the signal entirely: B_simple is beyond what we can resolve
            scale = float("inf") if t > 0 else float("nan")
        out = {"gradient_sq": g, "trace_cov": t, "noise_scale": scale}
        if self.beta is None and self.count >= 2:
            # A conservative B_simple: |G|² raised by two standard errors of its mean (the |G|² estimates are the
            # noisy ones when the batch is small; a mean near zero would otherwise make B_simple arbitrarily large).
            stderr = math.sqrt(self._m2_gradient_sq / (self.count - 1) / self.count)
            out["gradient_sq_stderr"] = stderr
            upper = g + 2 * stderr
            out["noise_scale_lower"] = t / upper if upper > 0 and t > 0 else float("nan")
        return out

    def state_dict(self) -> Dict[str, float]:
        return {"count": self.count, "gradient_sq": self._gradient_sq, "trace_cov": self._trace_cov,
                "weight": self._weight, "last_b_small": self.last_b_small, "last_b_big": self.last_b_big,
                "m2_gradient_sq": self._m2_gradient_sq}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.count = int(state.get("count", 0))
        self._gradient_sq = float(state.get("gradient_sq", 0.0))
        self._trace_cov = float(state.get("trace_cov", 0.0))
        self._weight = float(state.get("weight", 0.0))
        self.last_b_small = float(state.get("last_b_small", 0.0))
        self.last_b_big = float(state.get("last_b_big", 0.0))
        self._m2_gradient_sq = float(state.get("m2_gradient_sq", 0.0))
