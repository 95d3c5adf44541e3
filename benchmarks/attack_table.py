"""The robust-aggregation table of BENCHMARKS.md from the runs of benchmarks/robust_aggregation.sh.

python benchmarks/attack_table.py OUT_DIR

One row per aggregation rule, one column per attack: test HR@10 after the last round (central evaluation of
every user; the mean over seeds where a rule ran with several `train.seed`s, with their number), its change
against clean FedAvg (every clean FedAvg run with no norm bound or one of 10x the median: neither dropped
anything there, so they are the same computation), and the training replies the server's reply
checks dropped over the run (the norm bound; 2 a round when it catches both attackers).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import yaml

ATTACKS = ("none", "sign_flip", "scale", "noise")
CLEAN = [("fedavg (norm_bound_factor=0)", "none"), ("fedavg (norm_bound_factor=10)", "none")]


def run_settings(job: Path) -> dict[str, str]:
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    return dict(item.split("=", 1) for item in overrides)


def rule_name(settings: dict[str, str]) -> str:
    name = settings["strategy.name"]
    extras = [f"{key.split('.', 1)[1]}={value}" for key, value in settings.items()
              if key.startswith("strategy.") and key != "strategy.name"]
    return f"{name} ({', '.join(extras)})" if extras else name


def final_metrics(job: Path) -> tuple[float, int]:
    """HR@10 after the last round, and the training replies dropped over the run."""
    history = json.loads((job / "server" / "summary.json").read_text())["history"]
    return history[-1]["central_eval"]["hr@10"], sum(row.get("dropped", 0) for row in history)


def collect(out: Path) -> dict[tuple[str, str], list[tuple[float, int]]]:
    """(rule, attack) -> the (HR@10, dropped) of each finished run, whatever folder or seed it ran in."""
    runs: dict[tuple[str, str], list[tuple[float, int]]] = {}
    jobs = sorted(out.glob("*/[0-9]*"), key=lambda job: (len(job.parent.name), job.parent.name, int(job.name)))
    for job in jobs:  # in the order the folders were written (rule-2 before rule-10)
        if (job / "server" / "summary.json").exists():
            settings = run_settings(job)
            runs.setdefault((rule_name(settings), settings["attack.kind"]), []).append(final_metrics(job))
    return runs


def cell(results: list[tuple[float, int]], clean: float) -> str:
    hrs = [hr for hr, _ in results]
    mean = statistics.fmean(hrs)
    spread = f" ± {statistics.stdev(hrs):.4f} (n={len(hrs)})" if len(hrs) > 1 else ""
    return f"{mean:.4f}{spread} ({100 * (mean / clean - 1):+.0f}%, {sum(d for _, d in results)} dropped)"


def main(out: Path) -> None:
    runs = collect(out)
    reference = [result for key in CLEAN for result in runs.get(key, [])]
    assert all(dropped == 0 for _, dropped in reference), "a clean FedAvg run dropped replies"
    clean = statistics.fmean(hr for hr, _ in reference)
    rules = list(dict.fromkeys(rule for rule, _ in runs))
    print(f"| rule | {' | '.join(ATTACKS)} |")
    print(f"|---|{'---|' * len(ATTACKS)}")
    for rule in rules:
        cells = [cell(runs[rule, attack], clean) if (rule, attack) in runs else "" for attack in ATTACKS]
        print(f"| {rule} | {' | '.join(cells)} |")
    print(f"\nclean FedAvg HR@10 {clean:.4f} (mean of {len(reference)} runs), the reference of the percentages")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
