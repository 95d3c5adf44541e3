"""User-level DP-SGD through Opacus: noise calibration, accounting, and wrapping a model for training, with
secure mode's CSPRNG draws (fl_client.dp.secure_rng) in Opacus' loader and optimiser (the settings are
fl_client.dp.settings). Only what needs DP imports this module, and with it Opacus (about 3 s of CPU): a training
without DP, an evaluation and the settings never do.

One training row is one user, so Opacus' per-sample (ε, δ) is a per-user guarantee.
"""

from __future__ import annotations

import json
import math
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import opacus
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.accountants import create_accountant
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader

from fl_client.dp.bookkeeping import PerUserClipping
from fl_client.dp.secure_rng import secure_gaussian, secure_uniform
from fl_client.dp.settings import AccountantHistory, PrivacyConfig
from shared_model.atomic import write_atomically
from shared_model.privacy_claim import privacy_claim


@dataclass
class PrivacySpent:
    """What one training spent: the unit is one user; ε is over every step in `history`."""

    epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    history: AccountantHistory
    popularity_noise: float = 0.0  # σ of the popularity release before the steps (the history's first entry)

    def claim(self) -> str:
        """The exact sentence a report prints."""
        steps = sum(h[2] for h in self.history) - (1 if self.popularity_noise else 0)
        release = f", after one release of item popularity (σ = {self.popularity_noise:.3f})" \
            if self.popularity_noise else ""
        return privacy_claim(self.epsilon, self.delta, mechanism=f"over {steps} DP-SGD steps "
                             f"(σ = {self.noise_multiplier:.3f}, C = {self.max_grad_norm:g}){release}")


def calibrate_noise(config: PrivacyConfig, sample_rate: float, steps: int, delta: float,
                    cache_path: Path | None = None, before: AccountantHistory | None = None) -> float:
    """σ that spends exactly the configured ε over `steps` Poisson-sampled steps (or the fixed σ).

    `cache_path`: a JSON file of σ plans already searched (a site's state dir), for processes that plan the
    same σ again: a deployed site starts a fresh process for every round. `before`: what this training has
    already spent on the same users (the popularity release), composed with the steps."""
    if config.noise_multiplier is not None:
        return config.noise_multiplier
    if before:
        return _sigma_after(tuple(before), config.epsilon, delta, sample_rate, steps, config.accountant)
    args = (config.epsilon, delta, sample_rate, steps, config.accountant)
    if cache_path is None:
        return _calibrated_sigma(*args)
    key = json.dumps([*args, opacus.__version__])
    plans = _read_plans(cache_path)
    if key not in plans:
        plans[key] = _calibrated_sigma(*args)
        # not synced to disk (shared_model.atomic): a damaged cache is searched again (_read_plans)
        write_atomically(cache_path, lambda out: out.write(json.dumps(plans, indent=1).encode()), durable=False)
    return plans[key]


def _read_plans(path: Path) -> dict[str, float]:
    """The cached σ plans; an unreadable file is reported and searched again (a cache, never a source of truth:
    the ledger composes ε from the σ actually used, so a wrong σ here could not overspend the budget)."""
    if not path.exists():
        return {}
    try:
        plans = json.loads(path.read_text())
        if isinstance(plans, dict) and all(isinstance(v, float) and math.isfinite(v) and v > 0
                                           for v in plans.values()):
            return plans
        problem = "not a mapping of plans to positive σ"
    except (OSError, ValueError) as err:
        problem = str(err)
    warnings.warn(f"{path}: ignoring the σ plan cache ({problem}); searching σ again", stacklevel=3)
    return {}


@lru_cache(maxsize=256)
def _calibrated_sigma(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The σ search, done once per process for each plan: it is a pure function of its arguments and takes
    seconds (each accountant call computes fractional RDP orders), and a site plans the same σ every round."""
    return sigma_search(lambda sigma, acc: composed_epsilon([(sigma, sample_rate, steps)], delta, acc), epsilon,
                        accountant)


@lru_cache(maxsize=64)
def _sigma_after(before: tuple[tuple[float, float, int], ...], epsilon: float, delta: float, sample_rate: float,
                 steps: int, accountant: str) -> float:
    """σ for `steps` at `sample_rate` that, composed after `before`, spends the rest of ε."""
    already = composed_epsilon(before, delta, accountant)
    if already >= epsilon:
        raise ValueError(f"the releases before DP-SGD already spend ε = {already:.3f} of the budget {epsilon:g}: "
                         "raise privacy.popularity_noise")
    return sigma_search(lambda sigma, acc: composed_epsilon([*before, (sigma, sample_rate, steps)], delta, acc),
                        epsilon, accountant)


def sigma_search(spends: Callable[[float, str], float], epsilon: float, accountant: str) -> float:
    """`smallest_sigma` for `spends(σ, accountant)`. For PRV the search starts from RDP's answer (RDP's ε is an
    upper bound, computed in closed form at any σ): PRV's domain grows with the ε it is asked about, and a plan of
    10^5 steps at q = 0.1 asked at σ = 1 grew past 23 GB (killed), where started from RDP's σ it took 1.2 GB and 7 s."""
    start = smallest_sigma(lambda sigma: spends(sigma, "rdp"), epsilon) if accountant == "prv" else 1.0
    return smallest_sigma(lambda sigma: spends(sigma, accountant), epsilon, start=start)


MAX_SIGMA = 1e6  # as Opacus' search: a budget that needs more noise than this is refused
MAX_SEARCH_CALLS = 100  # accountant calls before the σ search gives up (it takes 4-6)


def smallest_sigma(spends: Callable[[float], float], epsilon: float, tolerance: float = 0.01,
                   start: float = 1.0) -> float:
    """A σ whose `spends(σ)` is at most `epsilon` and within `tolerance` of it, for an ε that falls as σ grows.

    What Opacus' get_noise_multiplier answers (its default tolerance is this 0.01), in fewer accountant calls:
    4-6 instead of 10-16 for benchmarks/sigma_search.py's plans, each 0.1-1 s (BENCHMARKS.md). Opacus bisects
    [0, 20]; this brackets from σ = `start` and then interpolates log ε against log σ (nearly a line: ε falls
    about as 1/σ), regula falsi with the Illinois rule, so a slow side cannot stall it. The answer is always a σ
    whose ε the accountant computed to be within the budget."""
    calls = 0

    def spent_at(sigma: float) -> float:
        nonlocal calls
        calls += 1
        if calls > MAX_SEARCH_CALLS:
            raise RuntimeError(f"the σ search did not settle within {MAX_SEARCH_CALLS} accountant calls")
        try:
            return spends(sigma)
        except MemoryError:  # PRV's domain at a σ far below the answer (a plan of many steps): not within budget
            return math.inf

    low: tuple[float, float] | None = None  # (σ, ε) spending more than the budget
    high: tuple[float, float] | None = None  # (σ, ε) within it
    sigma = start
    while low is None or high is None:  # bracket by the ratio ε suggests (ε falls about as 1/σ): up at least 2x,
        # down to just past the budget (at most halving), so no call is far below the answer
        spent = spent_at(sigma)
        if spent > epsilon:
            low = (sigma, spent)
            sigma *= min(max(2.0, 1.2 * spent / epsilon), 1e3)
            if sigma > MAX_SIGMA:
                raise ValueError(f"no σ up to {MAX_SIGMA:g} keeps ε within {epsilon:g}: the budget is too low")
        else:
            high = (sigma, spent)
            if epsilon - spent <= tolerance:
                return sigma
            sigma *= max(0.5, 0.9 * spent / epsilon)
    kept = 0  # which end the last two steps both moved (Illinois: halve the other end's distance to the budget)
    y_low, y_high = math.log(low[1] / epsilon), math.log(max(high[1], 1e-300) / epsilon)
    while True:
        x_low, x_high = math.log(low[0]), math.log(high[0])
        x = x_low + (x_high - x_low) * y_low / (y_low - y_high)
        if not min(x_low, x_high) < x < max(x_low, x_high):
            x = (x_low + x_high) / 2
        sigma = math.exp(x)
        spent = spent_at(sigma)
        if spent > epsilon:
            low, y_low = (sigma, spent), math.log(spent / epsilon)
            y_high = y_high / 2 if kept == -1 else y_high
            kept = -1
        else:
            high, y_high = (sigma, spent), math.log(max(spent, 1e-300) / epsilon)
            if epsilon - spent <= tolerance or high[0] - low[0] <= 1e-9 * high[0]:
                return sigma
            y_low = y_low / 2 if kept == 1 else y_low
            kept = 1


StepModel: TypeAlias = GradSampleModule | PerUserClipping  # what fl_client.dp.step.private_step runs a DP step with


def make_private(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                 config: PrivacyConfig, noise_multiplier: float
                 ) -> tuple[PrivacyEngine, StepModel, DPOptimizer, DataLoader]:
    """Wrap model, optimizer and loader for DP-SGD (Poisson sampling, flat per-user clipping, Opacus' noise and
    accountant): per-user clipping by book-keeping (fl_client.dp.bookkeeping) or by Opacus' hooks, which form
    every user's gradient (about 5× slower; the reference the book-keeping is tested against)."""
    # secure_mode is ours (fl_client.dp.secure_rng): Opacus' needs torchcsprng, which no current torch has.
    with warnings.catch_warnings():
        if config.secure_mode:  # Opacus warns that *its* secure RNG is off; ours replaces it just below
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=config.accountant)
        if config.grad_sample_mode == "bookkeeping":
            step_model, private_optimizer, private_loader = _bookkeeping(engine, model, optimizer, loader, config,
                                                                         noise_multiplier)
        else:
            wrapped: Any = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
                max_grad_norm=config.max_grad_norm, poisson_sampling=True, grad_sample_mode="hooks")
            step_model, private_optimizer, private_loader = wrapped
    if config.secure_mode:
        private_loader = secure_loader(private_loader)
        use_secure_noise(private_optimizer)
    return engine, step_model, private_optimizer, private_loader


class SecurePoissonSampler(UniformWithReplacementSampler):
    """Opacus' Poisson sampler (each user in each step independently with probability `sample_rate`),
    with the coin flips drawn from the OS CSPRNG."""

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield np.flatnonzero(secure_uniform(self.num_samples) <= self.sample_rate).tolist()


def secure_loader(loader: DataLoader) -> DataLoader:
    """The same Poisson loader (dataset, steps, Opacus' empty-batch collate) with CSPRNG sampling."""
    sampler = loader.batch_sampler
    assert isinstance(sampler, UniformWithReplacementSampler), "expects Opacus' Poisson DPDataLoader"
    return DataLoader(loader.dataset, collate_fn=loader.collate_fn,
                      batch_sampler=SecurePoissonSampler(num_samples=sampler.num_samples,
                                                         sample_rate=sampler.sample_rate, steps=sampler.steps))


def use_secure_noise(optimizer: DPOptimizer) -> None:
    """Make the DP optimiser noise its clipped gradient sums with `secure_gaussian` (same σ·C)."""

    def add_noise(self: DPOptimizer) -> None:
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = secure_gaussian(p.summed_grad, self.noise_multiplier * self.max_grad_norm)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = types.MethodType(add_noise, optimizer)


def _bookkeeping(engine: PrivacyEngine, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loader: DataLoader, config: PrivacyConfig, noise_multiplier: float
                 ) -> tuple[PerUserClipping, DPOptimizer, DataLoader]:
    """What Opacus' make_private builds for its ghost clipping (Poisson loader, an optimiser that noises the
    clipped sum it is given, the engine's accountant hooked to its steps), with book-keeping in place of its
    hooks."""
    private_loader = DPDataLoader.from_data_loader(loader)
    sample_rate = 1 / len(private_loader)
    private_optimizer = DPOptimizerFastGradientClipping(
        optimizer, noise_multiplier=noise_multiplier, max_grad_norm=config.max_grad_norm,
        expected_batch_size=int(len(private_loader.dataset) * sample_rate),
        loss_reduction="mean")
    private_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return PerUserClipping(model, config.max_grad_norm), private_optimizer, private_loader


def spent(engine: PrivacyEngine, config: PrivacyConfig, delta: float, noise_multiplier: float,
          before: AccountantHistory | None = None) -> PrivacySpent:
    """The (ε, δ) the engine's accountant has recorded so far, after what was spent `before` it."""
    steps = [(float(s), float(q), int(n)) for s, q, n in getattr(engine.accountant, "history", [])]
    history = [*(before or []), *steps]
    return PrivacySpent(epsilon=composed_epsilon(tuple(history), delta, engine.accountant.mechanism()),
                        delta=delta, noise_multiplier=noise_multiplier, max_grad_norm=config.max_grad_norm,
                        history=history, popularity_noise=before[0][0] if before else 0.0)


def composed_epsilon(history: Sequence[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """ε of a composition of (σ, sample rate, steps) DP-SGD steps; 0 for none.

    Steps with the same (σ, sample rate) are counted as one entry: composition does not depend on the order,
    and the PRV accountant costs about 0.2 s per entry (a ledger of 120 one-step rounds took 25 s, per check,
    per site). Opacus' own accountant merges consecutive identical steps the same way."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, sample_rate, count in history:
        key = (float(sigma), float(sample_rate))
        steps[key] = steps.get(key, 0) + int(count)
    return _epsilon(tuple((s, q, n) for (s, q), n in steps.items()), delta, accountant)


@lru_cache(maxsize=256)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """Cached per process: the accountants take seconds (fractional RDP orders) and the answer depends on
    nothing else."""
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    with np.errstate(divide="ignore"):  # PRV takes log(1 - q), -inf for a release of everyone (q = 1): as meant
        return float(acc.get_epsilon(delta=delta))
