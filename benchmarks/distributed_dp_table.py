"""The distributed-DP table of BENCHMARKS.md from the runs of benchmarks/distributed_dp.sh.

python benchmarks/distributed_dp_table.py OUT_DIR

One row per run (central DP-SGD, distributed DP) and seed: test HR@10 and NDCG@10 after the last step (every
user's test event), the ε each reports (the central accountant's; the largest site ledger's), and a row with the
mean ± sd over the seeds of each.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def central(run: Path) -> tuple[float, float, float]:
    metrics = json.loads((run / "metrics.json").read_text())
    return metrics["test"]["hr@10"], metrics["test"]["ndcg@10"], metrics["privacy"]["epsilon"]


def distributed(run: Path) -> tuple[float, float, float]:
    last = json.loads((run / "server" / "summary.json").read_text())["history"][-1]
    return last["central_eval"]["hr@10"], last["central_eval"]["ndcg@10"], last["privacy"]["epsilon_max"]


def main(out: Path) -> None:
    print((out / "plan.txt").read_text().strip(), "\n")
    print("| run | seed | HR@10 | NDCG@10 | ε |")
    print("|---|---|---|---|---|")
    for name, read in (("central", central), ("distributed", distributed)):
        results = []
        for run in sorted(out.glob(f"{name}-*"), key=lambda p: p.name):
            if run.is_dir():
                try:
                    results.append(read(run))
                except (FileNotFoundError, KeyError):
                    print(f"| {name} | {run.name.split('-', 1)[1]} | unfinished | | |")
                    continue
                hr, ndcg, eps = results[-1]
                print(f"| {name} | {run.name.split('-', 1)[1]} | {hr:.4f} | {ndcg:.4f} | {eps:.3f} |")
        if len(results) > 1:
            hrs, ndcgs = [r[0] for r in results], [r[1] for r in results]
            print(f"| **{name}, mean ± sd** | {len(results)} seeds | {statistics.fmean(hrs):.4f} ± "
                  f"{statistics.stdev(hrs):.4f} | {statistics.fmean(ndcgs):.4f} ± {statistics.stdev(ndcgs):.4f} | |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
