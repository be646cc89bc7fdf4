"""pass@k and maj@k of n sampled responses per problem (pure Python, no JAX).

* pass@k: the probability that at least one of k responses drawn without replacement from the n
  sampled ones is correct, the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language
  Models Trained on Code", arXiv:2107.03374, section 2.1 and its figure 3):
  1 - C(n - c, k) / C(n, k) with c correct of n, computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i)
  (no large binomials); 1 when n - c < k (every k-subset holds a correct response).
* maj@k: majority vote over the answers of the first k responses; 1 when the most frequent
  answer is correct. Ties go to the answer that occurs first.

Both are per problem; the evaluation averages them over problems.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `c` correct among `n` samples (1 <= k <= n)."""
    n, c, k = int(n), int(c), int(k)
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass@k: need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k}: k must be in [1, n={n}] (draw at least k samples per problem)")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def normalize_answer(text: str) -> str:
    """The answer a completion votes for: its whitespace-split tokens joined by one space."""
    return " ".join(text.split())


def maj_at_k(answers: Sequence, correct: Sequence[bool], k: int) -> float:
    """1.0 when the majority answer of the first k samples is correct, else 0.0.

    answers[i]: the (normalized) answer of sample i; correct[i]: whether it is correct. Ties
    between equally frequent answers go to the one that occurs first; the majority answer's
    correctness is that of its first occurrence."""
    k = int(k)
    if len(answers) != len(correct):
        raise ValueError(f"maj@k: {len(answers)} answers but {len(correct)} correctness flags")
    if not 1 <= k <= len(answers):
        raise ValueError(f"maj@{k}: k must be in [1, {len(answers)}] (the samples given)")
    first = answers[:k]
    counts = Counter(first)
    best = max(counts.values())
    i = next(i for i, a in enumerate(first) if counts[a] == best)
    return float(bool(correct[i]))


KS = (1, 4, 8)


def at_k_metrics(correct: Sequence[Sequence[bool]], answers: Sequence[Sequence] = None,
                 ks: Sequence[int] = KS) -> dict:
    """{"pass@k": mean over problems, "maj@k": ...} for each k in `ks` with k <= n.

    correct[p][i] / answers[p][i]: sample i of problem p (n samples each, in sampling order);
    maj@k (from the first k samples) only when `answers` is given."""
    if not correct:
        return {}
    n = len(correct[0])
    if any(len(row) != n for row in correct):
        raise ValueError("pass@k: every problem needs the same number of samples")
    out = {}
    for k in ks:
        if k <= n:
            out[f"pass@{k}"] = sum(pass_at_k(n, sum(map(bool, row)), k)
                                   for row in correct) / len(correct)
    if answers is not None:
        for k in ks:
            if k <= n:
                out[f"maj@{k}"] = sum(maj_at_k(a, row, k)
                                      for a, row in zip(answers, correct)) / len(correct)
    return out
