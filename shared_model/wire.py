"""What crosses the wire between server and sites, defined once for both sides: record keys, and which
tensors travel (trainable weights both ways; frozen public tensors only from the server, and once to each site,
which keeps them by their digest)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# The version of this protocol (the keys below, what each record holds, what the tensors mean). A server and a
# site of different versions refuse each other with a message naming both, never a misread record. Bump it on
# any change the other side would misread. 1: the first versioned protocol (frozen tensors sent once).
# 2: every site reply's NOTES also carries CATALOG_FINGERPRINT (the site's catalog), which the server checks.
# 3: secure aggregation (the SECAGG records and queries below).
# 4: under secure aggregation the evaluation is a secure sum too (its MASKED reply and the metrics' names).
# 5: the item-count query (model.trained_item_rows) and the model fields trained_item_rows and position_encoding
#    are gone (docs/tried.md).
# 6: a masked update ends with its weight's and clipped count's digits (secure_sum.encode_counts), not the two
#    counts themselves, so that a 16-bit secure sum (strategy.secagg_modulus_bits=16) adds them without wrapping.
VERSION = 6

# Record keys inside a Message's RecordDict.
ARRAYS = "arrays"  # ArrayRecord: trainable weights, no Opacus `_module.`
UPDATE = "update"  # ArrayRecord: a site's trained weights less the round's global ones, in UPDATE_PRECISION
FROZEN = "frozen"  # ArrayRecord: the run's frozen public tensors (server -> a site that does not hold them yet)
CONFIG = "config"  # ConfigRecord: what the server asks for this round
METRICS = "metrics"  # MetricRecord: what a site reports back
NOTES = "notes"  # ConfigRecord: words a site reports back (why it declined a round, which frozen tensors it keeps)
ITEM_WEIGHTS = "item-weights"  # ArrayRecord {ITEM_WEIGHTS: per-row weights} (site -> server, when asked)
OPTIMIZER_STATE = "optimizer-state"  # ArrayRecord of optimiser moments "<param>:<moment>" + MOMENTS_STEP (both ways)
# Secure aggregation (shared_model.secure_sum; the server's fl_server.secure_round, the site's fl_client.secagg):
# three query actions around the train (or evaluate) message, each carrying a SECAGG ConfigRecord both ways.
SECAGG = "secagg"  # ConfigRecord of the protocol's fields (keys, rosters, sealed shares, the settings)
SECAGG_KEYS_QUERY = "secagg_keys"  # stage 1: a site makes this round's key pairs and sends the public halves
SECAGG_SHARES_QUERY = "secagg_shares"  # stage 2: a site seals Shamir shares of its secrets for its neighbours
SECAGG_UNMASK_QUERY = "secagg_unmask"  # stage 4: a survivor sends the shares that remove the masks
MASKED = "masked"  # ArrayRecord {MASKED: a site's masked vector} (stage 3: the train or the evaluate reply)
MOMENTS_STEP = "step"  # its key of the optimiser's step count (the sites' mean)

# ConfigRecord key, both ways (the server's CONFIG, every site reply's NOTES).
WIRE_VERSION = "wire-version"  # the VERSION the sender speaks

# ConfigRecord keys (server -> site).
SERVER_ROUND = "server-round"  # set by Flower's strategies
TRAINING_ID = "training-id"  # stable across server restarts (unlike Flower's run id): keys the site's ledger
NUM_ROUNDS = "num-rounds"  # rounds the server plans in all (a site spreads its ε budget over them)
LOCAL_EPOCHS = "local-epochs"
BATCH_SIZE = "batch-size"
LEARNING_RATE = "lr"
OPTIMIZER = "optimizer"
MODEL_CONFIG = "model-config"  # FedRecConfig as JSON: the site rebuilds the same architecture
CATALOG_FINGERPRINT = "catalog-fingerprint"  # a site refuses weights made for another catalog
PROXIMAL_MU = "proximal-mu"  # FedProx' term, set by Flower's FedProx
WEIGHT_DECAY = "weight-decay"
NUM_NEGATIVES = "num-negatives"
SEED = "seed"  # seeds local sampling and dropout without DP (never a DP site's noise)
KEEP_OPTIMIZER_STATE = "keep-optimizer-state"  # sites carry their optimiser state across rounds
SHARE_OPTIMIZER_STATE = "share-optimizer-state"  # sites start from the average of the sites' optimiser states
ITEM_ROWS = "item-rows"  # how the item table's rows are aggregated (one of ITEM_ROW_MODES)
UPDATE_PRECISION = "update-precision"  # float16: a site replies with its UPDATE in half precision, not ARRAYS
FROZEN_DIGEST = "frozen-digest"  # tensors_digest of the run's frozen tensors ("" when there are none)
# Distributed DP (fl_client.distributed_dp): a round is one DP-SGD step over the union of the sites' users.
DDP_SAMPLE_RATE = "ddp-sample-rate"  # q: every site Poisson-samples its users at this rate (present = a DDP round)
DDP_NOISE = "ddp-noise-multiplier"  # σ of the summed update, in units of DDP_CLIP
DDP_CLIP = "ddp-max-grad-norm"  # C: every site clips each user's gradient to this L2 norm
DDP_POPULARITY = "ddp-popularity-noise"  # σ_p: round 0 releases item popularity, no step (fl_client.distributed_dp)
DDP_COLLUDERS = "ddp-colluders"  # t: sites assumed to collude with the server (their noise shares do not count)

# How the server aggregates the rows of the item table (item embeddings, output layer):
#   average  every row like any other weight: weighted by the sites' users (Flower's FedAvg);
#   counts   row r weighted by each site's count of item r in its training events.
# counts needs each site to send per-item weights; sites training with DP refuse (see fl_client).
ITEM_ROW_MODES = ("average", "counts")
# How a site sends its trained weights: float32 the weights themselves (ARRAYS); float16 their change from the
# round's global weights (UPDATE), half the bytes, which the server adds back to its float32 weights.
UPDATE_PRECISIONS = ("float32", "float16")

# MetricRecord keys (site -> server).
NUM_EXAMPLES = "num-examples"  # users trained on / evaluated (FedAvg's weighting key)
TRAIN_LOSS = "train-loss"
TRAIN_CE = "train-ce"  # the global model's per-user mean cross-entropy on the training events, dropout off
VALID_NDCG10 = "valid-ndcg@10"  # NDCG@10 on the validation events: picks the best round (never the test split)
DECLINED = "declined"  # 1 when the site refused to train (budget); its arrays are then not aggregated
DP_ENABLED = "dp"  # 1 when the site trained with DP-SGD
EPSILON = "epsilon"  # the site's cumulative ε after this round (only meaningful when dp == 1)
DELTA = "delta"
TRAIN_SECONDS = "train-seconds"  # the site's local training time this round (0 when it declined)
PEAK_MEMORY_MB = "peak-memory-mb"  # its peak in training: CUDA allocator on a GPU, process resident set on CPU

# ConfigRecord keys (site -> server).
DECLINED_REASON = "declined-reason"  # "" when the site trained
FROZEN_HELD = "frozen-held"  # the FROZEN_DIGEST the site keeps on its disk: the server need not send them again


class WireVersionError(ValueError):
    """The other side speaks another version of this protocol."""


def version_problem(record: Mapping[str, Any], sender: str) -> str:
    """"" when `record` (a server's CONFIG or a site's NOTES) names this build's VERSION; otherwise why the
    two sides cannot work together, naming both versions."""
    theirs = record.get(WIRE_VERSION)
    if theirs == VERSION:
        return ""
    said = f"version {theirs}" if theirs is not None else "no version (a fedrec build from before wire versions)"
    return (f"{sender} speaks fedrec wire protocol {said}, this side version {VERSION}: run the same fedrec "
            "release at the server and at every site")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights training changes, each once (a tied item table travels under one name), detached copies.

    This is what a site sends back: frozen tensors (public item features, a frozen item table) never change
    at a site, so they never travel upstream.
    """
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable weights plus frozen parameters and buffers, each tensor once: what the server sends."""
    persistent = set(model.state_dict())
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    state.update({name: b.detach().clone() for name, b in model.named_buffers() if name in persistent})
    return state


def load_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, trainable_only: bool = False) -> None:
    """Load wire tensors into `model`; missing tensors are allowed only where they are aliases of a tied
    table or (with `trainable_only`) frozen. Anything else missing or unexpected is an error naming it."""
    result = model.load_state_dict(dict(state), strict=False)
    persistent = set(model.state_dict())
    once = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    allowed = persistent - once  # second names of tied tensors
    if trainable_only:
        allowed |= persistent - {name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(result.missing_keys) - allowed)
    if missing or result.unexpected_keys:
        unexpected = sorted(result.unexpected_keys)
        raise ValueError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold a NaN or an infinity, in `tensors`' order.

    One norm over all of them first (`torch.nn.utils.get_total_norm`, a few fused kernels): it is finite only
    when every element is, so the usual answer, none, costs 0.17-0.23 ms for the demo model's 42 tensors where a
    check per tensor cost 1.0 ms, and one device sync instead of one per tensor. Only a norm that is not finite
    (a NaN or an infinity, or finite weights so large that their squares overflow) looks tensor by tensor."""
    import torch  # not at the top: see fl_client.client_app (protocol messages import no torch)

    floating = [(name, tensor.detach()) for name, tensor in tensors.items() if tensor.is_floating_point()]
    if not floating or bool(torch.isfinite(torch.nn.utils.get_total_norm([t for _, t in floating]))):
        return []
    return [name for name, tensor in floating if not bool(torch.isfinite(tensor).all())]


def tensors_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes: equal digests mean bit-identical tensors."""
    import torch  # not at the top: see fl_client.client_app (protocol messages import no torch)

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
