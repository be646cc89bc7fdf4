"""pass@k (the unbiased estimator of Chen et al. 2021) and maj@k of the held-out evaluation,
against references written from the definitions: exact rational combinatorics (math.comb),
brute-force enumeration of every k-subset, and hand-worked majority votes."""
import itertools
import math
from fractions import Fraction

import pytest

from easyrl.pipeline.metrics_at_k import at_k_metrics, maj_at_k, normalize_answer, pass_at_k


def exact_pass(n, c, k):
    """1 - C(n-c, k) / C(n, k) in exact rationals (math.comb(m, k) = 0 for k > m)."""
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def brute_pass(n, c, k):
    """The expectation pass@k estimates, by enumeration: the fraction of the k-subsets of n
    samples (the first c correct) that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 10])
def test_pass_at_k_matches_exact_combinatorics_and_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            ref = exact_pass(n, c, k)
            assert ref == brute_pass(n, c, k)
            assert pass_at_k(n, c, k) == pytest.approx(float(ref), rel=1e-12, abs=1e-15), (n, c, k)


def test_pass_at_1_is_the_fraction_correct_and_hand_values():
    for n, c in ((8, 3), (10, 7), (4, 0), (4, 4)):
        assert pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-15)
    # n=8, c=2, k=4: 1 - C(6,4)/C(8,4) = 1 - 15/70 = 11/14
    assert pass_at_k(8, 2, 4) == pytest.approx(11 / 14, abs=1e-15)
    # n=8, c=1, k=8: every 8-subset is the whole set -> 1
    assert pass_at_k(8, 1, 8) == 1.0


def test_pass_at_k_is_stable_for_large_n():
    """The product form avoids huge binomials: n = 200 against exact rationals."""
    for c, k in ((1, 1), (5, 100), (50, 100), (150, 10), (3, 197)):
        assert pass_at_k(200, c, k) == pytest.approx(float(exact_pass(200, c, k)),
                                                     rel=1e-12, abs=1e-15), (c, k)


def test_pass_at_k_edge_cases_and_errors():
    assert pass_at_k(8, 0, 1) == 0.0 and pass_at_k(8, 0, 8) == 0.0  # c = 0
    assert pass_at_k(8, 5, 4) == 1.0  # n - c = 3 < k = 4: every subset has a correct one
    assert pass_at_k(8, 8, 1) == 1.0
    with pytest.raises(ValueError, match="k must be"):
        pass_at_k(4, 1, 8)  # k > n
    with pytest.raises(ValueError, match="k must be"):
        pass_at_k(4, 1, 0)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, -1, 1)


def test_maj_at_k_hand_worked():
    answers = ["a b", "c", "c", "a b", "d", "d", "d", "c"]
    correct = [True, False, False, True, False, False, False, False]
    # k=1: "a b" (correct). k=2: a tie of 1-1 -> first occurrence "a b" (correct).
    # k=3: "c" twice (wrong). k=4: "a b" 2, "c" 2 -> tie, "a b" occurs first (correct).
    # k=6: "a b" 2, "c" 2, "d" 2 -> "a b" (correct). k=7: "d" 3 (wrong).
    # k=8: "c" 3, "d" 3 -> tie, "c" occurs first (wrong).
    want = {1: 1.0, 2: 1.0, 3: 0.0, 4: 1.0, 5: 1.0, 6: 1.0, 7: 0.0, 8: 0.0}
    for k, v in want.items():
        assert maj_at_k(answers, correct, k) == v, k
    # all answers distinct: the first sample decides
    assert maj_at_k(["x", "y", "z"], [False, True, True], 3) == 0.0
    with pytest.raises(ValueError, match="k must be"):
        maj_at_k(answers, correct, 9)
    with pytest.raises(ValueError, match="correctness flags"):
        maj_at_k(answers, correct[:3], 2)


def test_normalize_answer():
    assert normalize_answer("  a   b\tc \n") == "a b c"
    assert normalize_answer("") == ""
    assert normalize_answer("a b c") == normalize_answer("a  b\nc")


def test_at_k_metrics_averages_over_problems():
    correct = [[True, False, False, False, False, False, False, False],   # c = 1
               [False] * 8,                                               # c = 0
               [True, True, False, True, False, False, False, False]]     # c = 3
    answers = [["a", "b", "b", "c", "d", "e", "f", "g"],
               ["x"] * 8,
               ["s", "s", "t", "s", "t", "t", "t", "u"]]
    got = at_k_metrics(correct, answers)
    ref = {k: float(sum(exact_pass(8, c, k) for c in (1, 0, 3)) / 3) for k in (1, 4, 8)}
    for k in (1, 4, 8):
        assert got[f"pass@{k}"] == pytest.approx(ref[k], abs=1e-14)
    # maj@1: first samples -> 1, 0, 1. maj@4: "b" (wrong), "x" (wrong), "s" 3x (right).
    # maj@8: "b" (wrong), "x" (wrong), "t" 4x vs "s" 3x -> "t" (wrong)
    assert (got["maj@1"], got["maj@4"], got["maj@8"]) == pytest.approx((2 / 3, 1 / 3, 0.0))
    # with fewer samples than k, the larger k are left out; without answers, no maj@k
    assert set(at_k_metrics([[True, False, True, True]], None)) == {"pass@1", "pass@4"}
    assert at_k_metrics([]) == {}


def test_report_table_shows_pass_and_maj_beside_the_true_reward(tmp_path):
    from easyrl.pipeline.report import write_report
    ev = {"sft": {"true_reward": 0.5, "exact": 0.25, "pass@1": 0.25, "pass@4": 0.5, "pass@8": 0.625,
                  "maj@1": 0.25, "maj@4": 0.375, "maj@8": 0.375, "kl_to_sft": 0.0,
                  "response_len": 5.0},
          "grpo": {"true_reward": 0.75, "exact": 0.5, "pass@1": 0.5, "pass@4": 0.875,
                   "pass@8": 0.9375, "maj@1": 0.5, "maj@4": 0.625, "maj@8": 0.75,
                   "kl_to_sft": 1.5, "response_len": 6.0}}
    text = write_report(str(tmp_path), stages=[], stage_info={}, metrics={}, evaluation=ev,
                        eval_settings={"num_prompts": 4, "num_samples": 8, "temperature": 1.0,
                                       "max_new_tokens": 8}, exports={}, total_seconds=1.0)
    assert ("| policy | true reward | pass@1 | pass@4 | pass@8 | maj@4 | maj@8 | KL to SFT |"
            in text)
    assert "| **sft** | 0.500 | 0.250 | 0.500 | 0.625 | 0.375 | 0.375 | 0.000 | 5.00 |" in text
    assert "| **grpo** | 0.750 | 0.500 | 0.875 | 0.938 | 0.625 | 0.750 | 1.500 | 6.00 |" in text
    assert "**pass@k**" in text and "**maj@k**" in text
