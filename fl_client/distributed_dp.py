"""Distributed DP: a federated round that is one DP-SGD step over the union of the sites' users.

Every site Poisson-samples its users at the round's rate q, clips each sampled user's gradient to C, sums, adds
Gaussian noise, and sends minus that sum over its expected batch (q × its users) as its update; the server's
users-weighted average of the updates is then minus (Σ clipped gradients + Σ noise) over the union's expected
batch, the gradient central DP-SGD would take, and a server optimiser (FedAdam, FedAvgM) steps with it.

The noise of the sum has standard deviation σ·C when at least n − t sites add their share σ·C / √(n − t), where
n is the fewest sites a secure sum is unmasked over (the site's SecAgg threshold) and t the sites assumed to
collude with the server (their noise known to it). Without secure aggregation the server sees each site's
update, so each site adds all of σ·C itself. Under either assumption the run is DP-SGD with sampling rate q and
noise multiplier σ for every user of the union, and each site's ledger records (σ, q, 1 step) a round.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import torch
from opacus.optimizers.optimizer import _generate_noise

from fl_client.dp.engine import make_private
from fl_client.dp.enrolment import site_lock
from fl_client.dp.ledger import BudgetExceededError
from fl_client.dp.popularity import private_popularity
from fl_client.dp.secure_rng import secure_gaussian, secure_uniform
from fl_client.dp.step import private_step
from fl_client.round_config import RoundConfig, global_model
from fl_client.site import SiteConfig, SiteData, SiteStartError, check_users
from fl_client.train import TrainConfig, peak_memory_mb, user_loader
from fl_client.training_round import RoundReply, declined, keep_reply, resent_reply
from shared_model import wire
from shared_model.device import resolve_device
from shared_model.modeling_fedrec import FedRecModel


def noise_share(round_cfg: RoundConfig, summed_sites: int | None) -> float:
    """This site's noise multiplier: σ / √(n − t) when its update is summed with at least n - 1 others under
    secure aggregation (`summed_sites` = n), the whole σ without it (None). σ is the round's: the popularity
    release's σ_p in a release round, the step's otherwise."""
    sigma = round_cfg.ddp_popularity_noise or round_cfg.ddp_noise_multiplier
    if summed_sites is None:
        return sigma
    if summed_sites - round_cfg.ddp_colluders < 1:
        raise SiteStartError(f"distributed DP: {round_cfg.ddp_colluders} colluding sites assumed, but a sum is "
                             f"unmasked over as few as {summed_sites} sites: no site's noise would be left")
    return sigma / math.sqrt(summed_sites - round_cfg.ddp_colluders)


def dp_step_round(site: SiteConfig, data: SiteData, round_cfg: RoundConfig, state: Mapping[str, torch.Tensor],
                  share: float) -> RoundReply:
    """One distributed-DP round at the site against its ledger (held under its lock): a resent round from its
    kept reply, else check (σ, q, 1 step) against the budget, take the step, record it, keep the reply. A
    release round (round 0 with `ddp_popularity_noise`) releases item popularity instead: (σ_p, 1, 1)."""
    data.catalog.check_matches(round_cfg.catalog_fingerprint)
    check_users(site, data)
    if not site.privacy.enabled:
        raise SiteStartError("distributed DP: this site runs without DP, so it would add no noise while the "
                             "other sites count on its share; start it with a privacy budget")
    with global_model(round_cfg, state, site.max_model_parameters) as model:
        release = round_cfg.ddp_popularity_noise
        if release and (model.output.bias is None or not model.output.bias.requires_grad):
            raise SiteStartError("distributed DP: the server asks for a popularity release, which starts the item "
                                 "bias, but its model trains none (model.item_bias=true)")
        planned = [(release, 1.0, 1)] if release else [(round_cfg.ddp_noise_multiplier, round_cfg.ddp_sample_rate, 1)]
        with site_lock(site.state_dir):
            ledger = site.open_ledger(len(data.sequences))
            resent = resent_reply(site, round_cfg, model, ledger)
            if resent is not None:
                return resent
            try:
                ledger.check(planned, site.privacy.epsilon)
            except BudgetExceededError as err:
                return declined(model, ledger.delta, ledger.spent(), str(err))
            reply = popularity_reply(site, data, model, share) if release else \
                gradient_step(site, data, round_cfg, model, share)
            reply.epsilon = ledger.record(round_cfg.training_id, round_cfg.server_round, planned).epsilon_after
            reply.delta = ledger.delta
            return keep_reply(site, round_cfg, reply)


def popularity_reply(site: SiteConfig, data: SiteData, model: FedRecModel, share: float) -> RoundReply:
    """The popularity release (fl_client.dp.popularity) with this site's share of σ_p, over its k users, sent as
    the global item bias plus release / k with k as the reply's users: the server's users-weighted average of
    the replies is then the global bias plus the union's release over all its users."""
    started = time.perf_counter()
    users = len(data.sequences.trainable_users())  # the users it releases, as the secure sum's roster counts them
    generator = torch.Generator().manual_seed(secrets.randbits(63))  # fresh entropy: the server cannot derive it
    released = private_popularity(data.sequences, model.config.num_item_rows, share, site.privacy.secure_mode,
                                  generator)
    bias = model.output.bias
    assert bias is not None  # dp_step_round refused a model without one
    with torch.no_grad():
        bias.add_(released.to(bias.dtype) / users)
    return RoundReply(state=wire.trainable_state(model), num_examples=users, train_loss=0.0, dp=True, epsilon=0.0,
                      delta=0.0, train_seconds=time.perf_counter() - started, peak_memory_mb=0.0)


def gradient_step(site: SiteConfig, data: SiteData, round_cfg: RoundConfig, model: FedRecModel,
                  share: float) -> RoundReply:
    """Minus (Σ clipped per-user gradients + N(0, (share·C)²)) / (q × users) as the model's new weights minus
    the old, from one Poisson sample at rate q (Opacus clips and noises; plain SGD at rate 1 applies it)."""
    users = data.sequences.trainable_users()
    expected = max(1, int(len(users) * round_cfg.ddp_sample_rate))  # Opacus' expected batch: what it divides by
    config = TrainConfig(batch_size=expected, lr=1.0, optimizer="sgd", epochs=1, device=site.device,
                         num_negatives=round_cfg.num_negatives, micro_batch_tokens=site.micro_batch_tokens,
                         micro_batch_users=site.micro_batch_users)
    privacy = replace(site.round_privacy(0.0, share), max_grad_norm=round_cfg.ddp_max_grad_norm)
    device = resolve_device(site.device)
    torch.nn.Module.to(model, device).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    generator = torch.Generator().manual_seed(secrets.randbits(63))  # fresh entropy: the server cannot derive it
    _, step_model, dp_optimizer, _ = make_private(model, optimizer, user_loader(users, expected, generator),
                                                  privacy, share)
    dp_optimizer.expected_batch_size = expected
    started = time.perf_counter()
    # Poisson sampling: from the OS CSPRNG in secure mode (as fl_client.dp.secure_rng samples a DP step's users)
    draws = secure_uniform(len(users)) if privacy.secure_mode else \
        np.random.default_rng(secrets.randbits(128)).random(len(users))
    sampled = users[draws < round_cfg.ddp_sample_rate]
    if len(sampled) == 0:  # no user sampled: the step is noise alone, as in central DP-SGD
        with torch.no_grad():
            for p in dp_optimizer.params:
                std = share * privacy.max_grad_norm
                p -= (secure_gaussian(p, std) if privacy.secure_mode else _generate_noise(std, p)) / expected
        loss = 0.0
    else:
        loss = private_step(step_model, model, data.sequences, [int(u) for u in sampled], dp_optimizer, privacy,
                            config, device)
    return RoundReply(state=wire.trainable_state(model.cpu()), num_examples=expected, train_loss=loss, dp=True,
                      epsilon=0.0, delta=0.0, train_seconds=time.perf_counter() - started,
                      peak_memory_mb=peak_memory_mb(device))
