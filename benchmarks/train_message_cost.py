"""What one train message costs a site beyond its training (issue: scale and speed, item 2).

python benchmarks/train_message_cost.py [--rounds 8] [--users 20] [--hidden 64] [--no-dp] [--items 200]
                                        [--feature-dim 0]

A DP site (ε = 8; without DP with --no-dp) of `users` users of the embedded synthetic generator, with its state
dir, answers `rounds` train messages through the ClientApp's handler, driven by hand as
tests/fl_client/test_client_app.py does (no Flower engine, no Ray). The model is the demo's size (hidden 64, 2
blocks, item bias) over a catalog of `items` (the users' items and made-up ones), with `feature-dim` public
features an item when asked (frozen tensors: sent with the first message, then kept at the site). Prints each
message's handler time and the site's reported training time; then a profile of the last message (the first
also parses the events and searches σ, which the site then keeps on disk; the second waits until the files the
first wrote are old enough for a process to keep what it reads from them, fl_client.site.RACY_NS).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_client import site as site_module
from fl_client.client_app import build_client_app
from fl_client.dp.settings import PrivacyConfig
from fl_client.site import SiteConfig
from shared_model import wire
from shared_model.catalog import ItemCatalog
from shared_model.configuration_fedrec import FedRecConfig
from shared_model.modeling_fedrec import FedRecModel
from simulations.synthetic import generate_events, write_events


def round_message(kind: str, server_round: int, num_rounds: int, config: FedRecConfig, catalog: ItemCatalog,
                  initial: dict[str, torch.Tensor]) -> Message:
    """A `kind` message of round `server_round` of `num_rounds` (1 local epoch, batch 32, Adam at lr 0.003), with
    the global weights `initial` as the server sends them: the trainable ones, and the frozen ones (public item
    features) in the first round only."""
    record: dict[str, Any] = {
        wire.WIRE_VERSION: wire.VERSION, wire.SERVER_ROUND: server_round, wire.TRAINING_ID: "train-1",
        wire.NUM_ROUNDS: num_rounds, wire.LOCAL_EPOCHS: 1, wire.BATCH_SIZE: 32, wire.LEARNING_RATE: 0.003,
        wire.OPTIMIZER: "adam", wire.MODEL_CONFIG: config.to_json_string(),
        wire.CATALOG_FINGERPRINT: catalog.fingerprint}
    model = FedRecModel(config)  # not the site's build_global_model: its process keeps models between messages
    model.load_state_dict(initial)
    trainable, content = wire.trainable_state(model), RecordDict()
    if frozen := {k: v for k, v in wire.full_state(model).items() if k not in trainable}:
        record[wire.FROZEN_DIGEST] = wire.tensors_digest(frozen)  # as the server: sent with the first message
        if server_round == 1:
            content[wire.FROZEN] = ArrayRecord(frozen)
    content[wire.ARRAYS], content[wire.CONFIG] = ArrayRecord(trainable), ConfigRecord(record)
    return Message(content=content, message_type=kind, dst_node_id=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--no-dp", action="store_true", help="a site that trains without DP")
    parser.add_argument("--items", type=int, default=200, help="catalog size (Beauty: 12101)")
    parser.add_argument("--feature-dim", type=int, default=0, help="public item features a row (titles: 384)")
    args = parser.parse_args()
    for name in ("_run_id", "_node_id", "_task_id"):  # what a running ClientApp process has set
        setattr(TaskIdentity, name, 1)
    folder = Path(tempfile.mkdtemp())
    log = generate_events(num_users=args.users, num_items=min(args.items, 200), seed=3)
    used = sorted(set(log.frame["item_id"]))
    catalog = ItemCatalog.from_items(used + [f"extra{k:07d}" for k in range(args.items - len(used))])
    catalog.save(folder)
    site = SiteConfig(data_path=str(write_events(log, folder / "events.csv")),
                      catalog_path=str(folder / "catalog.json"), state_dir=str(folder / "state"),
                      privacy=PrivacyConfig(enabled=not args.no_dp, epsilon=8.0), device="cpu",
                      min_users=min(args.users, 50))
    config = FedRecConfig(num_items=len(catalog.item_ids), hidden_size=args.hidden, max_len=50, item_bias=True,
                          feature_dim=args.feature_dim, catalog_fingerprint=catalog.fingerprint)
    torch.manual_seed(0)
    initial = FedRecModel(config).state_dict()
    app = build_client_app(lambda _context: site)
    profile = cProfile.Profile()
    for server_round in range(1, args.rounds + 1):
        msg = round_message("train", server_round, 20, config, catalog, initial)
        context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
        last = server_round == args.rounds
        start = time.perf_counter()
        if last:
            profile.enable()
        reply = app(msg, context)
        if last:
            profile.disable()
        seconds = time.perf_counter() - start
        if reply.has_error():
            raise SystemExit(f"round {server_round}: {reply.error.reason}")
        trained = float(reply.content.metric_records[wire.METRICS][wire.TRAIN_SECONDS])  # type: ignore[arg-type]
        print(f"round {server_round}: handler {seconds * 1000:.0f} ms, training {trained * 1000:.0f} ms, "
              f"the rest {(seconds - trained) * 1000:.0f} ms")
        if server_round == 1:  # a site's next message comes a round later, when the files its first one wrote
            time.sleep(getattr(site_module, "RACY_NS", 0) / 1e9)  # have settled (fl_client.site.FileMemo)
    pstats.Stats(profile).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
