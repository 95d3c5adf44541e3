"""One table for many runs: what a sweep (`fedrec-simulate -m ...`) varied against what each job reached.

At the end of every multirun, Hydra calls `SweepComparison` (registered in conf/simulate.yaml), which writes
`comparison.md`, `comparison.json` and `comparison.png` (HR@10 against rounds) into the sweep directory.
Runs made one by one compare the same way: `python -m simulations.compare --out DIR RUN_DIR [RUN_DIR ...]`.

Each row is one run directory: a federated run (its `server/summary.json`), a local-only baseline
(`local/summary.json`) or a centralized run of `fedrec-centralized` (`metrics.json`, whose multiruns end with
the same comparison). Scores are the sites' test figures (user-weighted over every site's users; the
server's central ones when the sites scored nothing), ± one standard error over users, at the best round
(chosen on validation) and at the last. The privacy column is the run's own claim: a run with DP off at any
site says so and claims nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fl_server.report import dp_spent, plot, trained_rows
from shared_model.metrics import with_error
from shared_model.privacy_claim import privacy_claim

log = logging.getLogger(__name__)
SCORES = (("HR@10", "hr@10"), ("NDCG@10", "ndcg@10"))


def job_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides Hydra recorded for the run ([] for a directory Hydra did not write)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in yaml.safe_load(path.read_text(encoding="utf-8")) or []] if path.exists() else []


def scores(row: dict[str, Any] | None) -> dict[str, Any]:
    """A round's test figures: the sites' when they scored, else the server's (empty when not evaluated)."""
    row = row or {}
    return row.get("federated_eval") or row.get("central_eval") or {}


def federated_claim(rows: list[dict[str, Any]]) -> str:
    """A federated run's privacy in one cell: ε spent (max and mean over sites) and δ, or no claim."""
    if not trained_rows(rows):
        return "nothing trained"
    spent = dp_spent(rows)
    if spent is None:
        return privacy_claim(None, no_dp_reason="DP off at some site")
    return privacy_claim(spent["epsilon_max"], spent["delta_max"], unit="user of a site", upper_bound=True,
                         mechanism=f"at {spent['sites_with_dp']} sites (ε mean {spent['epsilon_mean']:.3f})")


def local_claim(privacy: dict[str, Any]) -> str:
    """A local-only or centralized run's privacy in one cell: its own claim, or no claim when DP was off."""
    return str(privacy["claim"]) if privacy.get("dp") else privacy_claim(None)


def collect(run_dir: Path) -> dict[str, Any]:
    """What one run reached, from the summary it wrote (a job that wrote none is reported as such)."""
    run: dict[str, Any] = {"run": str(run_dir), "overrides": job_overrides(run_dir)}
    federated, local = run_dir / "server" / "summary.json", run_dir / "local" / "summary.json"
    if federated.exists():
        summary = json.loads(federated.read_text(encoding="utf-8"))
        rows = summary.get("history", [])
        best = next((r for r in rows if r["round"] == summary.get("best_round")), None)
        run.update(mode="federated", rounds=summary.get("rounds", 0), best_round=summary.get("best_round"),
                   best=scores(best), last=scores(rows[-1] if rows else None),
                   hr10_by_round=[(r["round"], scores(r)["hr@10"]) for r in rows if "hr@10" in scores(r)],
                   privacy=federated_claim(rows), seconds=rows[-1].get("seconds") if rows else None)
    elif (run_dir / "metrics.json").exists():  # fedrec-centralized
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        run.update(mode="centralized", rounds=None, best_round=None, best=metrics["test"], last=metrics["test"],
                   hr10_by_round=[], privacy=local_claim(metrics["privacy"]),
                   seconds=metrics.get("training", {}).get("seconds"))
    elif local.exists():
        summary = json.loads(local.read_text(encoding="utf-8"))
        run.update(mode="local", rounds=None, best_round=None, best=summary["test"], last=summary["test"],
                   hr10_by_round=[], privacy=local_claim(summary["privacy"]), seconds=summary.get("seconds"))
    else:
        run.update(mode="no summary (the job failed or is still running)", best={}, last={}, hr10_by_round=[],
                   privacy="", seconds=None)
    return run


def varied(runs: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(overrides every run shares, keys whose values differ between runs), keys in first-seen order."""
    sets = [set(r["overrides"]) for r in runs]
    common = [o for o in runs[0]["overrides"] if all(o in s for s in sets)] if runs else []
    keys: list[str] = []
    for run in runs:
        for override in run["overrides"]:
            key = override.split("=", 1)[0]
            if override not in common and key not in keys:
                keys.append(key)
    return common, keys


def value_of(run: dict[str, Any], key: str) -> str:
    """The run's value for an override key ("" where it kept the default)."""
    return next((o.split("=", 1)[1] for o in run["overrides"] if o.split("=", 1)[0] == key), "")


def label(run: dict[str, Any], keys: list[str], width: int = 48) -> str:
    """A short legend entry: the run's name and the values it set for the varied keys (paths by file name)."""
    values = [f"{k.rsplit('.', 1)[-1]}={Path(v).name if '/' in v else v}" for k in keys if (v := value_of(run, k))]
    text = Path(run["run"]).name + (": " + ", ".join(values) if values else "")
    return text if len(text) <= width else text[:width - 1] + "…"


def _cell(metrics: dict[str, Any], key: str) -> str:
    return with_error(metrics, key) if key in metrics else ""


def write_comparison(runs: list[dict[str, Any]], out_dir: Path) -> Path:
    """comparison.md (+ .json, + .png with each federated run's HR@10 against rounds) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    common, keys = varied(runs)
    header = ["run", *keys, "mode", "rounds (best)"] + [f"{name} best" for name, _ in SCORES] + \
        [f"{name} last" for name, _ in SCORES] + ["privacy", "seconds"]
    lines = ["# Comparison of runs", "",
             f"{len(runs)} run(s)" + (f"; settings every run shares: `{' '.join(common)}`" if common else "") + ".",
             "Scores: test split, the sites' figures (user-weighted over all their users) ± one standard error "
             "over users; best = the round chosen on validation; a local-only run is its sites' mean, a "
             "centralized run its best epoch's model.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        rounds = "" if run.get("rounds") is None else f"{run['rounds']} ({run['best_round']})"
        seconds = "" if run.get("seconds") is None else f"{float(run['seconds']):,.0f}"
        cells = [Path(run["run"]).name, *(value_of(run, k) for k in keys), run["mode"], rounds,
                 *(_cell(run["best"], key) for _, key in SCORES), *(_cell(run["last"], key) for _, key in SCORES),
                 run["privacy"], seconds]
        lines.append("| " + " | ".join(cells) + " |")
    curves = [run for run in runs if run["hr10_by_round"]]
    if curves:
        panels = [(f"run{i}", "hr@10", label(r, keys)) for i, r in enumerate(curves)]
        rows_by_round: dict[int, dict[str, Any]] = {}
        for i, run in enumerate(curves):
            for rnd, hr in run["hr10_by_round"]:
                rows_by_round.setdefault(rnd, {"round": rnd})[f"run{i}"] = {"hr@10": hr}
        plot([rows_by_round[r] for r in sorted(rows_by_round)], out_dir / "comparison.png", panels, "HR@10 (sites)")
        lines += ["", "![HR@10 against rounds](comparison.png)"]
    (out_dir / "comparison.json").write_text(json.dumps(runs, indent=1, default=float), encoding="utf-8")
    path = out_dir / "comparison.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class SweepComparison(Callback):
    """Hydra callback: after a multirun, compare its jobs in the sweep directory."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(str(config.hydra.sweep.dir)).resolve()
        jobs = sorted((p for p in sweep.iterdir() if (p / ".hydra").is_dir()),
                      key=lambda p: (len(p.name), p.name)) if sweep.is_dir() else []
        if jobs:
            log.info("comparison of %d jobs: %s", len(jobs), write_comparison([collect(j) for j in jobs], sweep))


def main(argv: list[str] | None = None) -> None:
    """`python -m simulations.compare --out DIR RUN_DIR ...`: compare runs made one by one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (fedrec-simulate output dirs)")
    parser.add_argument("--out", type=Path, default=Path("."), help="where comparison.md/.json/.png go")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not r.is_dir()]
    if missing:
        parser.error(f"not a directory: {', '.join(missing)}")
    print(write_comparison([collect(r.resolve()) for r in args.runs], args.out).read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
