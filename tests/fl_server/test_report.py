"""The run report never claims DP unless every site had it, and always writes its plots."""

from fl_server.report import privacy_sentence, write_report

ROWS = [{"round": r, "train_replies": 3, "train_failures": 0, "declined": 0, "train": {"train-loss": 5.0 - r},
         "federated_eval": {"hr@10": 0.1 * r, "ndcg@10": 0.05 * r}, "central_eval": {},
         "privacy": {"sites": 3, "sites_with_dp": 3, "sites_without_dp": 0, "epsilon_max": 2.0 * r,
                     "epsilon_mean": 1.5 * r, "delta_max": 1e-4}} for r in (1, 2)]


def test_report_states_the_cumulative_privacy_spent_and_writes_plots(tmp_path):
    path = write_report(tmp_path, ROWS, {"rounds": 2, "best_round": 2, "model_dir": "/m"})
    text = path.read_text()
    assert "(ε ≤ 4.000, δ ≤ 0.0001)-DP per user of a site" in text and "ε max 4.000, mean 3.000 over 3 sites" in text
    assert "| 2 | 3 | 0 | 0 | 3.0000 |  | 0.2000 |" in text
    assert (tmp_path / "accuracy.png").stat().st_size > 1000 and (tmp_path / "privacy.png").exists()


def test_report_gives_the_last_and_best_rounds_with_standard_errors(tmp_path):
    rows = [{**r, "federated_eval": {**r["federated_eval"], "mrr": 0.01, "hr@10:se": 0.01 * r["round"], "users": 500.0,
                                     "train-ce": 7.0 - r["round"]}} for r in ROWS]
    text = write_report(tmp_path, rows, {"rounds": 2, "best_round": 1, "model_dir": "/m"}).read_text()
    assert "- last round (2), sites: HR@10 0.2000 ± 0.0200, NDCG@10 0.1000, MRR 0.0100 over 500 users" in text
    assert "- best round (1), sites: HR@10 0.1000 ± 0.0100" in text and "not how much another run" in text
    assert "| 2 | 3 | 0 | 0 | 3.0000 | 5.0000 | 0.2000 |" in text  # the global model's training CE beside it


def test_no_dp_claim_when_a_site_trained_without_dp():
    rows = [{**ROWS[0], "privacy": {"sites": 3, "sites_with_dp": 2, "sites_without_dp": 1, "epsilon_max": 1.0,
                                    "epsilon_mean": 1.0, "delta_max": 1e-4}}]
    assert privacy_sentence(rows) == ("no differential privacy (at least one site trained without DP: 1 of 3 "
                                      "sites in the last round)")
    assert privacy_sentence([]).startswith("No round completed")


def test_a_distributed_dp_run_claims_dp_over_the_union_and_names_its_assumption():
    ddp = {"sample_rate": 0.1, "noise_multiplier": 0.8, "max_grad_norm": 1.0, "colluders": 1}
    secure = [{**r, "distributed_dp": ddp, "secure_aggregation": {"sites_summed": 3}} for r in ROWS]
    text = privacy_sentence(secure)
    assert text.startswith("Distributed DP: (ε ≤ 4.000, δ ≤ 0.0001)-DP per user of any site, over the union of "
                           "the sites' users, one DP-SGD step a round (q = 0.1, σ = 0.8, C = 1)")
    assert "ε max 4.000 over 3 sites" in text
    assert "at most 1 site colludes with the server" in text and "Each site enforces" not in text
    clear = privacy_sentence([{**r, "distributed_dp": ddp} for r in ROWS])  # each site added all of σC itself
    assert "each site added all of σ·C itself" in clear and "collude" not in clear
    mixed = privacy_sentence([ROWS[0], secure[1]])  # resumed with other settings
    assert "1 round trained without distributed DP" in mixed
    assert "noise multipliers" not in privacy_sentence([{**r, "distributed_dp": {
        **ddp, "sum_noise_multiplier": 0.8}, "secure_aggregation": {"sites_summed": 3}} for r in ROWS])
    margin = privacy_sentence([{**r, "distributed_dp": {**ddp, "sum_noise_multiplier": s},
                                "secure_aggregation": {"sites_summed": 3}} for r, s in
                                zip(ROWS, (0.98, 1.1), strict=True)])
    assert "The sums carried noise multipliers 0.98 to 1.1 (the claim counts σ = 0.8)" in margin
    assert "strategy.secagg_threshold=1.0" in margin


def test_report_names_the_item_row_weighting_and_counts_sites_left_out_as_failed(tmp_path):
    rows = [{**r, "item_rows": {"mode": "counts", "sites": 3 - r["round"] + 1,
                                "left_out": ["node 9: it sent no item weights"] * (r["round"] - 1)}} for r in ROWS]
    text = write_report(tmp_path, rows, {"rounds": 2, "best_round": 2, "model_dir": "/m"}).read_text()
    assert "`strategy.item_rows=counts`" in text and "not covered by DP" in text
    assert "| 1 | 3 | 0 | 0 |" in text and "| 2 | 2 | 0 | 1 |" in text
    assert "- round 2: left out node 9: it sent no item weights" in text
    assert "item_rows" not in write_report(tmp_path, ROWS, {"rounds": 2}).read_text()


def test_report_gives_the_sites_training_cost(tmp_path):
    rows = [{**r, "bytes_to_each_site": 1000, "bytes_from_each_site": 900,
             "site_cost": {"train_seconds_max": 3.0 * r["round"], "train_seconds_mean": 2.0,
                           "peak_memory_mb_max": 800.0 / r["round"]}} for r in ROWS]
    text = write_report(tmp_path, rows, {"rounds": 2}).read_text()
    assert ("Site cost in round 2: the slowest site trained 6.0 s (mean 2.0 s); the largest peak memory at a site "
            "was 800 MB over all rounds") in text and "1,000 bytes went to and 900 came from each site" in text
    assert "Site cost" not in write_report(tmp_path, ROWS, {"rounds": 2}).read_text()


def test_the_report_names_every_dropped_reply_and_unchanged_round(tmp_path):
    rows = [{"round": 1, "train_replies": 3, "dropped": 1, "dropped_reasons": ["node 7: tensor w holds NaN"],
             "unusable": "1 usable trained replies, fewer than strategy.min_nodes=2",
             "evaluate_dropped_reasons": ["node 8: metrics ['hr@10'] outside [0, 1]"]}]
    text = write_report(tmp_path, rows, {"rounds": 1}).read_text()
    assert "round 1: evaluation not pooled: node 8: metrics ['hr@10'] outside [0, 1]" in text
    assert "round 1: dropped node 7: tensor w holds NaN" in text and "global model unchanged (1 usable" in text
    assert "| 1 | 2 | 0 | 1 |" in text


def test_the_popularity_baseline_is_reported_and_drawn_when_the_server_scored_it(tmp_path):
    popularity = {"hr@10": 0.0120, "hr@10:se": 0.0007, "ndcg@10": 0.0055, "ndcg@10:se": 0.0004}
    text = write_report(tmp_path, ROWS, {"rounds": 2, "best_round": 2, "model_dir": "/m",
                                         "popularity": popularity}).read_text()
    assert "- popularity (the most frequent items of the server's own events" in text
    assert "HR@10 0.0120 ± 0.0007, NDCG@10 0.0055 ± 0.0004" in text
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    assert "- popularity" not in write_report(tmp_path, ROWS, {"rounds": 2}).read_text()


def test_a_round_key_the_docs_do_not_describe_is_named():
    from fl_server.round_record import undocumented

    assert undocumented(ROWS[0]) == [] and undocumented({**ROWS[0], "mystery": 1}) == ["mystery"]
