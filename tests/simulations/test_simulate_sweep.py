"""`fedrec-simulate -m privacy.epsilon=a,b` is a Hydra multirun: one job, and one output directory, per value.

σ is fixed (`privacy.noise_multiplier`) so the jobs skip the slow noise calibration; that calibration spends
the budget exactly is asserted in test_local_only and tests/fl_client."""

import json
import sys
from pathlib import Path

import pytest
import yaml

from simulations.simulate import main

TINY = ["data.synthetic.num_users=120", "data.synthetic.num_items=30", "model.hidden_size=16", "model.max_len=12",
        "model.num_hidden_layers=1", "train.batch_size=32", "train.num_threads=1", "privacy.noise_multiplier=1.3",
        "privacy.delta=0.01",  # σ 1.3 spends ε <= 3 at this δ (below 1/60, the sites' 1/#users)
        "federation.num_rounds=1", "partition=iid", "partition.num_partitions=2"]


def sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: list[str]) -> list[Path]:
    """Run `fedrec-simulate -m privacy.epsilon=3,8 ...` (the console script's main, in this process); return
    the job directories in job order."""
    argv = ["fedrec-simulate", "-m", "privacy.epsilon=3,8", *TINY, *extra, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(tmp_path)
    main()
    return sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())


def job_budget(job: Path) -> float:
    """The ε budget the job's composed config carried."""
    return float(yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["privacy"]["epsilon"])


def test_an_epsilon_sweep_of_the_local_baseline_writes_one_summary_per_job(tmp_path, monkeypatch):
    jobs = sweep(tmp_path, monkeypatch, ["federation.mode=local"])
    assert [p.name for p in jobs] == ["0", "1"]
    assert [job_budget(j) for j in jobs] == [3.0, 8.0]
    for job in jobs:
        summary = json.loads((job / "local" / "summary.json").read_text())
        assert summary["privacy"]["dp"] and summary["users"] == 120 and summary["sites"] == 2
    # The sweep ends with one table of its jobs: what varied (ε), what each reached and spent.
    table = (tmp_path / "sweep" / "comparison.md").read_text()
    assert "| run | privacy.epsilon | mode |" in table and " federation.mode=local" in table.splitlines()[2]
    compared = json.loads((tmp_path / "sweep" / "comparison.json").read_text())
    assert [(Path(c["run"]).name, c["mode"]) for c in compared] == [("0", "local"), ("1", "local")]
    for row, budget in zip(compared, (3.0, 8.0), strict=True):
        assert f"privacy.epsilon={budget:g}" in row["overrides"] and row["best"]["hr@10"] >= 0
        assert row["privacy"].startswith("(ε ≤ ") and "per user of a site, at every site" in row["privacy"]
        assert float(row["privacy"].split("ε ≤ ")[1].split(",")[0]) <= budget * 1.01


@pytest.mark.slow
def test_an_epsilon_sweep_of_the_federation_writes_one_server_summary_per_job(tmp_path, monkeypatch):
    jobs = sweep(tmp_path, monkeypatch, ["federation.num_cpus=1"])
    assert [p.name for p in jobs] == ["0", "1"]
    assert [job_budget(j) for j in jobs] == [3.0, 8.0]
    for job in jobs:
        rows = [json.loads(line) for line in (job / "server" / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1] and rows[0]["privacy"]["sites_with_dp"] == 2
        assert (job / "server" / "summary.json").exists()
    compared = json.loads((tmp_path / "sweep" / "comparison.json").read_text())
    assert [(c["mode"], c["rounds"], len(c["hr10_by_round"])) for c in compared] == [("federated", 1, 1)] * 2
    assert all(c["privacy"].startswith("(ε ≤ ") and "per user of a site, at 2 sites" in c["privacy"] for c in compared)
    assert (tmp_path / "sweep" / "comparison.png").exists()
    assert "| 1 | 8 | federated | 1 (1) |" in (tmp_path / "sweep" / "comparison.md").read_text()
