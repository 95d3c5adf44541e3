"""A site's DP settings and the names they are checked against: plain data, no Opacus, so reading a site's
settings (and an evaluate message, which trains nothing) never imports it. fl_client.dp.engine does the DP."""

from __future__ import annotations

from dataclasses import dataclass

AccountantHistory = list[tuple[float, float, int]]  # (noise multiplier, sample rate, steps)
ACCOUNTANTS = ("prv", "rdp", "gdp")
GRAD_SAMPLE_MODES = ("bookkeeping", "hooks")
DELTA_CAP = 1e-5  # the δ DP-SGD is usually reported at (Abadi et al. 2016): the default never exceeds it


def default_delta(num_users: int) -> float:
    """A site's δ when it sets none: min(1e-5, 1 / (10 · #users)), strictly below 1/#users for every size.

    (ε, δ)-DP allows a mechanism that reveals one user's data outright with probability δ, so δ · #users is the
    expected number of users it may expose: 1/(10 n) keeps that below 0.1 however large the site, and small
    sites get the usual 1e-5 (δ = 1/n, the old default, exposed one user in expectation: 0.5 for 2 users).
    """
    return min(DELTA_CAP, 1.0 / (10.0 * max(num_users, 1)))


@dataclass
class PrivacyConfig:
    """DP-SGD settings; `enabled=False` means no DP claim is made anywhere."""

    enabled: bool = False  # (bool) train with DP-SGD
    epsilon: float = 8.0  # (float) total ε this training may spend, per user
    delta: float | None = None  # (float) δ; None means default_delta(number of users)
    noise_multiplier: float | None = None  # (float) fixed σ; None calibrates σ to reach `epsilon`
    max_grad_norm: float = 1.0  # (float) per-user gradient clipping bound C
    accountant: str = "prv"  # (str) Opacus accountant: prv, rdp or gdp
    secure_mode: bool = False  # (bool) sampling and noise from the OS CSPRNG (production; slower)
    grad_sample_mode: str = "bookkeeping"  # (str) per-user clipping: bookkeeping (fast) or hooks (Opacus' own)
    popularity_noise: float = 0.0  # (float) σ of a release of item popularity starting the item bias (0 = none)

    def __post_init__(self) -> None:
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"privacy accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"privacy grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got "
                             f"{self.grad_sample_mode!r}")
        if not self.popularity_noise >= 0:
            raise ValueError(f"privacy.popularity_noise must be 0 (off) or a positive σ, got {self.popularity_noise}")


def resolve_delta(config: PrivacyConfig, num_users: int) -> float:
    """δ from the config, or default_delta(#users): one rule for the centralized trainer, a site and its check."""
    if config.delta is not None:
        return config.delta
    return default_delta(num_users)
