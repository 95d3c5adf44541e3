"""The data-site ClientApp: thin Flower handlers that decode a Message, call the round functions, and reply.

Deployment starts a fresh process per message, so each imports only what it needs: an evaluate message no
training or DP code, and a secure-aggregation stage (keys, shares, unmask: six of a secure round's eight
messages) no torch, transformers or Opacus at all (tests/fl_client/test_client_app_imports.py).
`app` is the deployment entry point (settings from the SuperNode's --node-config); simulations build their
own app with `build_client_app` and a resolver that maps a simulated node to its site.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_client import secagg
from fl_client.dp.ledger import LedgerError
from fl_client.frozen_cache import FrozenTensorsError, frozen_tensors
from fl_client.round_config import (
    ModelMismatchError,
    ModelTooLargeError,
    NonFiniteModelError,
    RoundConfig,
    RoundConfigError,
    TrainingDivergedError,
)
from fl_client.site import SiteConfig, SiteData, SiteStartError, load_site_data
from shared_model import secure_sum, wire
from shared_model.catalog import CatalogMismatchError
from shared_model.console import quiet_library_warnings
from shared_model.npy import ArrayDataError, decode_array
from shared_model.secure_sum import SecureSumError, SecureSumSettings

if TYPE_CHECKING:
    import torch

    from fl_client.training_round import RoundReply

log = logging.getLogger(__name__)
SiteResolver = Callable[[Context], SiteConfig]
SecAggAnswer = tuple[secagg.SecAggState, dict[str, Any]]  # the state to keep, the SECAGG reply's fields
SecAggStep = Callable[[SiteConfig, dict, bytes, secagg.SecAggState], SecAggAnswer]  # one stage at the site
CATALOG_MISMATCH = 4001  # Error code of a refusal: the weights belong to another catalog
TRAINING_DIVERGED = 4002  # Error code of a round whose local training produced NaN/inf weights (nothing is sent)
FROZEN_TENSORS = 4003  # Error code: the frozen tensors were neither in the message nor intact at the site
WIRE_VERSION = 4004  # Error code: the server speaks another version of the wire protocol (shared_model.wire)
# The global model is refused before anything is trained or spent (fl_client.round_config.build_global_model):
MODEL_NOT_FINITE = 4005  # Error code: NaN or infinite global weights
MODEL_MISMATCH = 4006  # Error code: global weights of the wrong shape, dtype or names, or a config that cannot be built
MODEL_TOO_LARGE = 4007  # Error code: a model config over the site's max_model_parameters
ROUND_CONFIG = 4008  # Error code: a round config with a missing or mistyped key, or an unsafe training id or digest
LEDGER = 4009  # Error code: the site's ledger is missing, damaged, another site's, or locked too long (no ε = 0)
SITE_NOT_READY = 4010  # Error code: no trainable users, or too few for DP (SiteConfig.min_users)
SECURE_SUM = 4011  # Error code: a secure-aggregation step this site refuses (fl_client.secagg says why)
quiet_library_warnings()  # Opacus' and torch's notices a site cannot act on (shared_model.console)
SECAGG_STATE = "fedrec.secagg"  # Context.state record: this round's secure-aggregation secrets (never sent)
# What a handler answers with an Error reply instead of crashing the client process.
REFUSALS: dict[type[Exception], int] = {
    CatalogMismatchError: CATALOG_MISMATCH, TrainingDivergedError: TRAINING_DIVERGED,
    FrozenTensorsError: FROZEN_TENSORS, wire.WireVersionError: WIRE_VERSION, NonFiniteModelError: MODEL_NOT_FINITE,
    ModelMismatchError: MODEL_MISMATCH, ModelTooLargeError: MODEL_TOO_LARGE, RoundConfigError: ROUND_CONFIG,
    LedgerError: LEDGER, SiteStartError: SITE_NOT_READY, SecureSumError: SECURE_SUM}


def site_from_node_config(context: Context) -> SiteConfig:
    """Deployment: the SuperNode's --node-config names the site's files and privacy budget."""
    return SiteConfig.from_node_config(dict(context.node_config))


def metric_record(values: Mapping[str, float]) -> MetricRecord:
    """A MetricRecord of plain floats."""
    return MetricRecord({key: float(value) for key, value in values.items()})


def decode_config(msg: Message) -> RoundConfig:
    """The round's settings carried by a message, from a server speaking this site's wire version."""
    record = dict(msg.content.config_records[wire.CONFIG])
    if problem := wire.version_problem(record, "the server"):
        raise wire.WireVersionError(problem)
    return RoundConfig.from_record(record)


def refusal(msg: Message, site: SiteConfig, err: Exception) -> Message:
    """The Error reply to a message this site cannot serve (REFUSALS), logged at the site too."""
    log.error("site %s, %s message: %s", site.data_path, msg.metadata.message_type, err)
    code = next(code for kind, code in REFUSALS.items() if isinstance(err, kind))
    return Message(Error(code=code, reason=str(err)), reply_to=msg)


def notes(catalog_fingerprint: str, words: Mapping[str, str] | None = None) -> ConfigRecord:
    """The words every reply carries (wire.NOTES): this site's wire version and catalog fingerprint (the server
    checks both), and `words`."""
    return ConfigRecord({wire.WIRE_VERSION: wire.VERSION, wire.CATALOG_FINGERPRINT: catalog_fingerprint,
                         **(words or {})})


def decode(msg: Message, site: SiteConfig) -> tuple[SiteData, RoundConfig, dict[str, torch.Tensor]]:
    """The site's (cached) data, the round's settings and the global weights: the trainable ones the message
    carries, and the frozen ones it carries or the site kept from an earlier message."""
    round_cfg = decode_config(msg)
    if wire.ARRAYS not in msg.content.array_records:
        raise ModelMismatchError(f"the server's message carries no global weights ({wire.ARRAYS!r})")
    state = tensors(msg.content.array_records[wire.ARRAYS])
    sent = msg.content.array_records.get(wire.FROZEN)
    state.update(frozen_tensors(site, round_cfg.frozen_digest, tensors(sent) if sent else None))
    return load_site_data(site), round_cfg, state


def tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The server's tensors, each decoded against the dtype and shape it declares (shared_model.npy, never
    unpickling; a few µs a tensor where Flower's `to_torch_state_dict` parses every header); bytes that are not
    what they declare refuse the message (ModelMismatchError)."""
    import torch

    try:
        return {name: torch.from_numpy(decode_array(array, name)) for name, array in record.items()}
    except ArrayDataError as err:
        raise ModelMismatchError(f"the server's message: {err}") from err


def secagg_fields(msg: Message) -> tuple[dict, bytes]:
    """A secure-aggregation message's SECAGG record and its round tag."""
    record = msg.content.config_records.get(wire.SECAGG)
    tag = record.get("tag") if record is not None else None
    if record is None or not isinstance(tag, bytes):
        raise SecureSumError(f"secure aggregation: the message carries no {wire.SECAGG!r} record with a tag")
    return dict(record), tag


def secagg_state(context: Context) -> secagg.SecAggState:
    """This round's secure-aggregation state (empty before the keys stage)."""
    record = context.state.config_records.get(SECAGG_STATE)
    return secagg.SecAggState.from_record(dict(record)) if record is not None else secagg.SecAggState()


def opened_round(msg: Message, context: Context, round_cfg: RoundConfig,
                 evaluation: bool) -> tuple[dict, bytes, secagg.SecAggState]:
    """Stage 3 of a secure train or evaluate message: its SECAGG record, its tag (refused when it names another
    training, round or purpose) and this node's state with the neighbours' shares opened."""
    record, tag = secagg_fields(msg)
    secagg.check_tag(tag, round_cfg.training_id, round_cfg.server_round, evaluation)
    state = secagg_state(context)
    secagg.open_shares(state, tag, secagg.parse_sealed(record))
    return record, tag, state


def weights_content(reply: RoundReply, msg: Message, precision: str) -> dict[str, ArrayRecord]:
    """The trained weights as the server asked for them (wire.UPDATE_PRECISIONS): float32 the weights
    themselves; float16 their change from the global weights `msg` carried (half the bytes)."""
    if precision == "float32":
        return {wire.ARRAYS: ArrayRecord(reply.state)}
    start = tensors(msg.content.array_records[wire.ARRAYS])
    return {wire.UPDATE: ArrayRecord({name: (tensor.float() - start[name].float()).half()
                                      for name, tensor in reply.state.items()})}


def masked_content(reply: RoundReply, record: dict, state: secagg.SecAggState,
                   start: dict[str, torch.Tensor]) -> RecordDict:
    """The train reply under secure aggregation: the update only masked (a declined round sends a masked zero
    of weight 0), metrics and notes as usual."""
    if reply.item_weights is not None or reply.moments:
        raise SecureSumError("secure aggregation: per-item weights and shared optimiser moments would leave this "
                             "site in clear; the server must not ask for them with secure aggregation")
    if set(reply.state) != set(start):
        raise SecureSumError("secure aggregation: the trained weights do not have the names of the global weights")
    update = np.zeros(sum(v.numel() for v in start.values())) if reply.declined else \
        secagg.flat_update(reply.state, start)
    weight = 0 if reply.declined else reply.num_examples
    settings = SecureSumSettings.from_record(record)
    vector, clipped = secagg.mask_update(state, update, weight, int(record["max-weight"]), settings,
                                         np.random.default_rng())
    if clipped:
        log.warning("secure aggregation clipped %d of %d coordinates of this site's update to ±%g (the server's "
                    "strategy.secagg_clip)", clipped, len(update), settings.clip)
    return RecordDict({wire.MASKED: ArrayRecord({wire.MASKED: Array(vector)}),
                       wire.METRICS: metric_record(reply.metrics())})


def masked_evaluation(metrics: Mapping[str, float], record: dict, state: secagg.SecAggState) -> RecordDict:
    """The evaluate reply under secure aggregation: each metric's sum over the site's users and the user count,
    only masked (the server learns the sums over the sites); the metrics' names in clear."""
    settings = SecureSumSettings.from_record(record)
    if settings.modulus_bits != 64:  # masks mod 2^32 would leave the upper half of each 64-bit sum in clear
        raise SecureSumError(f"secure aggregation: evaluation sums need secagg modulus-bits 64, not "
                             f"{settings.modulus_bits}")
    names = sorted(k for k in metrics if k != wire.NUM_EXAMPLES)
    values = secure_sum.encode_sums([metrics[k] for k in names], int(metrics.get(wire.NUM_EXAMPLES, 0)))
    vector = secagg.add_masks(state, values, settings)
    return RecordDict({wire.MASKED: ArrayRecord({wire.MASKED: Array(vector)}),
                       wire.SECAGG: ConfigRecord({"names": names})})


def build_client_app(resolve_site: SiteResolver) -> ClientApp:
    """A ClientApp whose handlers find their site through `resolve_site` (a simulation registers them on its own
    app with `serve_sites`)."""
    return serve_sites(ClientApp(), resolve_site)


def serve_sites(app: ClientApp, resolve_site: SiteResolver) -> ClientApp:
    """Register fedrec's handlers on `app` (a ClientApp, or a subclass such as the simulation's); returns it."""

    @app.train()
    def handle_train(msg: Message, context: Context) -> Message:
        from fl_client.training_round import train_round  # DP training (Opacus): imported by train messages only

        site = resolve_site(context)
        secure = wire.SECAGG in msg.content.config_records
        try:
            data, round_cfg, state = decode(msg, site)
            if secure:  # the neighbours' shares are opened before anything is trained or spent
                record, tag, secure_state = opened_round(msg, context, round_cfg, evaluation=False)
            if round_cfg.ddp_sample_rate:  # distributed DP: one DP-SGD step, with this site's share of the noise
                from fl_client.distributed_dp import dp_step_round, noise_share

                share = noise_share(round_cfg, secure_state.fewest_summed() if secure else None)
                reply = dp_step_round(site, data, round_cfg, state, share)
            else:
                shared = msg.content.array_records.get(wire.OPTIMIZER_STATE)
                reply = train_round(site, data, round_cfg, state, tensors(shared) if shared else None)
            if secure:
                if secagg.released(site.state_dir, tag):
                    reply = replace(reply, num_examples=0, declined="this round's update was already sent into a "
                                    "secure sum: sending it again into another could reveal it")
                if reply.declined and round_cfg.ddp_sample_rate:
                    raise SecureSumError(f"distributed DP: declined ({reply.declined}); a site that takes no step "
                                         "sends nothing, so the others count noise only from sites that add it")
                # the global trainable weights, as decoded above (training copied them into its own model)
                start = {name: state[name] for name in msg.content.array_records[wire.ARRAYS]}
                content = masked_content(reply, record, secure_state, start)
                secagg.mark_released(site.state_dir, tag)
        except tuple(REFUSALS) as err:
            return refusal(msg, site, err)
        if reply.declined:
            log.warning("site %s declined round %d: %s", site.data_path, round_cfg.server_round, reply.declined)
        words = notes(data.catalog.fingerprint, {wire.DECLINED_REASON: reply.declined,
                                                 wire.FROZEN_HELD: round_cfg.frozen_digest})
        if secure:
            context.state[SECAGG_STATE] = ConfigRecord(secure_state.to_record())
            content[wire.NOTES] = words
            return Message(content=content, reply_to=msg)
        content = RecordDict({**weights_content(reply, msg, round_cfg.update_precision),
                              wire.METRICS: metric_record(reply.metrics()), wire.NOTES: words})
        if reply.item_weights is not None:
            content[wire.ITEM_WEIGHTS] = ArrayRecord({wire.ITEM_WEIGHTS: reply.item_weights})
        if reply.moments:
            content[wire.OPTIMIZER_STATE] = ArrayRecord(reply.moments)
        return Message(content=content, reply_to=msg)

    def secagg_stage(msg: Message, context: Context, step: SecAggStep) -> Message:
        """Run one secure-aggregation stage on the node's kept state; its SECAGG reply, or a refusal."""
        site = resolve_site(context)
        try:
            record, tag = secagg_fields(msg)
            state, fields = step(site, record, tag, secagg_state(context))
        except tuple(REFUSALS) as err:
            return refusal(msg, site, err)
        context.state[SECAGG_STATE] = ConfigRecord(state.to_record())
        return Message(RecordDict({wire.SECAGG: ConfigRecord(fields)}), reply_to=msg)

    @app.query(wire.SECAGG_KEYS_QUERY)
    def handle_secagg_keys(msg: Message, context: Context) -> Message:
        def keys(site: SiteConfig, record: dict, tag: bytes, _: secagg.SecAggState) -> SecAggAnswer:
            SecureSumSettings.from_record(record)
            users = len(load_site_data(site).sequences.trainable_users())
            state, (enc_key, mask_key) = secagg.make_keys(tag, context.node_id)
            return state, {"enc-key": enc_key, "mask-key": mask_key, "users": users}

        return secagg_stage(msg, context, keys)

    @app.query(wire.SECAGG_SHARES_QUERY)
    def handle_secagg_shares(msg: Message, context: Context) -> Message:
        def shares(_: SiteConfig, record: dict, tag: bytes, state: secagg.SecAggState) -> SecAggAnswer:
            sealed = secagg.make_shares(state, tag, secagg.parse_roster(record), SecureSumSettings.from_record(record))
            return state, {"destinations": list(sealed), "sealed": list(sealed.values())}

        return secagg_stage(msg, context, shares)

    @app.query(wire.SECAGG_UNMASK_QUERY)
    def handle_secagg_unmask(msg: Message, context: Context) -> Message:
        def unmask(_: SiteConfig, record: dict, tag: bytes, state: secagg.SecAggState) -> SecAggAnswer:
            survivors, dropped = secagg.parse_nodes(record, "survivors"), secagg.parse_nodes(record, "dropped")
            given = secagg.unmask_shares(state, tag, survivors, dropped)
            return state, {"nodes": list(given), "shares": list(given.values())}

        return secagg_stage(msg, context, unmask)

    @app.evaluate()
    def handle_evaluate(msg: Message, context: Context) -> Message:
        from fl_client.evaluation import evaluate_round  # the model (torch): imported by evaluate messages only

        site = resolve_site(context)
        secure = wire.SECAGG in msg.content.config_records
        try:
            data, round_cfg, state = decode(msg, site)
            if secure:
                record, tag, secure_state = opened_round(msg, context, round_cfg, evaluation=True)
            metrics = evaluate_round(site, data, round_cfg, state)
            if secure:
                if secagg.released(site.state_dir, tag):
                    raise SecureSumError("secure aggregation: this round's evaluation was already sent into a "
                                         "secure sum: sending it again into another could reveal it")
                content = masked_evaluation(metrics, record, secure_state)
                secagg.mark_released(site.state_dir, tag)
                context.state[SECAGG_STATE] = ConfigRecord(secure_state.to_record())
            else:
                content = RecordDict({wire.METRICS: metric_record(metrics)})
        except tuple(REFUSALS) as err:
            return refusal(msg, site, err)
        content[wire.NOTES] = notes(data.catalog.fingerprint)
        return Message(content=content, reply_to=msg)

    return app


app = build_client_app(site_from_node_config)
