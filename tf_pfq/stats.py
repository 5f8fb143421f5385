"""Paired comparisons of accuracies, as a referee would check a claim.

Two methods run on the same pretrained model with the same fine-tuning seed (same
data subset and order) form a pair; their accuracy difference cancels what the pair
shares (the model, the data draw), so the paired differences are what is tested:

* `paired_difference`: mean difference with a Student-t 95 % interval and the
  two-sided p-value of "the mean difference is 0";
* `equivalence_p`: the two one-sided tests (TOST) p-value of "|mean difference| <
  margin", the only way a result may be called "equal";
* `holm`: Holm's step-down adjustment of p-values, so that a table of many claims
  keeps its family-wise error at 5 %;
* `verdicts`: one word per claim from the three above.

Written here because the few lines of arithmetic are all that is needed (SciPy
provides the t distribution).

Example:
  >>> d = paired_difference([0.5, 0.7, 0.4, 0.6, 0.55])
  >>> round(d.mean, 2), d.n, d.excludes_zero()
  (0.55, 5, True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import stats as _scipy_stats

__all__ = ["PairedDifference", "equivalence_p", "holm", "paired_difference", "verdicts"]


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """Summary of paired differences `a - b`.

    Attributes:
      mean: mean difference.
      low: lower end of the two-sided confidence interval.
      high: upper end.
      p: two-sided p-value of a zero mean (paired t-test); 1.0 with fewer than 2 pairs.
      n: number of pairs.
      std: sample standard deviation of the differences.
      confidence: the interval's confidence level.
    """

    mean: float
    low: float
    high: float
    p: float
    n: int
    std: float
    confidence: float = 0.95

    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)


def paired_difference(differences: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """Mean of paired differences with a Student-t interval and p-value.

    Args:
      differences: one `a - b` per pair.
      confidence: interval confidence level.

    Returns:
      A `PairedDifference`; with fewer than two pairs the interval is unbounded.

    Raises:
      ValueError: no differences, or a non-finite one.

    Example:
      >>> d = paired_difference([1.0, 1.0, 1.0])
      >>> (d.mean, d.low, d.high, d.p)
      (1.0, 1.0, 1.0, 0.0)
    """
    x = np.asarray(differences, dtype=np.float64)
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"`differences` must be non-empty and finite. Received: {list(x)}")
    mean = float(x.mean())
    if x.size < 2:
        return PairedDifference(mean, -np.inf, np.inf, 1.0, 1, float("nan"), confidence)
    std = float(x.std(ddof=1))
    sem = std / np.sqrt(x.size)
    if sem <= 1e-12 * max(1.0, abs(mean)):  # identical differences: the point itself
        return PairedDifference(
            mean, mean, mean, 0.0 if mean else 1.0, int(x.size), std, confidence
        )
    t = _scipy_stats.t.ppf(0.5 + confidence / 2, df=x.size - 1)
    p = 2 * _scipy_stats.t.sf(abs(mean) / sem, df=x.size - 1)
    low, high = float(mean - t * sem), float(mean + t * sem)
    return PairedDifference(mean, low, high, float(p), int(x.size), std, confidence)


def equivalence_p(differences: Sequence[float], margin: float) -> float:
    """TOST p-value that the mean paired difference lies within `(-margin, margin)`.

    Equivalence is shown when this p-value is small: both one-sided tests reject
    "mean <= -margin" and "mean >= margin".

    Example:
      >>> equivalence_p([0.01, -0.02, 0.0, 0.02, -0.01, 0.01], margin=0.3) < 0.001
      True
      >>> equivalence_p([1.0, 1.2, 0.9], margin=0.3) > 0.5
      True
    """
    if margin <= 0:
        raise ValueError(f"`margin` must be positive. Received: margin={margin}")
    x = np.asarray(differences, dtype=np.float64)
    if x.size < 2:
        return 1.0
    mean, sem = float(x.mean()), float(x.std(ddof=1) / np.sqrt(x.size))
    if sem <= 1e-12 * max(1.0, abs(mean)):
        return 0.0 if abs(mean) < margin else 1.0
    lower = _scipy_stats.t.sf((mean + margin) / sem, df=x.size - 1)
    upper = _scipy_stats.t.cdf((mean - margin) / sem, df=x.size - 1)
    return float(max(lower, upper))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given).

    Example:
      >>> [round(p, 3) for p in holm([0.01, 0.04, 0.03])]
      [0.03, 0.06, 0.06]
    """
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(np.argsort(p)):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def verdicts(
    differences: Sequence[PairedDifference],
    equivalence: Sequence[float],
    alpha: float = 0.05,
    equality: Sequence[bool] | None = None,
) -> list[str]:
    """One verdict per claim "a beats b" (or "a equals b"), Holm-corrected across all.

    "holds": the difference is positive and its Holm-adjusted p-value is below
    `alpha`; "reversed": the same, negative; "equal": the Holm-adjusted equivalence
    p-value is below `alpha`; otherwise "not resolved". A claim "a equals b" is
    judged by its equivalence test first: a real difference inside the margin is
    "equal", and one that is only significant "differs".

    Args:
      differences: paired differences `a - b`, one per claim.
      equivalence: TOST p-values, one per claim (see `equivalence_p`).
      alpha: family-wise error rate.
      equality: per claim, whether it claims "a equals b"; default none does.

    Example:
      >>> d = [paired_difference([1.0, 1.1, 0.9, 1.0]), paired_difference([0.1, -0.1, 0.2, -0.2])]
      >>> verdicts(d, [1.0, 0.2])
      ['holds', 'not resolved']
    """
    equality = [False] * len(differences) if equality is None else list(equality)
    if not len(differences) == len(equivalence) == len(equality):
        raise ValueError("`differences`, `equivalence` and `equality` must have the same length.")
    differ = holm([d.p for d in differences])
    same = holm(list(equivalence))
    out = []
    for d, p_differ, p_same, equals in zip(differences, differ, same, equality):
        if equals and p_same < alpha:
            out.append("equal")
        elif p_differ < alpha:
            out.append("differs" if equals else "holds" if d.mean > 0 else "reversed")
        elif p_same < alpha:
            out.append("equal")
        else:
            out.append("not resolved")
    return out
