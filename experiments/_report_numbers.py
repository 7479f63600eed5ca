"""Numbers the report derives from the experiments' JSON records (NumPy only).

Records are what `experiments._common.write_json` wrote: `{"experiment",
"command", "seeds", "results", ...}`; `results` is each experiment's own layout.
"""

from __future__ import annotations

import numpy as np

from experiments import _common
from experiments import verdicts

# Validation accuracies whose epochs-to-reach the BN vs no BN section tabulates.
REACH_THRESHOLDS = (0.97, 0.98, 0.99)
# The two the "10x more epochs" verdict is decided on.
TENFOLD_THRESHOLDS = (0.98, 0.99)
# Test accuracies whose steps-to-reach the BN paper MLP section tabulates.
MLP_THRESHOLDS = (0.90, 0.95, 0.97, 0.975)
STUCK_ACCURACY = 0.5  # a run whose final validation accuracy is below this never trained
EPOCH_1_TO_3 = (1, 2, 3)  # the epochs the seed reports for its BN CNN


def optimizers(runs) -> list[str]:
  """The runs' optimizers in order of first appearance."""
  return list(dict.fromkeys(run["optimizer"] for run in runs.values()))


def is_epoch_end(evaluation) -> bool:
  return abs(evaluation["epoch"] - round(evaluation["epoch"])) < 1e-9


def accuracy_at_epochs(run, epochs=EPOCH_1_TO_3) -> dict[int, float]:
  """`{epoch: mean validation accuracy over seeds}` for the listed epochs that were evaluated."""
  found = {}
  for evaluation in run["history"]:
    epoch = int(round(evaluation["epoch"]))
    if is_epoch_end(evaluation) and epoch in epochs:
      mean = _common.mean_std(evaluation["validation_accuracy"])["mean"]
      if mean is not None:
        found[epoch] = mean
  return found


def ratio(bn_times, nobn_times, length) -> verdicts.Ratio | None:
  """No-BN / BN ratio from per-seed first times (None = never) and the no-BN run's length.

  None when no BN seed got there.
  """
  bn = [t for t in bn_times if t is not None]
  if not bn:
    return None
  nobn = float(np.mean([length if t is None else t for t in nobn_times]))
  return verdicts.Ratio(nobn / float(np.mean(bn)), any(t is None for t in nobn_times),
                        float(np.mean(bn)), nobn)


def epochs_ratio(runs, optimizer, threshold) -> verdicts.Ratio | None:
  """No-BN epochs / BN epochs to reach `threshold` validation accuracy, or None.

  None when BN (or the pair) is missing or no BN seed reached the threshold.
  """
  bn, nobn = runs.get(f"{optimizer}_bn"), runs.get(f"{optimizer}_nobn")
  if bn is None or nobn is None:
    return None

  def epochs(run):
    return [None if h is None else h["epoch"] for h in
            _common.first_reaching(run["history"], "validation_accuracy", threshold)]
  return ratio(epochs(bn), epochs(nobn), nobn["history"][-1]["epoch"])


def mlp_reach(run, threshold) -> list[int | None]:
  """Per seed, the first evaluation step with test accuracy >= threshold (or None)."""
  history = [{"step": step, "epoch": step, "test_accuracy": acc}
             for step, acc in zip(run["steps"], run["test_accuracy"])]
  return [None if h is None else h["step"]
          for h in _common.first_reaching(history, "test_accuracy", threshold)]


def mlp_ratio(runs, threshold) -> verdicts.Ratio | None:
  """No-BN steps / BN steps to reach `threshold` test accuracy, or None."""
  return ratio(mlp_reach(runs["bn"], threshold), mlp_reach(runs["nobn"], threshold),
               runs["nobn"]["steps"][-1])


def stuck_seeds(run) -> tuple[int, int]:
  """(seeds whose final validation accuracy is below STUCK_ACCURACY, seeds)."""
  if run is None:
    return 0, 0
  final = np.asarray(run["history"][-1]["validation_accuracy"], float)
  return int(np.sum(np.nan_to_num(final, nan=0.0) < STUCK_ACCURACY)), int(final.size)


def near_best(results, optimizer) -> dict[bool, list[float]]:
  """`{use_bn: learning rates whose mean accuracy is near the optimizer's best}`."""
  cells = {c["use_bn"]: c for c in results["cells"].values() if c["optimizer"] == optimizer}
  best = max(max(c["mean"]) for c in cells.values())
  return {use_bn: [lr for lr, acc in zip(results["learning_rates"], c["mean"])
                   if acc >= best - verdicts.NEAR_BEST_POINTS / 100]
          for use_bn, c in cells.items()}


def tuned_comparison(records) -> list[tuple[str, float]]:
  """BN at its best swept learning rate vs no BN at Keras' default, in epochs.

  From the CNN learning-rate sweep (accuracy after its budget) and the main
  BN vs no BN run (no BN at Keras' default learning rate, every evaluation):
  how long no BN at the default takes to reach what BN at its best learning
  rate reached within the sweep's budget.

  Returns:
    Per optimizer, (the finding in words, no-BN epochs / the sweep's epochs).
  """
  sweep = next((rec["results"] for rec in records.values()
                if rec["experiment"] == "lr_sweep" and rec["results"]["model"] == "cnn"),
               None)
  main = records.get("bn_vs_nobn")
  if sweep is None or main is None:
    return []
  runs, found = main["results"]["runs"], []
  for optimizer in dict.fromkeys(c["optimizer"] for c in sweep["cells"].values()):
    bn_cell = sweep["cells"].get(f"{optimizer}_bn")
    nobn_cell = sweep["cells"].get(f"{optimizer}_nobn")
    nobn_run = runs.get(f"{optimizer}_nobn")
    if bn_cell is None or nobn_cell is None or nobn_run is None:
      continue
    target = bn_cell["best_accuracy"]
    hits = _common.first_reaching(nobn_run["history"], "validation_accuracy", target)
    length = nobn_run["history"][-1]["epoch"]
    epochs = [length if h is None else h["epoch"] for h in hits]
    lower = any(h is None for h in hits)
    value = float(np.mean(epochs)) / sweep["epochs"]
    found.append((
        f"{optimizer}: BN at lr {bn_cell['best_learning_rate']:g} reaches "
        f"{100 * target:.2f}% in {sweep['epochs']:g} epoch; no BN at Keras' lr "
        f"{nobn_run['learning_rate']:g} needs {'more than ' if lower else ''}"
        f"{np.mean(epochs):.2g} epochs for it ({'>= ' if lower else ''}{value:.2g}x), "
        f"no BN at its own best lr {nobn_cell['best_learning_rate']:g} reaches "
        f"{100 * nobn_cell['best_accuracy']:.2f}% in {sweep['epochs']:g} epoch", value))
  return found


# --- the inputs of each verdict rule, from one record ----------------------------

_SCALE_ERRORS = ("output_rel_error", "weight_grad_rel_error", "input_grad_rel_error")


def scale_invariance_verdict(results) -> verdicts.Verdict:
  """`verdicts.scale_invariance` on the worst errors of the scale_invariance results."""
  exact, with_epsilon = {}, {}
  for case in results["cases"]:
    if case["epsilon"] <= verdicts.EXACT_EPSILON:
      rows = [row for row in case["rows"] if row["a"] >= 0.1]
      worst = max(row[k]["max"] for row in rows for k in _SCALE_ERRORS)
      exact[case["dtype"]] = max(worst, exact.get(case["dtype"], 0.0))
    else:
      with_epsilon[f"{case['dtype']} with epsilon {case['epsilon']:g}"] = max(
          row[k]["max"] for row in case["rows"] for k in _SCALE_ERRORS)
  return verdicts.scale_invariance(exact, with_epsilon)


def feature_scaling_verdict(summary) -> verdicts.Verdict:
  """`verdicts.feature_scaling` on the means of the feature_scaling summary."""
  keys = ("dollars_inches", "kilodollars_feet", "standardized")
  return verdicts.feature_scaling(
      {k: summary[k]["condition_number"]["mean"] for k in keys},
      {k: summary[k]["gd_steps"]["mean"] for k in keys})


def running_statistics_verdict(results) -> verdicts.Verdict:
  """`verdicts.running_statistics` on the inference_stats results (biased variants)."""
  biased = [v for v in results["variants"].values() if not v["unbiased_running_var"]]
  batch = {int(k): v for k, v in results["batch_stats_by_batch_size"].items() if "mean" in v}
  return verdicts.running_statistics(
      {v["momentum"]: v["summary"]["mean"] for v in biased},
      {v["momentum"]: v["weight_of_initial_state"] for v in biased},
      [v["mean"] for v in results["running_stats_by_batch_size"].values()],
      batch[max(batch)]["mean"], results["steps"])


def parameter_table_verdict(results) -> verdicts.Verdict:
  matches = results["matches_seed"]
  return verdicts.parameter_table(matches["totals"], matches["rows"])
