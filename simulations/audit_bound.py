"""The one-run audit bound (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run",
Theorem 5.2 / Algorithm 3): from how many of r membership guesses about m canaries (each included with
probability 1/2) came out right, the largest ε an (ε, δ)-DP claim could have and still make that many right
guesses less likely than the significance level. A lower bound on the true ε: a DP claim below it is false."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats


def p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Probability of at least `correct` right guesses out of `guesses` under an (ε, δ)-DP training: the
    Binomial(guesses, e^ε / (1 + e^ε)) tail, plus the δ term 2mδ · max_i P[correct - i <= W < correct] / i."""
    if correct <= 0:
        return 1.0
    q = special.expit(epsilon)
    tail = float(stats.binom.sf(correct - 1, guesses, q))  # P[W >= correct]
    if delta == 0:
        return tail
    steps = np.arange(1, correct + 1)
    below = stats.binom.sf(correct - steps - 1, guesses, q) - tail  # P[correct - i <= W < correct]
    return min(1.0, tail + 2 * m * delta * float(np.max(below / steps)))


def epsilon_lower_bound(m: int, guesses: int, correct: int, delta: float, significance: float) -> float:
    """The largest ε whose (ε, δ) claim the guesses refute at `significance` (0 when they refute none)."""
    def refuted_by(epsilon: float) -> float:
        return significance - p_value(m, guesses, correct, epsilon, delta)

    if refuted_by(0.0) <= 0:
        return 0.0
    high = 1.0
    while refuted_by(high) > 0:
        if high > 1e3:
            return high  # every finite claim we tried is refuted
        high *= 2
    return float(optimize.brentq(refuted_by, 0.0, high, xtol=1e-6))


@dataclass
class AuditResult:
    """What the guesses showed: the bound, and the guess count that gave it."""

    epsilon_lower_bound: float
    guesses: int
    correct: int
    auc: float  # how well the scores separate included from excluded canaries (0.5: not at all)


def audit_scores(scores: np.ndarray, included: np.ndarray, delta: float, significance: float) -> AuditResult:
    """Guess the k highest-scored canaries in and the k lowest out, for each k of a set fixed in advance
    (m/100, m/50, m/20, m/10, m/5, m/2); the best bound, each at significance / (number of k) (Bonferroni),
    so picking the best k after seeing the scores keeps the bound valid."""
    m = len(scores)
    order = np.argsort(-scores, kind="stable")  # highest score first
    ks = sorted({k for k in (m // 100, m // 50, m // 20, m // 10, m // 5, m // 2) if k >= 1})
    best = AuditResult(0.0, 0, 0, auc_of(scores, included))
    for k in ks:
        correct = int(included[order[:k]].sum() + (~included[order[m - k:]]).sum())
        bound = epsilon_lower_bound(m, 2 * k, correct, delta, significance / len(ks))
        if bound > best.epsilon_lower_bound or best.guesses == 0:
            best = AuditResult(bound, 2 * k, correct, best.auc)
    return best


def auc_of(scores: np.ndarray, included: np.ndarray) -> float:
    """The probability that an included canary outscores an excluded one (ties count half)."""
    if included.all() or not included.any():
        return 0.5
    return float(stats.mannwhitneyu(scores[included], scores[~included]).statistic
                 / (included.sum() * (~included).sum()))
