"""What the server asks of a site for one round (RoundConfig, parsed and checked once) and the global model it
sends, rebuilt only once it passes the site's checks.

Nothing here trains or imports Opacus: a deployment starts a fresh process for every message, and an evaluate
message's process never pays for importing the DP machinery (fl_client.training_round trains).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from fl_client import model_store
from fl_client.site import MAX_MODEL_PARAMETERS
from shared_model import wire

if TYPE_CHECKING:  # imported where the model is built: the protocol stages import no torch (fl_client.client_app)
    import torch

    from shared_model.modeling_fedrec import FedRecModel

# RoundConfig field -> (wire key, type it is parsed to).
ROUND_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "server_round": (wire.SERVER_ROUND, int), "training_id": (wire.TRAINING_ID, str),
    "num_rounds": (wire.NUM_ROUNDS, int), "local_epochs": (wire.LOCAL_EPOCHS, int),
    "batch_size": (wire.BATCH_SIZE, int), "lr": (wire.LEARNING_RATE, float), "optimizer": (wire.OPTIMIZER, str),
    "model_config": (wire.MODEL_CONFIG, str), "catalog_fingerprint": (wire.CATALOG_FINGERPRINT, str),
}
OPTIONAL_ROUND_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "proximal_mu": (wire.PROXIMAL_MU, float), "weight_decay": (wire.WEIGHT_DECAY, float),
    "num_negatives": (wire.NUM_NEGATIVES, int), "seed": (wire.SEED, int),
    "keep_optimizer_state": (wire.KEEP_OPTIMIZER_STATE, bool), "item_rows": (wire.ITEM_ROWS, str),
    "share_optimizer_state": (wire.SHARE_OPTIMIZER_STATE, bool), "frozen_digest": (wire.FROZEN_DIGEST, str),
    "ddp_sample_rate": (wire.DDP_SAMPLE_RATE, float), "ddp_noise_multiplier": (wire.DDP_NOISE, float),
    "ddp_max_grad_norm": (wire.DDP_CLIP, float), "ddp_colluders": (wire.DDP_COLLUDERS, int),
    "ddp_popularity_noise": (wire.DDP_POPULARITY, float), "update_precision": (wire.UPDATE_PRECISION, str),
}

# A training id names files in the site's state dir: lowercase letters, digits and "-" only (the server sends a
# uuid4 hex), so it can neither leave the folder nor map two ids to one file (nor differ by case only).
TRAINING_ID = re.compile(r"[a-z0-9-]{1,64}")
FROZEN_DIGEST = re.compile(r"[0-9a-f]{64}")  # a SHA-256 hex digest (wire.tensors_digest), also a file name


class RoundConfigError(ValueError):
    """The server's round settings are missing a key, have a value of the wrong type or out of range, an unsafe
    id, or a plan of more steps than the site takes."""


class GlobalModelError(ValueError):
    """The server's global model is one this site will not train or evaluate (nothing is spent)."""


class NonFiniteModelError(GlobalModelError):
    """Some of the global weights are NaN or infinite."""


class ModelMismatchError(GlobalModelError):
    """The global weights do not fit the model config (keys, shapes, dtypes), or the config cannot be built."""


class ModelTooLargeError(GlobalModelError):
    """The model config is larger than the site allows (SiteConfig.max_model_parameters)."""


def check_training_id(training_id: str) -> str:
    """`training_id` when it is safe as a file name in the state dir; RoundConfigError otherwise."""
    if not TRAINING_ID.fullmatch(training_id):
        raise RoundConfigError(f"round config {wire.TRAINING_ID}={training_id[:80]!r}: expected 1-64 lowercase "
                               "letters, digits or '-' (it names files in the site's state dir)")
    return training_id


def check_frozen_digest(digest: str) -> str:
    """`digest` when it is 64 lowercase hex characters (a SHA-256); RoundConfigError otherwise."""
    if not FROZEN_DIGEST.fullmatch(digest):
        raise RoundConfigError(f"round config {wire.FROZEN_DIGEST}={digest[:80]!r}: expected a SHA-256 digest, 64 "
                               "lowercase hex characters (it names a file in the site's state dir)")
    return digest


@dataclass
class RoundConfig:
    """What the server asks of a site for one round (never noise, clipping or budget)."""

    server_round: int
    training_id: str  # the same across server restarts, so a resent round is recognised
    num_rounds: int
    local_epochs: int
    batch_size: int
    lr: float
    optimizer: str
    model_config: str  # FedRecConfig JSON
    catalog_fingerprint: str
    proximal_mu: float = 0.0  # sent by Flower's FedProx; absent for every other strategy
    weight_decay: float = 0.0
    num_negatives: int = 0
    seed: int = 0  # seeds sampling and dropout without DP (a DP site draws fresh entropy every round)
    keep_optimizer_state: bool = False  # the site carries its optimiser state (Adam moments) across rounds
    item_rows: str = "average"  # wire.ITEM_ROW_MODES: counts asks the site for per-item weights
    share_optimizer_state: bool = False  # start from the server's average of the sites' moments; send ours back
    frozen_digest: str = ""  # names the run's frozen tensors, which the site keeps once sent (fl_client.frozen_cache)
    ddp_sample_rate: float = 0.0  # > 0: a distributed-DP round, one DP-SGD step (fl_client.distributed_dp)
    ddp_noise_multiplier: float = 0.0  # σ of the sum over the sites
    ddp_max_grad_norm: float = 0.0  # C
    ddp_colluders: int = 0  # sites assumed to collude with the server
    ddp_popularity_noise: float = 0.0  # > 0: this round releases item popularity at σ_p instead of a step
    update_precision: str = "float32"  # wire.UPDATE_PRECISIONS: float16 replies with the update in half precision

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RoundConfig:
        """Parse the round's ConfigRecord, naming any missing key (the optional keys have defaults)."""
        missing = [key for key, _ in ROUND_FIELDS.values() if key not in record]
        if missing:
            raise RoundConfigError(f"round config from the server lacks {missing}")
        fields = {**ROUND_FIELDS, **{k: v for k, v in OPTIONAL_ROUND_FIELDS.items() if v[0] in record}}
        values = {}
        for name, (key, cast) in fields.items():
            try:
                values[name] = cast(record[key])
            except (TypeError, ValueError, OverflowError) as err:
                raise RoundConfigError(f"round config {key}={str(record[key])[:80]!r}: not a {cast.__name__}") from err
        parsed = cls(**values)
        if parsed.item_rows not in wire.ITEM_ROW_MODES:
            raise RoundConfigError(f"round config asks for {wire.ITEM_ROWS}={parsed.item_rows!r}; this site knows "
                                   f"{', '.join(wire.ITEM_ROW_MODES)}")
        if parsed.update_precision not in wire.UPDATE_PRECISIONS:
            raise RoundConfigError(f"round config asks for {wire.UPDATE_PRECISION}={parsed.update_precision!r}; this "
                                   f"site knows {', '.join(wire.UPDATE_PRECISIONS)}")
        check_training_id(parsed.training_id)
        check_ranges(parsed)
        if parsed.num_negatives < 0:
            raise RoundConfigError(f"round config asks for {wire.NUM_NEGATIVES}={parsed.num_negatives}: needs 0 (the "
                                   f"full softmax) or a number of negatives")
        if parsed.frozen_digest:
            check_frozen_digest(parsed.frozen_digest)
        if parsed.ddp_sample_rate and not (parsed.ddp_sample_rate <= 1 and parsed.ddp_noise_multiplier > 0
                                           and parsed.ddp_max_grad_norm > 0 and parsed.ddp_colluders >= 0):
            raise RoundConfigError(f"round config asks for distributed DP with q = {parsed.ddp_sample_rate}, "
                                   f"σ = {parsed.ddp_noise_multiplier}, C = {parsed.ddp_max_grad_norm}, "
                                   f"{parsed.ddp_colluders} colluders: needs 0 < q <= 1, σ > 0, C > 0, colluders >= 0")
        if parsed.ddp_popularity_noise and not (0 < parsed.ddp_popularity_noise < math.inf and parsed.ddp_sample_rate
                                                and parsed.server_round == 0):
            raise RoundConfigError(f"round config asks for a popularity release ({wire.DDP_POPULARITY}="
                                   f"{parsed.ddp_popularity_noise}) in round {parsed.server_round}: a release is "
                                   "round 0 of a distributed-DP training, at a finite positive σ")
        return parsed


def check_ranges(cfg: RoundConfig) -> None:
    """Refuse counts and rates no server means: a batch size or epoch count of 0 crashed the site's plan with a
    division by zero, a negative round count made its σ search NaN, and a negative distributed-DP q passed."""
    counts = {wire.SERVER_ROUND: (cfg.server_round, 0), wire.NUM_ROUNDS: (cfg.num_rounds, 1),
              wire.LOCAL_EPOCHS: (cfg.local_epochs, 1), wire.BATCH_SIZE: (cfg.batch_size, 1)}
    for key, (value, least) in counts.items():
        if value < least:
            raise RoundConfigError(f"round config {key}={value}: needs at least {least}")
    rates = {wire.LEARNING_RATE: cfg.lr, wire.PROXIMAL_MU: cfg.proximal_mu, wire.WEIGHT_DECAY: cfg.weight_decay,
             wire.DDP_SAMPLE_RATE: cfg.ddp_sample_rate}
    for key, rate in rates.items():
        if not (math.isfinite(rate) and rate >= 0):
            raise RoundConfigError(f"round config {key}={rate}: needs a finite number >= 0")


class TrainingDivergedError(ValueError):
    """Training produced non-finite weights (NaN or inf): nothing trained this way should be sent or saved."""


def build_global_model(round_cfg: RoundConfig, state: Mapping[str, torch.Tensor],
                       max_parameters: int = MAX_MODEL_PARAMETERS) -> FedRecModel:
    """The server's model, rebuilt from its config and weights once both pass the site's checks: the config
    within `max_parameters` numbers (counted before anything is allocated), every tensor of the right shape
    and dtype, all finite. Raises a GlobalModelError naming what is wrong."""
    from shared_model.configuration_fedrec import FedRecConfig
    from shared_model.modeling_fedrec import FedRecModel

    size, expected = config_shapes(round_cfg.model_config)
    if size > max_parameters:
        raise ModelTooLargeError(f"the server's model config asks for {size:,} weights and buffers, over this site's "
                                 f"max_model_parameters={max_parameters:,} (--max-model-parameters)")
    check_global_state(expected, state)
    config = FedRecConfig.from_dict(json.loads(round_cfg.model_config))
    if round_cfg.num_negatives > config.num_items:
        raise RoundConfigError(f"round config asks for {wire.NUM_NEGATIVES}={round_cfg.num_negatives} negatives of "
                               f"a catalog of {config.num_items} items")
    model = model_store.untrained_model(round_cfg.model_config, lambda: FedRecModel(config),
                                       keep=size <= model_store.TEMPLATE_MAX_NUMBERS)
    try:
        wire.load_state(model, state)
    except (ValueError, RuntimeError) as err:
        raise ModelMismatchError(f"the server's global weights: {err}") from err
    return model


@contextmanager
def global_model(round_cfg: RoundConfig, state: Mapping[str, torch.Tensor],
                 max_parameters: int = MAX_MODEL_PARAMETERS) -> Iterator[FedRecModel]:
    """`build_global_model` for one message's use: afterwards a process that answers many messages (a simulated
    sites' worker) takes the model back for its next one (fl_client.model_store.take_back), so nothing may
    hold on to it past the `with` (replies carry copies of its weights)."""
    model = build_global_model(round_cfg, state, max_parameters)
    try:
        yield model
    finally:
        model_store.take_back(round_cfg.model_config, model)


RANDOM_INITS = frozenset({"normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                          "xavier_uniform_", "xavier_normal_"})


def skip_random_init() -> Any:
    """A torch function mode in which torch.nn.init's random fills and Tensor.normal_ / uniform_ leave their tensor
    as it is: for a skeleton on the meta device, which holds no values. There each random fill runs Python
    reference code whose first call imports torch._dynamo: 2.2 s of CPU, in every evaluate message's process
    (training imports it anyway, through the optimizer)."""
    from torch.overrides import TorchFunctionMode

    class SkipRandomInit(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                               kwargs: dict[str, Any] | None = None) -> Any:
            kwargs = kwargs or {}
            if getattr(func, "__name__", "") in RANDOM_INITS:  # torch.nn.init passes its tensor by keyword
                return args[0] if args else kwargs["tensor"]
            return func(*args, **kwargs)

    return SkipRandomInit()


@lru_cache(maxsize=4)
def config_shapes(model_config: str) -> tuple[int, Mapping[str, tuple[tuple[int, ...], torch.dtype]]]:
    """The number of weights and buffers a model config asks for, and each state tensor's shape and dtype, from a
    skeleton on the meta device (no memory, whatever size the config asks for), built without its random
    initialisation (skip_random_init). Cached per process: a simulated site's worker answers many messages of one
    config (a refused config raises and is not cached)."""
    import torch

    from shared_model.configuration_fedrec import FedRecConfig
    from shared_model.modeling_fedrec import FedRecModel

    try:
        with torch.device("meta"), skip_random_init():
            skeleton = FedRecModel(FedRecConfig.from_dict(json.loads(model_config)))
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, OverflowError) as err:
        raise ModelMismatchError(f"the server's model config ({wire.MODEL_CONFIG}) cannot be built: {err}") from err
    size = sum(t.numel() for t in skeleton.parameters()) + sum(t.numel() for t in skeleton.buffers())
    return size, MappingProxyType({name: (tuple(t.shape), t.dtype) for name, t in skeleton.state_dict().items()})


def check_global_state(expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                       state: Mapping[str, torch.Tensor]) -> None:
    """Every tensor of the global state has the shape and dtype the model config gives it (`expected`, from
    config_shapes), and is finite (missing and unexpected names are wire.load_state's to refuse)."""
    wrong = [f"{name}: {tuple(tensor.shape)} {tensor.dtype}, expected {expected[name][0]} {expected[name][1]}"
             for name, tensor in state.items()
             if name in expected and (tuple(tensor.shape) != expected[name][0] or tensor.dtype != expected[name][1])]
    if wrong:
        raise ModelMismatchError(f"the server's global weights do not fit its model config: {'; '.join(wrong[:5])}"
                                 + (f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else ""))
    if bad := wire.non_finite(state):
        raise NonFiniteModelError(f"the server's global model holds NaN or infinite values in {', '.join(bad[:5])}"
                                  + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
                                  + ": refusing it before training or spending any ε (a server-side problem)")
