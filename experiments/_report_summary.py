"""The summary table of docs/results.md: one row per claim, its numbers, its verdict.

Each `*_rows` function turns the records of one experiment into rows
`(claim, what the runs show, verdicts.Verdict)`; the verdict comes from the
named rule in `experiments.verdicts`, whose thresholds the table prints.
"""

from __future__ import annotations

from experiments import _report_numbers as numbers
from experiments import _report_text as text
from experiments import verdicts

Row = tuple[str, str, verdicts.Verdict]


def _by_experiment(records, name):
  return [rec for rec in records.values() if rec["experiment"] == name]


def _epochs_1_to_3_row(record) -> Row | None:
  """BN CNN accuracy after epochs 1-3 against the seed's Keras run."""
  runs = record["results"]["runs"]
  claim = record["results"]["seed_claim"]["bn_validation_accuracy_after_epoch"]
  parts, gaps = [], {}
  for optimizer in numbers.optimizers(runs):
    run = runs.get(f"{optimizer}_bn")
    if run is None:
      continue
    by_epoch = numbers.accuracy_at_epochs(run)
    if by_epoch:
      parts.append(f"{optimizer}: " + " / ".join(f"{100 * a:.2f}" for a in by_epoch.values()))
      gaps[optimizer] = [100 * (a - claim[str(e)]) for e, a in by_epoch.items()]
  if not parts:
    return None
  return ("BN CNN: 96.4 / 98.2 / 98.3% validation after epochs 1-3 (seed 003)",
          "BN, epochs 1 / 2 / 3, mean of seeds: " + "; ".join(parts),
          verdicts.epochs_match_claim(gaps))


def _tenfold_row(record) -> Row:
  """'Without BN the CNN needs 10x more epochs', from the epochs-to-accuracy ratios."""
  r, runs = record["results"], record["results"]["runs"]
  raw = r.get("pixel_scale") == 1.0
  findings, never = [], []
  for optimizer in numbers.optimizers(runs):
    stuck, seeds = numbers.stuck_seeds(runs.get(f"{optimizer}_nobn"))
    if stuck:
      never.append(optimizer)
    findings.append(f"{optimizer}: " + ", ".join(
        f"{100 * t:g}%: "
        f"{verdicts.ratio_finding(numbers.epochs_ratio(runs, optimizer, t))}"
        for t in numbers.TENFOLD_THRESHOLDS)
        + (f"; without BN {stuck} of {seeds} seeds never trained (below "
           f"{100 * numbers.STUCK_ACCURACY:g}% at the end)" if stuck else ""))
  ratios = {(o, t): numbers.epochs_ratio(runs, o, t)
            for o in numbers.optimizers(runs) for t in numbers.TENFOLD_THRESHOLDS}
  verdict = verdicts.tenfold_epochs(ratios, never)
  verdict = verdict._replace(rule=f"{verdict.rule}; per ratio, {verdicts.RATIO_WORDS}")
  return ("Without BN the CNN needs 10x more epochs to converge (seed 003)"
          + (", raw 0-255 pixels (section 1b)" if raw else ""),
          "epochs to reach " + " / ".join(f"{100 * t:g}%" for t in numbers.TENFOLD_THRESHOLDS)
          + f" validation, no BN over BN ({r['epochs']:g} epochs, {len(record['seeds'])} "
          "seeds): " + "; ".join(findings),
          verdict)


def bn_vs_nobn_rows(records) -> list[Row]:
  rows = []
  for record in _by_experiment(records, "bn_vs_nobn"):
    if record["results"].get("pixel_scale") != 1.0:
      row = _epochs_1_to_3_row(record)
      rows += [row] if row else []
    rows.append(_tenfold_row(record))
  tuned = numbers.tuned_comparison(records)
  if tuned:
    rows.append((
        "... where a 10x gap can come from: BN at the learning rate it allows vs no BN "
        "at Keras' default (sections 1 and 2a)",
        "; ".join(words for words, _ in tuned),
        verdicts.tenfold_at_tuned_rate([value for _, value in tuned])))
  return rows


def lr_sweep_rows(records) -> list[Row]:
  rows = []
  for record in _by_experiment(records, "lr_sweep"):
    r = record["results"]
    parts, outcomes = [], {}
    for optimizer in dict.fromkeys(c["optimizer"] for c in r["cells"].values()):
      near = numbers.near_best(r, optimizer)
      if len(near) < 2:  # interrupted run: only one of BN / no BN
        continue
      best = {c["use_bn"]: c for c in r["cells"].values() if c["optimizer"] == optimizer}
      top = {k: max(v, default=None) for k, v in near.items()}
      parts.append(
          f"{optimizer}: {len(near[True])} vs {len(near[False])} of "
          f"{len(r['learning_rates'])} usable, largest usable "
          f"{text.lr_text(top[True])} vs {text.lr_text(top[False])}, best "
          f"{100 * best[True]['best_accuracy']:.1f}% vs "
          f"{100 * best[False]['best_accuracy']:.1f}%")
      outcomes[optimizer] = verdicts.SweepOutcome(
          wider=len(near[True]) > len(near[False]),
          higher=top[True] is not None and (top[False] is None or top[True] > top[False]))
    if not outcomes:
      continue
    rows.append((f"BN makes training less sensitive to hyperparameters and allows "
                 f"higher learning rates (seeds 000, 002) -- {r['model'].upper()}",
                 f"learning rates within {verdicts.NEAR_BEST_POINTS:g} points of the "
                 f"optimizer's best after {r['steps']} steps "
                 f"({text.epochs_text(r['epochs'])}), BN vs no BN: " + "; ".join(parts),
                 verdicts.learning_rate_robustness(outcomes, 0.99 ** r["steps"])))
  return rows


def bn_paper_mlp_rows(records) -> list[Row]:
  rec = records.get("bn_paper_mlp")
  if rec is None:
    return []
  runs = rec["results"]["runs"]
  shift = {k: runs[k]["median_total_shift_after_10pct"]["mean"] for k in ("bn", "nobn")}
  jitter = {k: runs[k]["median_drift_after_10pct"]["mean"] for k in ("bn", "nobn")}
  final = {k: runs[k]["final_test_accuracy"]["mean"] for k in ("bn", "nobn")}
  ratios = {t: numbers.mlp_ratio(runs, t) for t in numbers.MLP_THRESHOLDS}
  return [("BN reduces internal covariate shift and the BN MLP trains faster "
           "(BN paper Fig. 1, seed 002)",
           "steps to reach " + ", ".join(
               f"{100 * t:g}% test accuracy: no BN / BN = {text.ratio_text(x)}"
               for t, x in ratios.items())
           + f"; final ({runs['bn']['steps'][-1]:,} steps) {100 * final['bn']:.2f}% "
           f"vs {100 * final['nobn']:.2f}%; median of the last layer's sigmoid "
           f"inputs moves {shift['bn']:.3f} vs {shift['nobn']:.3f} of their "
           "15-85 width after the first 10% of training, step-to-step jitter "
           f"{jitter['bn']:.3f} vs {jitter['nobn']:.3f}",
           verdicts.covariate_shift(ratios, shift, jitter))]


def feature_scaling_rows(records) -> list[Row]:
  rec = records.get("feature_scaling")
  if rec is None:
    return []
  s = rec["results"]["summary"]
  return [("Feature scaling: cond(H) 9.2e4 -> 281.7 -> ~1, so GD converges "
           "faster (seed 003)",
           f"cond {s['dollars_inches']['condition_number']['mean']:.3g} -> "
           f"{s['kilodollars_feet']['condition_number']['mean']:.4g} -> "
           f"{s['standardized']['condition_number']['mean']:.3f}; GD steps "
           f"{s['dollars_inches']['gd_steps']['mean']:.3g} -> "
           f"{s['kilodollars_feet']['gd_steps']['mean']:.0f} -> "
           f"{s['standardized']['gd_steps']['mean']:.1f}",
           numbers.feature_scaling_verdict(s))]


def scale_invariance_rows(records) -> list[Row]:
  rec = records.get("scale_invariance")
  if rec is None:
    return []
  return [("BN(aWu) = BN(Wu) and the gradient scales as 1/a (BN paper 3.3, seed 002)",
           "relative errors of BN(aWu), a * grad W and grad u against a = 1 (section 5)",
           numbers.scale_invariance_verdict(rec["results"]))]


def inference_stats_rows(records) -> list[Row]:
  rec = records.get("inference_stats")
  if rec is None:
    return []
  r = rec["results"]
  running = [v["mean"] for v in r["running_stats_by_batch_size"].values()]
  batch = {k: v for k, v in r["batch_stats_by_batch_size"].items() if "mean" in v}
  smallest, largest = min(batch, key=int), max(batch, key=int)
  by_momentum = {v["momentum"]: v["summary"]["mean"] for v in r["variants"].values()
                 if not v["unbiased_running_var"]}
  unbiased_effect = max(
      abs(v["summary"]["mean"] - by_momentum[v["momentum"]])
      for v in r["variants"].values() if v["unbiased_running_var"])
  return [("At test time running averages replace batch statistics, robustly "
           "(seeds 000, 001)",
           f"after {r['steps']} steps, running statistics give "
           + ", ".join(f"{100 * acc:.1f}% (momentum {m:g})" for m, acc in by_momentum.items())
           + "; with momentum 0.99 over the inference batch sizes "
           + (f"{100 * min(running):.2f}% for every size: "
              if max(running) == min(running) else
              f"{100 * min(running):.2f}-{100 * max(running):.2f}% for sizes ")
           + f"{', '.join(r['running_stats_by_batch_size'])}; batch statistics give "
           f"{100 * batch[smallest]['mean']:.1f}% at batch {smallest} and "
           f"{100 * batch[largest]['mean']:.1f}% at {largest}, batch size 1 is "
           f"undefined; unbiased running variance changes accuracy by at most "
           f"{100 * unbiased_effect:.3f} points",
           numbers.running_statistics_verdict(r))]


def param_table_rows(records) -> list[Row]:
  rec = records.get("param_table")
  if rec is None:
    return []
  verdict = numbers.parameter_table_verdict(rec["results"])
  return [("Parameter table 38,910 / 38,650 / 260 (seed 003)", verdict.detail,
           verdict._replace(detail=""))]


def rows(records) -> list[Row]:
  """Every claim's row, in the order of the summary table."""
  return [*bn_vs_nobn_rows(records), *lr_sweep_rows(records), *bn_paper_mlp_rows(records),
          *feature_scaling_rows(records), *scale_invariance_rows(records),
          *inference_stats_rows(records), *param_table_rows(records)]


def add_to(page: text.Page, records):
  """Writes the '## Summary' table."""
  page.add("## Summary", "", "Each verdict follows the rule printed after it; the rules and "
           "their thresholds are `experiments/verdicts.py`.", "",
           "| claim | what the runs here show | verdict |", "|---|---|---|",
           *(text.table_row(claim, shown, verdict.markdown())
             for claim, shown, verdict in rows(records)), "")
