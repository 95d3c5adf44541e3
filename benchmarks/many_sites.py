"""Round time and peak memory of fedrec-simulate against the number of sites (issue: scale and speed).

python benchmarks/many_sites.py OUT_DIR [HYDRA OVERRIDES of fedrec-simulate ...] [--sites 100 300 1000]
                                [--per-round 50] [--users-per-site 20] [--rounds 5] [--preset NAME]
(the overrides before the options: --sites takes every number after it)

For each number of sites N: the embedded synthetic generator with N x users-per-site users, split iid over N
sites (or, with --preset, that preset's data and partition into N sites, e.g. fed_beauty_dp's Dirichlet merchants
over Beauty's users), `per-round` of them asked to train each round (strategy.fraction_train); only the last round is
evaluated (federation.eval_every), and the server's own central evaluation is off (its cost grows with the
users, not the sites). While the run goes, the memory of the whole process tree (the driver, Ray's processes and
the simulated sites' workers; proportional set size, so shared pages count once) is read whenever the tree's
resident size, checked twice a second, reaches a new high (a proportional size that grows while the resident
size does not grow by 1% goes unseen). From metrics.jsonl, over the rounds between the first (which also builds
the server's model and each site's first data cache) and the last (evaluated): the median round time, the
sites' own training time per round (the sum of their train-seconds over the CPUs training at once) and the
rest, the framework's overhead per round: messages, building the model at each site, aggregation, checkpoints.
One table row per N, and the machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def process_tree(root: int) -> list[int]:
    """`root` and every process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def rss_pages(pids: list[int]) -> int:
    """Resident pages of `pids` together (shared pages counted in each process): cheap, from /proc/PID/statm."""
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total


def pss_mib(pids: list[int]) -> float:
    """Proportional set size of `pids` together, MiB."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def run(sites: int, args: argparse.Namespace, overrides: list[str], out: Path) -> dict[str, float]:
    """One fedrec-simulate run with `sites` sites; its round times and peak memory."""
    run_dir = out / f"sites-{sites}"
    per_round = min(args.per_round, sites)
    data = ([f"+experiment={args.preset}"] if args.preset else
            ["partition=iid", f"data.synthetic.num_users={sites * args.users_per_site}"])
    command = [sys.executable, "-m", "simulations.simulate", *data, f"partition.num_partitions={sites}",
               f"strategy.min_nodes={per_round}",
               f"strategy.fraction_train={per_round / sites}", f"strategy.fraction_evaluate={per_round / sites}",
               f"federation.num_rounds={args.rounds}", f"federation.eval_every={args.rounds}",
               "federation.central_eval=false", *overrides,
               f"hydra.run.dir={run_dir}"]
    peak = 0.0
    with (out / f"sites-{sites}.log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            # PSS walks every process' page tables: 55 ms of CPU for the run's 10 processes, which twice a second
            # took 0.37 CPU-s a round (5% of the 2-core box) from the run it measured. It is read only when the
            # tree's resident size (cheap) reaches a new high.
            nonlocal peak
            highest = 0
            while not done.is_set():
                tree = process_tree(process.pid)
                if (resident := rss_pages(tree)) > highest * 1.01:
                    highest, peak = resident, max(peak, pss_mib(tree))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        done.set()
        sampler.join()
    if code:
        raise SystemExit(f"fedrec-simulate with {sites} sites failed (exit {code}): see {out}/sites-{sites}.log")
    rows = [json.loads(line) for line in (run_dir / "server" / "metrics.jsonl").read_text().splitlines()]
    rows = rows[:-1]  # the last round is also evaluated
    times = [b["seconds"] - a["seconds"] for a, b in itertools.pairwise(rows)]
    cpus = float(next((o.split("=", 1)[1] for o in overrides if o.startswith("federation.num_cpus=")), 2))
    compute = [r["site_cost"]["train_seconds_mean"] * r["train_replies"] / cpus for r in rows[1:]]
    return {"sites": sites, "per_round": per_round, "round_s": statistics.median(times),
            "compute_s": statistics.median(compute),
            "overhead_s": statistics.median(t - c for t, c in zip(times, compute, strict=True)), "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the runs and their logs")
    parser.add_argument("--sites", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--per-round", type=int, default=50, help="sites asked to train (and evaluate) a round")
    parser.add_argument("--users-per-site", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5, help="rounds per run (the first and last are not timed)")
    parser.add_argument("--preset", help="a fedrec-simulate preset (e.g. fed_beauty_dp: Dirichlet merchants over "
                        "Beauty's users) in place of the synthetic sites of --users-per-site users, split iid")
    args, overrides = parser.parse_known_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = [run(n, args, overrides, args.out) for n in args.sites]
    sites = f"preset {args.preset}" if args.preset else f"{args.users_per_site} users a site"
    print(f"machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs; "
          f"overrides: {' '.join(overrides) or '(none)'}; {sites}, {args.rounds} rounds\n")
    print("| sites | asked a round | round s (median) | sites' training s | overhead s | peak MiB (all processes) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['sites']} | {r['per_round']} | {r['round_s']:.1f} | {r['compute_s']:.1f} | {r['overhead_s']:.1f} "
              f"| {r['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
