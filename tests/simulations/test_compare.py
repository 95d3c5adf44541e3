"""Comparing runs: each run's varied settings, best and last scores and its exact privacy claim (none where DP
was off anywhere), from the summaries runs write; a sweep's jobs or run directories named on the command line."""

import json

import pytest
import yaml

from simulations.compare import collect, main, write_comparison


def federated_run(root, name, overrides, rows, best_round):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / "server").mkdir()
    summary = {"rounds": rows[-1]["round"], "best_round": best_round, "history": rows}
    (run / "server" / "summary.json").write_text(json.dumps(summary))
    return run


def row(rnd, hr, sites_without_dp=0, **extra):
    privacy = {"sites": 2, "sites_with_dp": 2 - sites_without_dp, "sites_without_dp": sites_without_dp,
               "epsilon_max": 1.5 * rnd, "epsilon_mean": 1.25 * rnd, "delta_max": 0.01}
    return {"round": rnd, "seconds": 10.0 * rnd, "privacy": privacy,
            "federated_eval": {"hr@10": hr, "hr@10:se": 0.01, "ndcg@10": hr / 2, "ndcg@10:se": 0.005}, **extra}


def test_a_comparison_names_what_varied_the_best_and_last_scores_and_each_runs_privacy(tmp_path):
    common = ["+experiment=fed_beauty_dp", "federation.num_rounds=2"]
    start = {"round": 0, "seconds": 0.0, "starting_model": True, "federated_eval": {"hr@10": 0.3, "ndcg@10": 0.15}}
    dp = federated_run(tmp_path, "0", [*common, "privacy.epsilon=3"], [start, row(1, 0.2), row(2, 0.25)], 0)
    mixed = federated_run(tmp_path, "1", [*common, "privacy.epsilon=8", "strategy.server_lr=0.5"],
                          [row(1, 0.1), row(2, 0.4, sites_without_dp=1)], 2)
    local = tmp_path / "2"
    (local / "local").mkdir(parents=True)
    (local / "local" / "summary.json").write_text(json.dumps({
        "test": {"hr@10": 0.05, "ndcg@10": 0.02}, "seconds": 3.0, "privacy": {"dp": False, "claim": "none"}}))
    central = tmp_path / "4"
    central.mkdir()
    (central / "metrics.json").write_text(json.dumps({
        "test": {"hr@10": 0.5, "ndcg@10": 0.3}, "training": {"seconds": 7.0},
        "privacy": {"dp": True, "claim": "user-level DP: ε = 8.000, δ = 0.001 (unit: one user)"}}))
    runs = [collect(p) for p in (dp, mixed, local, tmp_path / "3", central)]
    assert runs[0]["best"]["hr@10"] == 0.3 and runs[0]["last"]["hr@10"] == 0.25  # best: the starting model
    assert runs[0]["hr10_by_round"] == [(0, 0.3), (1, 0.2), (2, 0.25)]
    assert runs[0]["privacy"] == "(ε ≤ 3.000, δ ≤ 0.01)-DP per user of a site, at 2 sites (ε mean 2.500)"
    assert runs[1]["privacy"] == "no differential privacy (DP off at some site)"  # never a claim with DP off
    assert runs[2]["mode"] == "local" and runs[2]["privacy"] == "no differential privacy (DP was off)"
    assert runs[3]["mode"].startswith("no summary")
    assert runs[4]["mode"] == "centralized" and runs[4]["best"]["hr@10"] == 0.5 and runs[4]["seconds"] == 7.0
    assert runs[4]["privacy"] == "user-level DP: ε = 8.000, δ = 0.001 (unit: one user)"  # fedrec-centralized's own
    table = write_comparison(runs, tmp_path / "out").read_text()
    assert "settings every run shares" not in table  # run 2 has no overrides: nothing is common
    assert "| run | +experiment | federation.num_rounds | privacy.epsilon | strategy.server_lr | mode |" in table
    assert "| 0 | fed_beauty_dp | 2 | 3 |  | federated | 2 (0) | 0.3000 | 0.1500 | 0.2500 ± 0.0100 |" in table
    assert "| 1 | fed_beauty_dp | 2 | 8 | 0.5 | federated | 2 (2) | 0.4000 ± 0.0100 |" in table
    assert (tmp_path / "out" / "comparison.png").exists()
    saved = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert saved[1]["overrides"][-1] == "strategy.server_lr=0.5"


def test_the_command_compares_run_directories_and_refuses_a_missing_one(tmp_path, capsys):
    run = federated_run(tmp_path, "a", ["privacy.epsilon=1"], [row(1, 0.2)], 1)
    main(["--out", str(tmp_path / "out"), str(run)])
    assert "settings every run shares: `privacy.epsilon=1`" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "out"), str(tmp_path / "missing")])
    assert "not a directory:" in capsys.readouterr().err
