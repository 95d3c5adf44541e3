"""What a site's σ search costs: Opacus' get_noise_multiplier against fl_client.dp.engine.sigma_search.

python benchmarks/sigma_search.py

For each plan (accountant, ε, sample rate q, steps; δ = 1e-5), both searches run with a fresh accountant and
no cache, one after the other, and the table gives their σ, the ε that σ spends, the accountant calls and the
seconds, and the ratio of the seconds. A site searches σ in its first train message for each plan (then keeps
it on disk); in a deployment that message is also a fresh process, and at 1,000 simulated sites almost every
message is a site's first.
"""

from __future__ import annotations

import platform
import time
import warnings

from opacus.accountants import create_accountant
from opacus.accountants import utils as accountant_utils

from fl_client.dp.engine import sigma_search

PLANS = [  # (accountant, ε, q, steps): the loopback tests' sites, the demo's, Beauty's, and far corners
    ("prv", 8.0, 32 / 60, 8), ("prv", 8.0, 0.1, 60), ("prv", 8.0, 1 / 6, 60), ("prv", 3.0, 0.5, 4),
    ("prv", 1.0, 0.01, 1000), ("prv", 0.5, 0.001, 100), ("prv", 8.0, 0.05, 2000),
    ("rdp", 8.0, 32 / 60, 8), ("rdp", 8.0, 1 / 6, 60), ("rdp", 1.0, 0.01, 1000),
]
DELTA = 1e-5


class Counted:
    """An accountant of one kind whose get_epsilon calls are counted."""

    def __init__(self, mechanism: str) -> None:
        self.mechanism, self.calls = mechanism, 0

    def fresh(self, mechanism: str | None = None):  # noqa: ANN201 (an Opacus accountant)
        accountant = create_accountant(mechanism=self.mechanism)
        get_epsilon = accountant.get_epsilon

        def counted(delta: float, **kwargs) -> float:  # noqa: ANN003
            self.calls += 1
            return get_epsilon(delta=delta, **kwargs)

        accountant.get_epsilon = counted
        return accountant

    def epsilon(self, sigma: float, sample_rate: float, steps: int) -> float:
        accountant = self.fresh()
        accountant.history = [(sigma, sample_rate, steps)]
        return accountant.get_epsilon(delta=DELTA)


def main() -> None:
    warnings.filterwarnings("ignore")
    print(f"machine: {platform.node() or 'vm'}, {platform.machine()}, {platform.python_version()}")
    print("| accountant | ε | q | steps | Opacus σ (ε spent) | calls | s | ours σ (ε spent) | calls | s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    totals = [0.0, 0.0]
    for mechanism, epsilon, q, steps in PLANS:
        theirs = Counted(mechanism)
        accountant_utils.create_accountant = theirs.fresh  # get_noise_multiplier's own accountant, counted
        start = time.perf_counter()
        reference = accountant_utils.get_noise_multiplier(target_epsilon=epsilon, target_delta=DELTA,
                                                          sample_rate=q, steps=steps, accountant=mechanism)
        their_seconds = time.perf_counter() - start
        ours = {kind: Counted(kind) for kind in ("prv", "rdp", "gdp")}
        start = time.perf_counter()
        sigma = sigma_search(lambda s, kind: ours[kind].epsilon(s, q, steps), epsilon, mechanism)  # noqa: B023
        our_seconds = time.perf_counter() - start
        our_calls = f"{ours['prv'].calls} + {ours['rdp'].calls} RDP" if mechanism == "prv" else ours[mechanism].calls
        check = Counted(mechanism)
        spent_theirs, spent_ours = check.epsilon(reference, q, steps), check.epsilon(sigma, q, steps)
        totals[0] += their_seconds
        totals[1] += our_seconds
        print(f"| {mechanism} | {epsilon:g} | {q:.4g} | {steps} | {reference:.4f} ({spent_theirs:.4f}) | "
              f"{theirs.calls} | {their_seconds:.2f} | {sigma:.4f} ({spent_ours:.4f}) | {our_calls} | "
              f"{our_seconds:.2f} | {their_seconds / our_seconds:.1f}x |")
    print(f"total: Opacus {totals[0]:.1f} s, ours {totals[1]:.1f} s ({totals[0] / totals[1]:.1f}x)")


if __name__ == "__main__":
    main()
