"""Tests for tf_pfq.stats: paired intervals, equivalence, Holm, verdicts."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from tf_pfq import stats


def test_paired_difference_matches_a_paired_t_test():
    a = np.array([91.2, 90.8, 91.5, 90.9, 91.1, 91.4])
    b = np.array([90.7, 90.9, 91.0, 90.2, 90.8, 90.9])
    d = stats.paired_difference(a - b)
    reference = scipy_stats.ttest_rel(a, b)
    assert d.p == pytest.approx(reference.pvalue, rel=1e-9)
    assert d.mean == pytest.approx(np.mean(a - b))
    interval = reference.confidence_interval(0.95)
    assert (d.low, d.high) == pytest.approx((interval.low, interval.high), rel=1e-9)
    assert d.n == 6 and d.excludes_zero()


def test_paired_difference_edge_cases():
    one = stats.paired_difference([0.4])
    assert one.n == 1 and one.p == 1.0 and np.isinf(one.low) and np.isinf(one.high)
    same = stats.paired_difference([0.2, 0.2, 0.2])
    assert (same.low, same.high, same.p) == pytest.approx((0.2, 0.2, 0.0))
    zero = stats.paired_difference([0.0, 0.0])
    assert zero.p == 1.0 and not zero.excludes_zero()
    with pytest.raises(ValueError, match="finite"):
        stats.paired_difference([1.0, float("nan")])
    with pytest.raises(ValueError, match="non-empty"):
        stats.paired_difference([])


def test_equivalence_p_is_the_larger_one_sided_p():
    x = np.array([0.05, -0.1, 0.12, 0.0, -0.04, 0.08, 0.02, -0.03])
    margin = 0.3
    lower = scipy_stats.ttest_1samp(x, -margin, alternative="greater").pvalue
    upper = scipy_stats.ttest_1samp(x, margin, alternative="less").pvalue
    assert stats.equivalence_p(x, margin) == pytest.approx(max(lower, upper), rel=1e-9)
    assert stats.equivalence_p(x, margin) < 0.001
    # A clear effect is not "equal", and neither is one pair.
    assert stats.equivalence_p([1.0, 0.9, 1.1, 1.0], margin) > 0.9
    assert stats.equivalence_p([0.0], margin) == 1.0
    with pytest.raises(ValueError, match="margin"):
        stats.equivalence_p([0.1, 0.2], 0.0)


def test_holm_step_down():
    # Sorted: 0.01 * 4, 0.02 * 3, 0.03 * 2, 0.5 * 1, made monotone.
    assert stats.holm([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.06, 0.04, 0.5, 0.06])
    assert stats.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # 2 x 0.8 capped at 1
    assert stats.holm([]) == []


def test_verdicts_correct_for_the_number_of_claims():
    strong = stats.paired_difference([1.0, 1.2, 0.9, 1.1, 1.0, 1.05])
    negative = stats.paired_difference([-1.0, -1.2, -0.9, -1.1, -1.0, -1.05])
    tiny = [0.01, -0.02, 0.0, 0.02, -0.01, 0.01]
    noisy = [2.0, -1.5, 0.5, -2.0, 1.0, -0.5]
    claims = [strong, negative, stats.paired_difference(tiny), stats.paired_difference(noisy)]
    tost = [1.0, 1.0, stats.equivalence_p(tiny, 0.3), stats.equivalence_p(noisy, 0.3)]
    assert stats.verdicts(claims, tost) == ["holds", "reversed", "equal", "not resolved"]
    # A p-value that passes alone fails once enough claims share the 5 %.
    marginal = stats.paired_difference([0.5, 0.3, 0.6, 0.2, 0.4])
    assert 0.001 < marginal.p < 0.05
    assert stats.verdicts([marginal], [1.0]) == ["holds"]
    assert stats.verdicts([marginal] * 100, [1.0] * 100)[0] == "not resolved"
    with pytest.raises(ValueError, match="same length"):
        stats.verdicts([strong], [])


def test_an_equality_claim_is_judged_by_its_equivalence_test_first():
    # A small but consistent difference: significant, and well inside a 0.3 margin.
    small = [-0.03, -0.02, -0.03, -0.04, -0.03]
    d = stats.paired_difference(small)
    tost = stats.equivalence_p(small, 0.3)
    assert d.p < 0.05 and tost < 0.05
    assert stats.verdicts([d], [tost]) == ["reversed"]  # read as "a beats b"
    assert stats.verdicts([d], [tost], equality=[True]) == ["equal"]
    # Significant and outside the margin: the claim "equals" fails.
    large = [1.0, 1.2, 0.9, 1.1, 1.0]
    big = stats.paired_difference(large)
    assert stats.verdicts([big], [stats.equivalence_p(large, 0.3)], equality=[True]) == ["differs"]
    with pytest.raises(ValueError, match="same length"):
        stats.verdicts([d], [tost], equality=[True, False])
