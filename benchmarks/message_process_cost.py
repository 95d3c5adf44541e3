"""What a deployed site's message costs in CPU when it is a fresh process, as Flower's SuperNode runs each one.

python benchmarks/message_process_cost.py [--runs 4] [--code DIR ...]

A DP site (ε = 8, 60 users of the embedded synthetic generator, the demo's model size without title features) and
the same site without DP are prepared in a temporary folder and answer round 1 in this process (each parses its
events, the DP one searches σ, and each keeps that in its state dir, as a deployed site does at its first round).
Then each run starts a fresh Python process for a round-2 train message of each and one for an evaluate message,
each on its own copy of the state dir, and takes the child's CPU time (user + system) and wall time: its
imports, the handler, the reply. Flower's own process start
(its CLI and the SuperNode's connection) is left out: the same for any app.

`--code DIR` (repeatable): run the children with DIR first on PYTHONPATH (another checkout of fedrec, e.g. an
older commit), alternated run by run with the others, so one run prints the figures side by side.
"""

from __future__ import annotations

import argparse
import os
import pickle
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_client.client_app import build_client_app
from fl_client.dp.settings import PrivacyConfig
from fl_client.site import SiteConfig
from shared_model.catalog import ItemCatalog
from shared_model.configuration_fedrec import FedRecConfig
from shared_model.modeling_fedrec import FedRecModel
from simulations.synthetic import generate_events, write_events

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_message_cost import round_message

CHILD = """
import pickle, sys
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity
for name in ("_run_id", "_node_id", "_task_id"):
    setattr(TaskIdentity, name, 1)
with open(sys.argv[1], "rb") as handle:
    site, message = pickle.load(handle)
from fl_client.client_app import build_client_app
reply = build_client_app(lambda _context: site)(message, Context(run_id=1, node_id=2, node_config={},
                                                                 state=RecordDict(), run_config={}))
if reply.has_error():
    raise SystemExit(reply.error.reason)
"""


def child_cost(code: str, payload: Path) -> tuple[float, float]:
    """CPU seconds (user + system) and wall seconds of one fresh process answering the pickled message."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (code, os.environ.get("PYTHONPATH", "")) if p)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, str(payload)], env=env, cwd=code, capture_output=True,
                          text=True, check=False)  # `-c` puts the working directory first on sys.path
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"{code or 'this checkout'}: {done.stderr[-2000:]}")
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--code", action="append", default=[], help="another checkout's root (repeatable)")
    args = parser.parse_args()
    codes = [str(Path(__file__).resolve().parents[1])] + [str(Path(c).resolve()) for c in args.code]
    for name in ("_run_id", "_node_id", "_task_id"):  # what a running ClientApp process has set
        setattr(TaskIdentity, name, 1)
    folder = Path(tempfile.mkdtemp(prefix="fedrec-message-cost-"))
    log = generate_events(num_users=60, num_items=200, seed=3)
    catalog = ItemCatalog.from_events(log.frame)
    catalog.save(folder)
    site = SiteConfig(data_path=str(write_events(log, folder / "events.csv")),
                      catalog_path=str(folder / "catalog.json"), state_dir=str(folder / "state"),
                      privacy=PrivacyConfig(enabled=True, epsilon=8.0), device="cpu")
    plain = replace(site, state_dir=str(folder / "state-no-dp"), privacy=PrivacyConfig(enabled=False))
    messages = {"train (DP)": (site, "train"), "train (no DP)": (plain, "train"), "evaluate": (site, "evaluate")}
    config = FedRecConfig(num_items=len(catalog.item_ids), hidden_size=64, max_len=50, item_bias=True,
                          catalog_fingerprint=catalog.fingerprint)
    torch.manual_seed(0)
    initial = FedRecModel(config).state_dict()
    context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    for prepared in (site, plain):
        first = build_client_app(lambda _context, s=prepared: s)(round_message("train", 1, 5, config, catalog, initial),
                                                                 context)
        if first.has_error():
            raise SystemExit(first.error.reason)
    costs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for run in range(args.runs):
        for code in codes:
            for name, (answering, kind) in messages.items():
                state = folder / f"state-{run}-{codes.index(code)}-{name}"
                shutil.copytree(answering.state_dir, state)
                payload = folder / "message.pickle"
                with payload.open("wb") as handle:
                    pickle.dump((replace(answering, state_dir=str(state)),
                                 round_message(kind, 2, 5, config, catalog, initial)), handle)
                costs.setdefault((code, name), []).append(child_cost(code, payload))
    print(f"{os.cpu_count()} CPUs; torch {torch.__version__}; {args.runs} runs each, alternated")
    print("| code | message | CPU s (median, range) | wall s (median) |\n|---|---|---|---|")
    for (code, kind), rows in costs.items():
        cpu = [c for c, _ in rows]
        print(f"| {code} | {kind} | {statistics.median(cpu):.2f} ({min(cpu):.2f}-{max(cpu):.2f}) | "
              f"{statistics.median(w for _, w in rows):.2f} |")
    shutil.rmtree(folder)


if __name__ == "__main__":
    main()
