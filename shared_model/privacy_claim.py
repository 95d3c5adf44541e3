"""The privacy claim: the one sentence every report, log line and comparison table prints about a run's
differential privacy, built here and nowhere else so that every place states the unit, (ε, δ) and the mechanism
the same way, and nothing claims DP for a run that had it off."""

from __future__ import annotations

NO_DP = "no differential privacy (DP was off)"


def privacy_claim(epsilon: float | None, delta: float | None = None, *, unit: str = "user", mechanism: str = "",
                  upper_bound: bool = False, note: str = "", no_dp_reason: str = "DP was off") -> str:
    """The claim: "(ε = 8.000, δ = 1e-05)-DP per user, over 60 DP-SGD steps (...)"; with `upper_bound` the
    figures are maxima over several parties ("ε ≤"). `epsilon` None: no claim, and why."""
    if epsilon is None or delta is None:
        return f"no differential privacy ({no_dp_reason})"
    relation = "≤" if upper_bound else "="
    text = f"(ε {relation} {epsilon:.3f}, δ {relation} {delta:.3g})-DP per {unit}"
    if mechanism:
        text += f", {mechanism}"
    return f"{text}. {note}" if note else text
