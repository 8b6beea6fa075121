"""Online estimators behind the cost model's calibration (:mod:`router.calibration`).

Every measured quantity the router's cost model needs is an affine function of
one size, fit online from the measurements the router observes::

    prefill seconds   = overhead + s_per_token · tokens      (per role, per node)
    transfer seconds  = latency  + bytes / bandwidth          (one link estimate)
    decode step       = base     + s_per_seq · batch_size     (per decode node)

Fitting method (:class:`AffineEstimate`): exponentially weighted ridge
regression toward the prior line ``(a0, b0)``: it minimises ::

    Σ_i w_i (y_i - a - b·x_i)²  +  P (a - a0)²  +  (P / 100) · x_ref² · (b - b0)²

Each observation first multiplies the earlier ones' weights ``w_i`` by
``decay`` (per observation, not per second: no clocks), so the data's total
weight saturates at ``1 / (1 - decay)`` (20 for 0.95) and old rates fade as
load or hardware changes. The prior terms never decay, so the 2×2 normal
equations are never singular and the model is sensible before any
measurement. The slope's prior is 100× weaker than the intercept's: when all
measurements have similar sizes (only one of ``a``, ``b`` is identifiable), a
surprise at sizes near ``x_ref`` or above moves the rate and keeps the fixed
overhead, while a surprise on tiny sizes (``x < x_ref / 10``) moves the
overhead. Measurements spread over sizes determine both. Fits are clamped to a
non-negative intercept and a positive slope, so every prediction is positive
and finite.

Also here: the input checks (:func:`check_measure`, :func:`check_count`)
shared by the router's dataclasses.
"""

from __future__ import annotations

import math

PREFILL_X_REF = 1024.0  # tokens
LINK_X_REF = float(64 << 20)  # bytes
DECODE_X_REF = 16.0  # sequences in the batch
SLOPE_PRIOR_SHARE = 0.01  # slope prior weight relative to the intercept's


def check_measure(name: str, value, minimum: float = 0.0) -> float:
    """Return ``value`` as a float, or raise ValueError unless finite and >= minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be finite and >= {minimum}, got {value!r}")
    return float(value)


def check_count(name: str, value, minimum: int = 0) -> int:
    """Return ``value``, or raise ValueError unless it is an integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class AffineEstimate:
    """Online fit of ``y ≈ intercept + slope · x`` (see the module docstring)."""

    def __init__(self, intercept: float, slope: float, x_ref: float,
                 prior_weight: float = 1.0, decay: float = 0.95, min_slope: float | None = None) -> None:
        self._a0, self._b0, self._x_ref = intercept, slope, x_ref
        self._pa = prior_weight
        self._pb = prior_weight * SLOPE_PRIOR_SHARE * x_ref * x_ref
        self._decay = decay
        self._min_slope = slope * 1e-3 if min_slope is None else min_slope
        self._data = [0.0] * 5  # decayed sums of w, w·x, w·y, w·x², w·x·y
        self.count = 0
        self.intercept, self.slope = intercept, slope

    def observe(self, x: float, y: float) -> None:
        """Add one measurement: size ``x`` took ``y`` seconds."""
        self._data = [s * self._decay for s in self._data]
        for i, term in enumerate((1.0, x, y, x * x, x * y)):
            self._data[i] += term
        self.count += 1
        self._solve()

    def _solve(self) -> None:
        w, wx, wy, wxx, wxy = self._data
        # Normal equations [[m00, m01], [m01, m11]] · (a, b) = (r0, r1).
        m00, m01, m11 = w + self._pa, wx, wxx + self._pb
        r0, r1 = wy + self._pa * self._a0, wxy + self._pb * self._b0
        slope = max((m00 * r1 - m01 * r0) / (m00 * m11 - m01 * m01), self._min_slope)
        intercept = (r0 - m01 * slope) / m00
        if intercept < 0.0:  # refit the slope with the intercept pinned at 0
            intercept, slope = 0.0, max(r1 / m11, self._min_slope)
        self.intercept, self.slope = intercept, slope

    def predict(self, x: float) -> float:
        """Predicted seconds for size ``x``."""
        return self.intercept + self.slope * x

    def fresh(self) -> AffineEstimate:
        """A new estimate whose prior is this one's current fit (no data)."""
        return AffineEstimate(self.intercept, self.slope, self._x_ref,
                              self._pa, self._decay, self._min_slope)


class KeyedEstimates:
    """A shared estimate plus one per key (node id).

    Every observation updates both the shared fit and its key's fit. A key's
    fit takes the shared fit's current estimate as its prior at its first
    observation, so a new node starts from what its peers taught, then follows
    its own measurements.
    """

    def __init__(self, shared: AffineEstimate) -> None:
        self.shared = shared
        self.per_key: dict[str, AffineEstimate] = {}

    def observe(self, key: str, x: float, y: float) -> None:
        """Record one measurement for ``key``."""
        if key not in self.per_key:
            self.per_key[key] = self.shared.fresh()
        self.per_key[key].observe(x, y)
        self.shared.observe(x, y)

    def get(self, key: str) -> AffineEstimate:
        """The key's own fit, or the shared one if the key was never observed."""
        return self.per_key.get(key, self.shared)


class MeanEstimate:
    """Online weighted mean of a fixed cost, with the same prior/decay scheme."""

    def __init__(self, prior: float, prior_weight: float = 1.0, decay: float = 0.95) -> None:
        self._prior, self._prior_weight, self._decay = prior, prior_weight, decay
        self._w = self._wy = 0.0
        self.count = 0

    def observe(self, y: float) -> None:
        """Add one measurement of ``y`` seconds."""
        self._w, self._wy = self._w * self._decay + 1.0, self._wy * self._decay + y
        self.count += 1

    @property
    def value(self) -> float:
        """Current estimate."""
        return (self._prior * self._prior_weight + self._wy) / (self._prior_weight + self._w)

