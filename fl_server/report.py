"""The run report: a markdown summary and PNG plots of accuracy and privacy spent against rounds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from shared_model.metrics import with_error
from shared_model.privacy_claim import privacy_claim
from shared_model.wire import TRAIN_CE


def trained_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rounds that trained (round 0 only scores a starting model: nothing trained, nothing spent)."""
    return [r for r in rows if r["round"] > 0]


def dp_spent(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last trained round's privacy figures when every site that reported trained with DP, else None
    (nothing trained, or some site without DP: then nothing may claim DP)."""
    trained = trained_rows(rows)
    last = trained[-1].get("privacy", {}) if trained else {}
    return None if last.get("sites_without_dp", 0) or not last.get("sites_with_dp") else last


def privacy_sentence(rows: list[dict[str, Any]]) -> str:
    """The exact privacy claim for the whole run, or why there is none."""
    trained = trained_rows(rows)
    if not trained:
        return "No round completed; nothing was trained."
    spent = dp_spent(trained)
    if spent is None:
        last = trained[-1].get("privacy", {})
        return privacy_claim(None, no_dp_reason=f"at least one site trained without DP: "
                             f"{last.get('sites_without_dp', 0)} of {last.get('sites', 0)} sites in the last round")
    distributed = [r["distributed_dp"] for r in trained if "distributed_dp" in r]
    if distributed:
        return distributed_dp_sentence(trained, distributed, spent)
    return privacy_claim(spent["epsilon_max"], spent["delta_max"], unit="user of a site", upper_bound=True,
                         mechanism=f"at every site that reported, cumulative over all rounds (ε max "
                                   f"{spent['epsilon_max']:.3f}, mean {spent['epsilon_mean']:.3f} over "
                                   f"{spent['sites_with_dp']} sites)", note="Each site enforces its own budget.")


def distributed_dp_sentence(trained: list[dict[str, Any]], distributed: list[dict[str, Any]],
                            spent: dict[str, Any]) -> str:
    """The claim of a distributed-DP run (fl_client.distributed_dp): one DP-SGD step over the union of the sites'
    users a round, and the assumption it rests on."""
    last = distributed[-1]
    secure = any("secure_aggregation" in r for r in trained)
    text = "Distributed DP: " + privacy_claim(
        spent["epsilon_max"], spent["delta_max"], unit="user of any site", upper_bound=True,
        mechanism=f"over the union of the sites' users, one DP-SGD step a round (q = {last['sample_rate']:g}, "
                  f"σ = {last['noise_multiplier']:g}, C = {last['max_grad_norm']:g})"
                  + (f" after one release of item popularity in round 0 (σ = {last['popularity_noise']:g}, every user)"
                     if last.get("popularity_noise") else "") + "; cumulative over all rounds as "
                  f"each site's ledger records it (ε max {spent['epsilon_max']:.3f} over {spent['sites_with_dp']} "
                  "sites)") + ". "
    if secure:
        colluders = f"{last['colluders']} site colludes" if last["colluders"] == 1 else \
            f"{last['colluders']} sites collude"
        text += (f"It holds while secure aggregation hides each site's update and at most {colluders} with the "
                 "server: each site adds only its share of the noise, so a server that "
                 "saw one site's update would see less noise than σ·C on it.")
        sums = [d["sum_noise_multiplier"] for d in distributed if "sum_noise_multiplier" in d]
        if sums and max(sums) > last["noise_multiplier"] * (1 + 1e-6):
            low, high = min(sums), max(sums)
            text += (f" The sums carried noise multipliers {low:g}" + (f" to {high:g}" if high > low else "") +
                     f" (the claim counts σ = {last['noise_multiplier']:g}): each site's share covers a sum over "
                     "the fewest sites it can be unmasked over, so each site that stays beyond them adds noise "
                     "the claim does not count, at a cost in accuracy (strategy.secagg_threshold=1.0 makes the "
                     "shares add up to σ when no site drops).")
    else:
        text += "Without secure aggregation each site added all of σ·C itself: the server saw every update."
    if len(distributed) < len(trained):  # a run resumed with other settings
        others = len(trained) - len(distributed)
        text += (f" {others} round{'s' if others != 1 else ''} trained without distributed DP: the figures above "
                 "include what the sites spent in them, the description of the mechanism does not.")
    return text


def progress_line(row: dict[str, Any], num_rounds: int) -> str:
    """One line per completed round, from the ServerApp's metrics.jsonl."""
    evaluation = row.get("central_eval") or row.get("federated_eval") or {}
    privacy = row.get("privacy", {})
    eps = f", ε max {privacy['epsilon_max']:.3f}" if "epsilon_max" in privacy else ""
    if row.get("declined_reasons"):
        eps += f" (declined: {row['declined_reasons'][0]})"
    cost = row.get("site_cost") or {}
    if cost:
        eps += f"; slowest site {cost['train_seconds_max']:.1f} s, peak {cost['peak_memory_mb_max']:,.0f} MB"
    silent = row.get("train_no_reply", 0)
    failed = f"{row.get('train_failures', 0)} failed" + (f", {silent} silent (round timeout)" if silent else "")
    if row.get("dropped"):
        failed += f", {row['dropped']} dropped ({row['dropped_reasons'][0]})"
    scores = (f"HR@10 {evaluation.get('hr@10', float('nan')):.4f} NDCG@10 {evaluation.get('ndcg@10', float('nan')):.4f}"
              if "central_eval" in row or "federated_eval" in row else "not evaluated (eval-every)")
    if row.get("starting_model"):
        return f"round 0/{num_rounds} (the starting model, before any training): {scores}"
    if row.get("popularity_release"):
        release = row["popularity_release"]
        return (f"round 0/{num_rounds} (popularity release, σ_p = {release['noise_multiplier']:g}): "
                f"{release['sites']} sites, {release['users']} users{eps}")
    return (f"round {row['round']}/{num_rounds}: {row.get('train_replies', 0)} sites answered, "
            f"{row.get('declined', 0)} declined, {failed}; {scores}{eps}")


def secure_aggregation_sentence(rows: list[dict[str, Any]]) -> list[str]:
    """What the server saw of the updates when the run used secure aggregation (nothing otherwise)."""
    secure = [r["secure_aggregation"] for r in trained_rows(rows) if "secure_aggregation" in r]
    if not secure:
        return []
    summed = [s for s in secure if s]
    text = ("Secure aggregation (SecAgg+): the server saw only the sum of the sites' masked, quantized updates"
            + (f", at least {min(s['sites_summed'] for s in summed)} sites a round" if summed else "")
            + (", and the sum of their evaluation figures too" if any(r.get("secure_evaluation") for r in rows)
               else "") + "; each site's training metrics (loss, ε, users, time) travel in clear.")
    clipped = sum(s["clipped_coordinates"] for s in summed)
    if clipped:
        text += f" {clipped:,} update coordinates were clipped to ±strategy.secagg_clip over all rounds: raise it."
    if len(summed) < len(secure):
        text += f" In {len(secure) - len(summed)} rounds the sum could not be recovered (too few sites)."
    return [text, ""]


def series(rows: list[dict[str, Any]], section: str, key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of one metric, skipping rounds that lack it."""
    points = [(r["round"], r[section][key]) for r in rows if key in r.get(section, {})]
    return [p[0] for p in points], [float(p[1]) for p in points]


def plot(rows: list[dict[str, Any]], path: Path, panels: list[tuple[str, str, str]], title: str,
         baselines: dict[str, float] | None = None) -> Path:
    """One line per (section, key, label) against rounds (whole rounds on the axis); each baseline (label ->
    value) a dashed horizontal line."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for section, key, label in panels:
        x, y = series(rows, section, key)
        if x:
            ax.plot(x, y, marker="o", label=label)
    for label, value in (baselines or {}).items():
        ax.axhline(value, linestyle="--", color="grey", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out_dir: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> Path:
    """report.md plus accuracy.png and privacy.png in the run directory."""
    plot(rows, out_dir / "accuracy.png", [("federated_eval", "hr@10", "HR@10 (sites)"),
                                          ("federated_eval", "ndcg@10", "NDCG@10 (sites)"),
                                          ("central_eval", "hr@10", "HR@10 (server)"),
                                          ("central_eval", "ndcg@10", "NDCG@10 (server)")], "accuracy",
         {"popularity HR@10 (server)": summary["popularity"]["hr@10"]} if "popularity" in summary else None)
    privacy_rows = [{"round": r["round"], "privacy": r.get("privacy", {})} for r in rows]
    plot(privacy_rows, out_dir / "privacy.png", [("privacy", "epsilon_max", "ε max over sites"),
                                                 ("privacy", "epsilon_mean", "ε mean over sites")], "ε spent")
    lines = ["# Federated training report", "", privacy_sentence(rows), "", *secure_aggregation_sentence(rows),
             f"Rounds completed: {summary.get('rounds', 0)}; best round: {summary.get('best_round', 0)}; "
             f"model: `{summary.get('model_dir', '')}`.", *initial_model_note(summary.get("initial_model")), "",
             "| round | sites trained | declined | failed or silent | train loss (sites' local models) | "
             "train CE (global model) | HR@10 (sites) | NDCG@10 (sites) | HR@10 (server) | ε max |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fed, central, priv = r.get("federated_eval", {}), r.get("central_eval", {}), r.get("privacy", {})
        left_out = len(r.get("item_rows", {}).get("left_out", []))  # trained, but sent unusable item weights
        unusable = r.get("train_failures", 0) + left_out + r.get("dropped", 0)  # replied, but nothing to aggregate
        failed = unusable + r.get("train_no_reply", 0)
        trained = r.get("train_replies", 0) - unusable - r.get("declined", 0)
        label = f"{r['round']} (start)" if r.get("starting_model") else \
            f"{r['round']} (popularity release)" if r.get("popularity_release") else r["round"]
        lines.append(f"| {label} | {trained} | {r.get('declined', 0)} | {failed} | "
                     f"{_fmt(r.get('train', {}).get('train-loss'))} | {_fmt(fed.get(TRAIN_CE))} | "
                     f"{_fmt(fed.get('hr@10'))} | "
                     f"{_fmt(fed.get('ndcg@10'))} | {_fmt(central.get('hr@10'))} | {_fmt(priv.get('epsilon_max'))} |")
    lines += dropped_notes(rows) + item_rows_notes(rows)
    lines += cost_notes(rows)
    popularity = summary.get("popularity")
    baseline = [f"- popularity (the most frequent items of the server's own events; no model, no privacy cost): "
                f"HR@10 {with_error(popularity, 'hr@10')}, NDCG@10 {with_error(popularity, 'ndcg@10')}"] \
        if popularity else []
    lines += ["", *final_metrics(rows, summary.get("best_round", 0)), *baseline,
              "", "![accuracy](accuracy.png)", "", "![privacy](privacy.png)", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def initial_model_note(initial: dict[str, Any] | None) -> list[str]:
    """Where round 1 started when it was not fresh weights, and what the privacy claim does not cover."""
    if not initial:
        return []
    return ["", f"Round 1 started from the exported model `{initial['path']}`, scored as round 0 before any "
                "training (it is the best model when no round beats it on validation). The ε above is what each "
                "site's ledger holds (every DP round the site ever trained, this training and any before it); what "
                "the starting model learned elsewhere is covered only by how that model was trained."]


def cost_notes(rows: list[dict[str, Any]]) -> list[str]:
    """What a round cost the sites (the slowest site's training time, the largest peak memory) and the wire."""
    costs = [(r["round"], r["site_cost"]) for r in rows if r.get("site_cost")]
    if not costs:
        return []
    last_round, last = costs[-1]
    row = next(r for r in rows if r["round"] == last_round)
    return ["", f"Site cost in round {last_round}: the slowest site trained {last['train_seconds_max']:.1f} s "
                f"(mean {last['train_seconds_mean']:.1f} s); the largest peak memory at a site was "
                f"{max(c['peak_memory_mb_max'] for _, c in costs):,.0f} MB over all rounds (GPU allocator on a "
                f"GPU site, resident set on a CPU site); {row.get('bytes_to_each_site', 0):,} bytes went to "
                f"and {row.get('bytes_from_each_site', 0):,} came from each site."]


def dropped_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Every reply the server's checks dropped (fl_server.reply_checks) and every round left unchanged."""
    lines = [f"- round {r['round']}: dropped {reason}" for r in rows for reason in r.get("dropped_reasons", [])]
    lines += [f"- round {r['round']}: evaluation not pooled: {reason}" for r in rows
              for reason in r.get("evaluate_dropped_reasons", [])]
    lines += [f"- round {r['round']}: global model unchanged ({r['unusable']})" for r in rows if r.get("unusable")]
    if not lines:
        return []
    return ["", "Replies dropped before aggregation (malformed, non-finite, another catalog, more users than "
                "declared, or an update above the norm bound; training replies are counted as failed above), "
                "and evaluations left out of the sites' scores (malformed, non-finite or out of range):", *lines]


def item_rows_notes(rows: list[dict[str, Any]]) -> list[str]:
    """How the item table's rows were aggregated (when not plainly averaged), and every site left out."""
    modes = sorted({r["item_rows"]["mode"] for r in rows if "item_rows" in r})
    if not modes:
        return []
    lines = ["", f"Item-table rows aggregated by `strategy.item_rows={', '.join(modes)}`: each site's row of an "
                 "item is weighted by what the site reported of that item (not covered by DP)."]
    lines += [f"- round {r['round']}: left out {reason}" for r in rows for reason in r["item_rows"]["left_out"]]
    return lines


def final_metrics(rows: list[dict[str, Any]], best_round: int) -> list[str]:
    """The last and the best round's test metrics, each ± one standard error over the users scored."""
    lines = []
    for label, wanted in (("last round", rows[-1]["round"] if rows else None), ("best round", best_round)):
        row = next((r for r in rows if r["round"] == wanted), None)
        for section, who in (("federated_eval", "sites"), ("central_eval", "server")):
            metrics = (row or {}).get(section) or {}
            if "hr@10" in metrics:
                what = f"{wanted}: the starting model, not improved on" if (row or {}).get("starting_model") and \
                    label == "best round" else wanted
                lines.append(f"- {label} ({what}), {who}: " + ", ".join(
                    f"{name} {with_error(metrics, key)}" for name, key in (
                        ("HR@10", "hr@10"), ("NDCG@10", "ndcg@10"), ("MRR", "mrr")) if key in metrics) +
                    (f" over {int(metrics['users'])} users" if "users" in metrics else ""))
    if lines:
        lines.append("\n± is one standard error over the users scored: it says how much the figure would move "
                     "with other users, not how much another run (with other DP noise) would move it.")
    return lines


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
