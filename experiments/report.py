"""Writes docs/results.md (and docs/figures/*.png) from the experiments' JSON files.

  python -m experiments.report --workdir runs/experiments [--output docs/results.md]

Every table is generated from `WORKDIR/NAME.json` and headed by the command
recorded in that file; every figure is `WORKDIR/NAME.png` copied to
docs/figures/. Missing experiments are listed as not run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
from typing import NamedTuple

import numpy as np

from experiments import _mnist

# Sections in the order they appear in docs/results.md.
SECTIONS = ("bn_vs_nobn", "lr_sweep", "bn_paper_mlp", "feature_scaling",
            "scale_invariance", "inference_stats", "param_table")


def _load_all(workdir) -> dict:
  """{file stem: record} of every experiment JSON in `workdir`."""
  records = {}
  for path in sorted(glob.glob(os.path.join(workdir, "*.json"))):
    with open(path) as f:
      record = json.load(f)
    if record.get("experiment") in SECTIONS:
      record["stem"] = os.path.basename(path)[:-len(".json")]  # NAME[_TAG][_MODEL]
      records[record["stem"]] = record
  return records


def _pct(stats, digits=2) -> str:
  """'98.12 ± 0.10' from a mean_std dict of fractions."""
  if stats is None or stats.get("mean") is None:
    return "n/a"
  return f"{100 * stats['mean']:.{digits}f} ± {100 * stats['std']:.{digits}f}"


def _num(stats, fmt="{:.4g}") -> str:
  if stats is None or stats.get("mean") is None:
    return "n/a"
  return f"{fmt.format(stats['mean'])} ± {fmt.format(stats['std'])}"


REACH_THRESHOLDS = (0.97, 0.98, 0.99)


def _seed_stats(values) -> dict:
  """mean_std-like dict over seeds (ignoring NaN, i.e. diverged seeds)."""
  values = np.asarray(values, float)
  finite = values[np.isfinite(values)]
  if not finite.size:
    return {"mean": None, "std": None}
  return {"mean": float(finite.mean()),
          "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0}


def _reach_cell(hits) -> str:
  """'1.25 ± 0.00 (1,952 steps) (2 of 3 seeds)' from first_reaching's per-seed hits."""
  reached = [h for h in hits if h is not None]
  if not reached:
    return "-"
  epochs = [h["epoch"] for h in reached]
  text = (f"{np.mean(epochs):.2f} ± {np.std(epochs, ddof=1) if len(epochs) > 1 else 0.0:.2f}"
          f" ({np.mean([h['step'] for h in reached]):,.0f} steps)")
  return text + ("" if len(epochs) == len(hits) else f" ({len(epochs)} of {len(hits)} seeds)")


def _epochs_verdict(runs, claim) -> str:
  """Compares the BN runs' epoch 1-3 validation accuracy with the seed's."""
  words = []
  for optimizer in _optimizers(runs):
    history = runs[f"{optimizer}_bn"]["history"]
    by_epoch = {int(round(h["epoch"])): _seed_stats(h["validation_accuracy"])["mean"]
                for h in history if abs(h["epoch"] - round(h["epoch"])) < 1e-9}
    epochs = [e for e in (1, 2, 3) if e in by_epoch and by_epoch[e] is not None]
    if not epochs:
      continue
    gaps = [100 * (by_epoch[e] - claim[str(e)]) for e in epochs]
    if min(gaps) >= -0.3:
      words.append(f"{optimizer} matches or exceeds it")
    elif max(gaps) < -0.3:
      words.append(f"{optimizer} is below it by {-max(gaps):.1f}-{-min(gaps):.1f} points")
    else:
      words.append(f"{optimizer} is within 0.3 points at some epochs and below at others")
  return "; ".join(words) if words else "not tested at the seed's epochs"


MLP_THRESHOLDS = (0.90, 0.95, 0.97, 0.975)


def _mlp_reach(run, threshold):
  """Per seed, the first evaluation step with test accuracy >= threshold (or None)."""
  history = [{"step": step, "epoch": step, "test_accuracy": acc}
             for step, acc in zip(run["steps"], run["test_accuracy"])]
  return [None if h is None else h["step"]
          for h in _mnist.first_reaching(history, "test_accuracy", threshold)]


def _steps_cell(steps) -> str:
  reached = [s for s in steps if s is not None]
  if not reached:
    return "-"
  text = f"{np.mean(reached):,.0f} ± {np.std(reached, ddof=1) if len(reached) > 1 else 0:,.0f}"
  return text + ("" if len(reached) == len(steps) else f" ({len(reached)} of {len(steps)})")


def _mlp_ratio(runs, threshold) -> Ratio | None:
  """No-BN steps / BN steps to reach `threshold` test accuracy, or None."""
  return _ratio(_mlp_reach(runs["bn"], threshold), _mlp_reach(runs["nobn"], threshold),
                runs["nobn"]["steps"][-1])


def _tuned_comparison(records) -> list[tuple[str, float]]:
  """BN at its best swept learning rate vs no BN at Keras' default, in epochs.

  From the CNN learning-rate sweep (accuracy after its budget) and the main
  BN vs no BN run (no BN at Keras' default learning rate, every evaluation):
  how long no BN at the default takes to reach what BN at its best learning
  rate reached within the sweep's budget.
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
    hits = _mnist.first_reaching(nobn_run["history"], "validation_accuracy", target)
    length = nobn_run["history"][-1]["epoch"]
    epochs = [length if h is None else h["epoch"] for h in hits]
    lower = any(h is None for h in hits)
    ratio = float(np.mean(epochs)) / sweep["epochs"]
    found.append((
        f"{optimizer}: BN at lr {bn_cell['best_learning_rate']:g} reaches "
        f"{100 * target:.2f}% in {sweep['epochs']:g} epoch; no BN at Keras' lr "
        f"{nobn_run['learning_rate']:g} needs {'more than ' if lower else ''}"
        f"{np.mean(epochs):.2g} epochs for it ({'>= ' if lower else ''}{ratio:.2g}x), "
        f"no BN at its own best lr {nobn_cell['best_learning_rate']:g} reaches "
        f"{100 * nobn_cell['best_accuracy']:.2f}% in {sweep['epochs']:g} epoch", ratio))
  return found


STUCK_ACCURACY = 0.5  # a run that ends below this never trained


def _stuck_seeds(run) -> tuple[int, int]:
  """(seeds whose final validation accuracy is below STUCK_ACCURACY, seeds)."""
  if run is None:
    return 0, 0
  final = np.asarray(run["history"][-1]["validation_accuracy"], float)
  return int(np.sum(np.nan_to_num(final, nan=0.0) < STUCK_ACCURACY)), int(final.size)


def _epochs_text(epochs: float) -> str:
  return f"{epochs:g} epoch" + ("" if epochs == 1 else "s")


def _lr_text(learning_rate) -> str:
  return "none" if learning_rate is None else f"{learning_rate:g}"


def _optimizers(runs) -> list[str]:
  return list(dict.fromkeys(run["optimizer"] for run in runs.values()))


class Ratio(NamedTuple):
  """How many times BN's time (epochs or steps) no BN needed to reach an accuracy.

  `nobn` counts the no-BN seeds that never got there at the run's length, so
  with `lower_bound` True the ratio is a lower bound.
  """
  value: float
  lower_bound: bool
  bn: float  # mean over the BN seeds that got there
  nobn: float


def _ratio(bn_times, nobn_times, length) -> Ratio | None:
  """Ratio from per-seed first times (None = never) and the no-BN run's length."""
  bn = [t for t in bn_times if t is not None]
  if not bn:
    return None
  nobn = float(np.mean([length if t is None else t for t in nobn_times]))
  return Ratio(nobn / float(np.mean(bn)), any(t is None for t in nobn_times),
               float(np.mean(bn)), nobn)


def _epochs_ratio(runs, optimizer, threshold) -> Ratio | None:
  """No-BN epochs / BN epochs to reach `threshold` validation accuracy, or None.

  None when BN (or the pair) is missing or no BN seed reached the threshold.
  """
  bn, nobn = runs.get(f"{optimizer}_bn"), runs.get(f"{optimizer}_nobn")
  if bn is None or nobn is None:
    return None
  def epochs(run):
    return [None if h is None else h["epoch"] for h in
            _mnist.first_reaching(run["history"], "validation_accuracy", threshold)]
  return _ratio(epochs(bn), epochs(nobn), nobn["history"][-1]["epoch"])


def _ratio_text(ratio: Ratio | None) -> str:
  if ratio is None:
    return "n/a (BN never reached it)"
  return f"{'>= ' if ratio.lower_bound else ''}{ratio.value:.2g}x"


def _ratio_verdict(ratio: Ratio | None) -> str:
  """Plain words for a no-BN / BN epochs ratio."""
  if ratio is None:
    return "not measurable (BN never reached it)"
  if ratio.lower_bound:
    return (f"BN took {ratio.bn:.2g} epochs, not every no-BN seed had got there when "
            f"the run ended: >= {ratio.value:.2g}x"
            + (", consistent with 10x" if ratio.value >= 8 else ""))
  value = f"{ratio.value:.2g}x (BN {ratio.bn:.2g}, no BN {ratio.nobn:.2g} epochs)"
  if ratio.value >= 8:
    return f"{value}: consistent with 10x"
  if ratio.value >= 1.25:
    return f"{value}: BN faster, but not 10x"
  if ratio.value > 0.8:
    return f"{value}: about the same"
  return f"{value}: no BN faster"


def _tenfold_verdict(ratios: dict) -> str:
  """Verdict on '10x more epochs' from `{(optimizer, threshold): Ratio | None}`."""
  measured = [x for x in ratios.values() if x is not None]
  exact = [x.value for x in measured if not x.lower_bound]
  bounds = [x.value for x in measured if x.lower_bound]
  if not measured:
    return "not tested: BN never reached the thresholds"
  if all(x.value >= 8 for x in measured):
    return "holds for every optimizer and threshold"
  if any(x.value >= 8 for x in measured):
    where = ", ".join(f"{optimizer} at {100 * threshold:g}%"
                      for (optimizer, threshold), x in ratios.items()
                      if x is not None and x.value >= 8)
    return f"holds only for {where}; elsewhere the ratios (or their lower bounds) are below 8x"
  words = []
  if exact:
    words.append(f"no BN needs {min(exact):.2g}-{max(exact):.2g}x the epochs of BN, "
                 "not 10x")
  if bounds:
    words.append("where no BN did not get there within the run the bound is "
                 f">= {min(bounds):.2g}-{max(bounds):.2g}x, which neither confirms nor "
                 "rules out 10x")
  return "does not reproduce: " + "; ".join(words) if exact else "; ".join(words)


NEAR_BEST_POINTS = 5.0  # percentage points from the best run that still count as usable


def _near_best(results, optimizer):
  """{use_bn: learning rates whose mean accuracy is near the optimizer's best}."""
  cells = {c["use_bn"]: c for c in results["cells"].values() if c["optimizer"] == optimizer}
  best = max(max(c["mean"]) for c in cells.values())
  return {use_bn: [lr for lr, acc in zip(results["learning_rates"], c["mean"])
                   if acc >= best - NEAR_BEST_POINTS / 100]
          for use_bn, c in cells.items()}


def _provenance(record) -> str:
  return (f"Command: `{record['command']}` (commit {record['git_commit']}, "
          f"{len(record['seeds'])} seed(s) {record['seeds']}, "
          f"{record['wall_time_s']:.0f} s on {record['platform']}).")


class Report:
  def __init__(self, workdir, output):
    self.workdir = workdir
    self.output = output
    self.figure_dir = os.path.join(os.path.dirname(output), "figures")
    self.lines = []

  def add(self, *lines):
    self.lines.extend(lines)

  def figure(self, record, caption):
    source = os.path.join(self.workdir, f"{record['stem']}.png")
    if not os.path.exists(source):
      return
    os.makedirs(self.figure_dir, exist_ok=True)
    shutil.copy(source, os.path.join(self.figure_dir, f"{record['stem']}.png"))
    self.add(f"![{caption}](figures/{record['stem']}.png)", "",
             f"*Figure: {caption}. Produced by `{record['command']}`.*", "")

  # --- sections -------------------------------------------------------------

  def param_table(self, record):
    r = record["results"]
    cnn = r["seed_cnn"]
    ok = r["matches_seed"]["totals"] and r["matches_seed"]["rows"]
    self.add("## 7. The seed's parameter table", "", _provenance(record), "",
             "The seed's Keras `model.summary()` says 38,910 parameters: 38,650 "
             "trainable, 260 non-trainable. From `training.models.seed_cnn` "
             "(`models.parameter_table`):", "", "```", cnn["formatted"], "```", "",
             f"**{'Reproduced exactly' if ok else 'Does NOT match'}**: every layer's output "
             f"shape and count {'matches' if ok else 'compared with'} the seed "
             f"({cnn['total']:,} / {cnn['trainable']:,} / {cnn['non_trainable']:,}). "
             f"jaxbn's state additionally holds {cnn['bn_update_counters_int32']} int32 "
             "update counters (one per BN layer), which Keras does not have and which "
             "are not counted above.", "",
             "| model | total | trainable | non-trainable (running mean + var) |",
             "|---|---:|---:|---:|")
    for key, label in (("seed_cnn", "seed CNN (bias before BN, as in Keras)"),
                       ("seed_cnn_no_bias_before_bn", "seed CNN, no bias before BN"),
                       ("seed_cnn_without_bn", "seed CNN without BN"),
                       ("bn_paper_mlp", "BN paper MLP (3x100 sigmoid)")):
      t = r[key]
      self.add(f"| {label} | {t['total']:,} | {t['trainable']:,} | {t['non_trainable']:,} |")
    self.add("")

  def feature_scaling(self, record):
    r = record["results"]
    s = r["summary"]
    population = r["population_condition_number"]
    self.add("## 4. Feature scaling (seed 003)", "", _provenance(record), "",
             f"{r['n']:,} people per seed: income ~ N(3000, 400) dollars, height ~ N(69, 3) "
             "inches; least squares without intercept, `H = X^T X / n`. Scaling with "
             "`jaxbn.fit_standardize` / `jaxbn.standardize` (ddof=0 and 1) and "
             "`jaxbn.fit_min_max` / `jaxbn.min_max_scale`. Gradient descent from w = 0 "
             f"with step {r['step_size']} until the loss gap is {r['tolerance']:g} of the "
             "initial one (float64).", "",
             "| features | seed's cond(H) | cond(H), this run | population cond(E[xx^T]) "
             "| GD steps to converge |", "|---|---:|---:|---:|---:|")
    labels = {"dollars_inches": "dollars, inches", "kilodollars_feet": "thousand $, feet",
              "standardized": "standardized (ddof=0)",
              "standardized_ddof1": "standardized (ddof=1)", "min_max": "min-max to [0, 1]"}
    for key, label in labels.items():
      claim = s[key]["seed_claim_condition_number"]
      claim = "n/a" if claim is None else ("about 1" if claim == 1 else f"{claim:g}")
      pop = population.get(key)
      self.add(f"| {label} | {claim} | {_num(s[key]['condition_number'])} | "
               f"{'n/a' if pop is None else f'{pop:.4g}'} | "
               f"{_num(s[key]['gd_steps'], '{:.0f}')} |")
    d, k = s["dollars_inches"], s["kilodollars_feet"]
    self.add("", "Verdict: the seed's qualitative claim holds -- the raw units give a "
             f"condition number of {d['condition_number']['mean']:.3g} and GD needs "
             f"{d['gd_steps']['mean']:.3g} steps, rescaling the units gives "
             f"{k['condition_number']['mean']:.4g} and {k['gd_steps']['mean']:.0f} steps, "
             "standardization gives about 1 and 1-2 steps. The exact numbers are "
             f"{d['condition_number']['mean'] / 9.2e4 - 1:.0%} and "
             f"{k['condition_number']['mean'] / 281.7 - 1:.0%} above the seed's "
             "(9.2e4, 281.7): the population values of the seed's own "
             f"distributions are {population['dollars_inches']:.4g} and "
             f"{population['kilodollars_feet']:.4g}; the seed's numbers come from one "
             "unnamed sample. Min-max scaling leaves the features uncentered, so its "
             "condition number stays in the tens (and varies with the sample extremes).",
             "")
    self.figure(record, "Condition numbers and gradient-descent steps per feature scaling")

  def scale_invariance(self, record):
    r = record["results"]
    self.add("## 5. Scale invariance (BN paper section 3.3)", "", _provenance(record), "",
             f"`y = jaxbn.batch_norm(Wu)` in training mode, batch {r['batch']}, "
             f"{r['fan_in']} -> {r['fan_out']} features; max relative errors (worst seed) of "
             "`BN(aWu)` vs `BN(Wu)`, of `a * dL/d(aW)` vs `dL/dW`, and of `dL/du` at `aW` "
             "vs at `W`:", "")
    header = "| dtype | epsilon | quantity | " + " | ".join(
        f"a={a:g}" for a in r["scales"]) + " |"
    self.add(header, "|---|---|---|" + "---:|" * len(r["scales"]))
    for case in r["cases"]:
      for key, label in (("output_rel_error", "BN output"),
                         ("weight_grad_rel_error", "a * grad W"),
                         ("input_grad_rel_error", "grad u")):
        self.add(f"| {case['dtype']} | {case['epsilon']:g} | {label} | " + " | ".join(
            f"{row[key]['max']:.1e}" for row in case["rows"]) + " |")
    def worst(dtype, epsilon, a):
      case = next(c for c in r["cases"] if c["dtype"] == dtype and c["epsilon"] == epsilon)
      row = next(x for x in case["rows"] if x["a"] == a)
      return max(row[k]["max"] for k in ("output_rel_error", "weight_grad_rel_error",
                                         "input_grad_rel_error"))

    exact = {c["dtype"]: max(row[k]["max"] for row in c["rows"] if row["a"] >= 0.1
                             for k in ("output_rel_error", "weight_grad_rel_error",
                                       "input_grad_rel_error"))
             for c in r["cases"] if c["epsilon"] == min(r["epsilons"])}
    self.add("", "Verdict: holds to rounding error ("
             + ", ".join(f"{d} <= {e:.0e}" for d, e in exact.items())
             + " for a >= 0.1 with epsilon -> 0) as long as `a^2 var(Wu)` is large "
             "compared with epsilon. Epsilon is what breaks it: with epsilon = 1e-5 "
             f"(jaxbn/flax/PyTorch default) the worst error is {worst('float32', 1e-5, 2.0):.0e} "
             f"at a = 2, {worst('float32', 1e-5, 0.01):.0%} at a = 0.01 and "
             f"{worst('float32', 1e-5, 0.001):.0%} at a = 0.001; with Keras' 1e-3 it is "
             f"{worst('float32', 1e-3, 2.0):.0e} at a = 2. So BN's invariance -- and the "
             "gradient shrinking as 1/a as weights grow -- is exact only up to the epsilon "
             "term, and layers whose pre-activation variance is near epsilon are not "
             "normalized.", "")
    self.figure(record, "Scale invariance errors vs weight scale a")

  def bn_vs_nobn(self, record):
    r = record["results"]
    runs = r["runs"]
    raw = r.get("pixel_scale") == 1.0
    title = ("## 1b. BN vs no BN on the seed CNN, raw 0-255 pixels" if raw else
             "## 1. BN vs no BN on the seed CNN (MNIST)")
    first = next(iter(runs.values()))
    self.add(title, "", _provenance(record), "",
             f"Training on {r['train_examples']:,} images, validation on "
             f"{r['validation_examples']:,} held-out training images (train[50000:]), "
             f"batch {r['batch_size']} ({first['steps_per_epoch']} steps per epoch), "
             f"{r['epochs']:g} epochs, inputs "
             + ("**the raw pixel values 0-255** (no input scaling)" if raw else
                "pixels scaled to [0, 1]")
             + f"; evaluated every 1/{r['evals_per_epoch']} epoch with the running "
             "statistics (inference mode, as Keras' `val_acc`). Learning rates are "
             "Keras' defaults. Validation accuracy (%) at the end of each epoch, mean ± "
             "std over seeds (every evaluation is in the JSON and the figure):", "")
    epoch_ends = [i for i, h in enumerate(first["history"])
                  if abs(h["epoch"] - round(h["epoch"])) < 1e-9 and h["epoch"] >= 1]
    self.add("| run | " + " | ".join(f"ep {first['history'][i]['epoch']:.0f}"
                                     for i in epoch_ends) + " |",
             "|---|" + "---:|" * len(epoch_ends))
    for label, run in runs.items():
      self.add(f"| {label} | " + " | ".join(
          _pct(_seed_stats(run["history"][i]["validation_accuracy"]))
          for i in epoch_ends) + " |")
    claim = r["seed_claim"]["bn_validation_accuracy_after_epoch"]
    self.add("| seed's Keras run (BN, optimizer not stated) | " + " | ".join(
        f"{100 * claim[str(int(round(first['history'][i]['epoch'])))]:.2f}"
        if str(int(round(first["history"][i]["epoch"]))) in claim else ""
        for i in epoch_ends) + " |")
    self.add("", "Epochs (and mean steps) to first reach a validation accuracy: mean ± "
             "std over the seeds that reached it (resolution: one evaluation, 1/"
             f"{r['evals_per_epoch']} epoch = {first['steps_per_epoch'] // r['evals_per_epoch']}"
             " steps); '(k of n seeds)' when only k got there, '-' when none did within "
             "the run:", "",
             "| run | " + " | ".join(f"{100 * t:g}%" for t in REACH_THRESHOLDS) + " |",
             "|---|" + "---:|" * len(REACH_THRESHOLDS))
    for label, run in runs.items():
      self.add(f"| {label} | " + " | ".join(
          _reach_cell(_mnist.first_reaching(run["history"], "validation_accuracy", t))
          for t in REACH_THRESHOLDS) + " |")
    self.add("", "How many times the epochs of BN the network without BN needs "
             "(no BN / BN, means over seeds; '>= x' when some no-BN seeds never got "
             "there, counting them at the run's length):", "",
             "| optimizer | " + " | ".join(f"{100 * t:g}%" for t in REACH_THRESHOLDS) + " |",
             "|---|" + "---:|" * len(REACH_THRESHOLDS))
    for optimizer in _optimizers(runs):
      self.add(f"| {optimizer} | " + " | ".join(
          _ratio_text(_epochs_ratio(runs, optimizer, t)) for t in REACH_THRESHOLDS) + " |")
    self.add("", "Wall time per run of all seeds (training and evaluations): "
             + ", ".join(f"{label} {run['wall_time_s'] / 60:.1f} min"
                         for label, run in runs.items()) + ".", "")
    self.figure(record, "Validation accuracy of the seed CNN with and without BN"
                + (", raw pixels" if raw else ""))

  def lr_sweep(self, record):
    r = record["results"]
    cells = r["cells"]
    model = {"cnn": "the seed CNN", "mlp": "the BN paper's sigmoid MLP"}[r["model"]]
    self.add(f"## 2{'a' if r['model'] == 'cnn' else 'b'}. Learning-rate robustness: "
             f"{model}", "", _provenance(record), "",
             f"{r['steps']} steps of batch {r['batch_size']} per run "
             f"({_epochs_text(r['epochs'])}, the same budget for every "
             "learning rate); "
             f"final accuracy on {r['validation_examples']:,} validation images (%), "
             "mean ± std over seeds; a diverged run (non-finite loss) counts as 10% and is "
             "marked with its number of diverged seeds. BN runs are evaluated with running "
             f"statistics (momentum 0.99), which after {r['steps']} steps still weigh their "
             f"initial values (mean 0, variance 1) by 0.99^{r['steps']} = "
             f"{0.99 ** r['steps']:.0%}.", "",
             "| learning rate | " + " | ".join(cells) + " |",
             "|---:|" + "---:|" * len(cells))
    for i, lr in enumerate(r["learning_rates"]):
      row = []
      for cell in cells.values():
        text = f"{100 * cell['mean'][i]:.1f} ± {100 * cell['std'][i]:.1f}"
        if cell["diverged_seeds"][i]:
          text += f" ({cell['diverged_seeds'][i]} diverged)"
        row.append(text)
      self.add(f"| {lr:g} | " + " | ".join(row) + " |")
    self.add("", f"Usable learning rates: mean accuracy within {NEAR_BEST_POINTS:g} points "
             "of the best run of the same optimizer (BN or not):", "")
    for label, cell in cells.items():
      good = _near_best(r, cell["optimizer"]).get(cell["use_bn"], [])
      listed = ", ".join(f"{x:g}" for x in good) or "none"
      self.add(f"- {label}: {len(good)} of {len(r['learning_rates'])} ({listed}); best "
               f"{100 * cell['best_accuracy']:.1f}% at lr={cell['best_learning_rate']:g}")
    self.add("")
    self.figure(record, f"Validation accuracy vs learning rate, {model}, with and "
                "without BN")

  def bn_paper_mlp(self, record):
    r = record["results"]
    runs = r["runs"]
    self.add("## 3. The BN paper's MNIST MLP (Figure 1)", "", _provenance(record), "",
             f"3 hidden layers of 100 sigmoid units, batch {r['batch_size']}, SGD lr "
             f"{r['learning_rate']}, {r['steps']:,} steps (the paper: 50,000), test accuracy "
             f"on {r['test_examples']:,} test images every {r['eval_every']} steps. Input of "
             f"last-hidden-layer unit {r['unit']}: 15th/50th/85th percentiles over the test "
             "set (inference mode). Jitter ('drift per interval') = mean |change of a unit's "
             "median| between consecutive evaluations divided by its 15-85 width, averaged "
             "over all 100 units; total shift = |median(end) - median(at 10% of training)| "
             "/ width, averaged over units: the systematic change of the distribution the "
             "next layer sees.", "",
             "| run | final test accuracy (%) | median drift per interval (all) | "
             "drift after 10% | total shift after 10% |", "|---|---:|---:|---:|---:|")
    for label, run in runs.items():
      self.add(f"| {label} | {_pct(run['final_test_accuracy'])} | "
               f"{_num(run['median_drift_all'], '{:.3f}')} | "
               f"{_num(run['median_drift_after_10pct'], '{:.3f}')} | "
               f"{_num(run['median_total_shift_after_10pct'], '{:.3f}')} |")
    self.add("", "Test accuracy (%) over training, mean ± std:", "",
             "| step | " + " | ".join(runs) + " |", "|---:|" + "---:|" * len(runs))
    steps = next(iter(runs.values()))["steps"]
    # Early steps densely (where the curves differ), then every tenth of the run.
    shown = {0, len(steps) - 1}
    shown |= {i for i, step in enumerate(steps) if step in (500, 1000, 2000, 3000)}
    shown |= set(range(0, len(steps), max(1, len(steps) // 10)))
    for i in sorted(shown):
      row = []
      for run in runs.values():
        acc = np.asarray(run["test_accuracy"][i], float)
        row.append(_pct({"mean": np.nanmean(acc),
                         "std": np.nanstd(acc, ddof=1) if acc.size > 1 else 0.0}))
      self.add(f"| {steps[i]} | " + " | ".join(row) + " |")
    self.add("", "Steps to first reach a test accuracy (mean ± std over seeds; resolution "
             f"{r['eval_every']} steps; '-' = not within the run) and how many times BN's "
             "steps the network without BN needed:", "",
             "| run | " + " | ".join(f"{100 * t:g}%" for t in MLP_THRESHOLDS) + " |",
             "|---|" + "---:|" * len(MLP_THRESHOLDS))
    for label, run in runs.items():
      self.add(f"| {label} | " + " | ".join(
          _steps_cell(_mlp_reach(run, t)) for t in MLP_THRESHOLDS) + " |")
    self.add("| no BN / BN | " + " | ".join(
        _ratio_text(_mlp_ratio(runs, t)) for t in MLP_THRESHOLDS) + " |", "")
    self.figure(record, "BN paper Figure 1: test accuracy and a sigmoid input's percentiles")

  def inference_stats(self, record):
    r = record["results"]
    self.add("## 6. Inference: running vs batch statistics", "", _provenance(record), "",
             f"Seed CNN with BN, {r['optimizer']}, batch {r['batch_size']}, {r['steps']} "
             f"steps; test accuracy (%) on the first {r['test_examples']:,} test images "
             f"(batch sizes below 50 and the running-statistics sweep: first "
             f"{r['small_test_examples']:,}).", "",
             "Running statistics by variant (one training run, all variants tracked):", "",
             "| running statistics | test accuracy (%) | weight of the initial (0, 1) "
             "state left |", "|---|---:|---:|")
    for name, v in r["variants"].items():
      self.add(f"| {name} | {_pct(v['summary'])} | {v['weight_of_initial_state']:.2g} |")
    over = r.get("variants_over_training")
    if over:
      steps = next(iter(over.values()))["steps"]
      self.add("", "The same variants over training (test accuracy %; in brackets the "
               "weight momentum^t that the initial state still has):", "",
               "| running statistics | " + " | ".join(f"step {t}" for t in steps) + " |",
               "|---|" + "---:|" * len(steps))
      for name, curve in over.items():
        self.add(f"| {name} | " + " | ".join(
            f"{_pct(acc)} [{w:.2g}]" for acc, w in zip(curve["test_accuracy"],
                                                      curve["weight_of_initial_state"]))
            + " |")
    self.add("", "Inference batch size (running statistics, momentum 0.99, biased):", "",
             "| batch size | " + " | ".join(r["running_stats_by_batch_size"]) + " |",
             "|---|" + "---:|" * len(r["running_stats_by_batch_size"]),
             "| accuracy (%) | " + " | ".join(
                 _pct(v) for v in r["running_stats_by_batch_size"].values()) + " |", "",
             "Normalizing with each test batch's own statistics (`training=True`):", "",
             "| batch size | accuracy (%) |", "|---:|---|")
    for size, v in r["batch_stats_by_batch_size"].items():
      self.add(f"| {size} | " + (_pct(v) if "mean" in v else f"error: {v['error']}") + " |")
    self.add("")
    self.figure(record, "Running vs batch statistics at inference")

  # --- summary ------------------------------------------------------------

  def summary(self, records):
    """One row per claim; verdicts follow fixed rules on the numbers below."""
    rows = []
    for rec in records.values():
      if rec["experiment"] != "bn_vs_nobn":
        continue
      r, runs = rec["results"], rec["results"]["runs"]
      raw = r.get("pixel_scale") == 1.0
      claim = r["seed_claim"]["bn_validation_accuracy_after_epoch"]
      if not raw:
        parts = []
        for optimizer in _optimizers(runs):
          run = runs.get(f"{optimizer}_bn")
          by_epoch = {int(round(h["epoch"])): h["validation_accuracy"]
                      for h in run["history"] if abs(h["epoch"] - round(h["epoch"])) < 1e-9}
          shown = [e for e in (1, 2, 3) if e in by_epoch]
          if shown:
            parts.append(f"{optimizer}: " + " / ".join(
                f"{100 * _seed_stats(by_epoch[e])['mean']:.2f}" for e in shown))
        if parts:
          rows.append((
              "BN CNN: 96.4 / 98.2 / 98.3% validation after epochs 1-3 (seed 003)",
              "BN, epochs 1 / 2 / 3, mean of seeds: " + "; ".join(parts),
              _epochs_verdict(runs, claim)))
      findings = []
      for optimizer in _optimizers(runs):
        ratios = {t: _epochs_ratio(runs, optimizer, t) for t in (0.98, 0.99)}
        stuck = _stuck_seeds(runs.get(f"{optimizer}_nobn"))
        findings.append(f"{optimizer}: " + ", ".join(
            f"{100 * t:g}%: {_ratio_verdict(x)}" for t, x in ratios.items())
            + (f"; without BN {stuck[0]} of {stuck[1]} seeds never trained (below "
               f"{100 * STUCK_ACCURACY:g}% at the end)" if stuck[0] else ""))
      verdict = _tenfold_verdict({(o, t): _epochs_ratio(runs, o, t)
                                  for o in _optimizers(runs) for t in (0.98, 0.99)})
      never = [o for o in _optimizers(runs) if _stuck_seeds(runs.get(f"{o}_nobn"))[0]]
      if never:
        verdict += ("; more than that: with " + " and ".join(never) + " some seeds "
                    "without BN never train at all, while every BN seed does")
      rows.append((
          "Without BN the CNN needs 10x more epochs to converge (seed 003)"
          + (", raw 0-255 pixels (section 1b)" if raw else ""),
          f"epochs to reach 98% / 99% validation, no BN over BN ({r['epochs']:g} epochs, "
          f"{len(rec['seeds'])} seeds): " + "; ".join(findings),
          verdict))
    tuned = _tuned_comparison(records)
    if tuned:
      rows.append((
          "... where a 10x gap can come from: BN at the learning rate it allows vs no BN "
          "at Keras' default (sections 1 and 2a)",
          "; ".join(text for text, _ in tuned),
          ("a 10x gap does appear when BN's network is also given the higher learning "
           "rate it tolerates and the other keeps Keras' default; each network at its "
           "own best rate is section 2a" if any(x >= 8 for _, x in tuned) else
           "no 10x gap even then")))
    for rec in records.values():
      if rec["experiment"] != "lr_sweep":
        continue
      r = rec["results"]
      parts, wins, higher = [], [], []
      for optimizer in dict.fromkeys(c["optimizer"] for c in r["cells"].values()):
        near = _near_best(r, optimizer)
        if len(near) < 2:  # interrupted run: only one of BN / no BN
          continue
        best = {c["use_bn"]: c for c in r["cells"].values() if c["optimizer"] == optimizer}
        top = {k: max(v, default=None) for k, v in near.items()}
        parts.append(
            f"{optimizer}: {len(near[True])} vs {len(near[False])} of "
            f"{len(r['learning_rates'])} usable, largest usable "
            f"{_lr_text(top[True])} vs {_lr_text(top[False])}, best "
            f"{100 * best[True]['best_accuracy']:.1f}% vs "
            f"{100 * best[False]['best_accuracy']:.1f}%")
        wins.append(len(near[True]) > len(near[False]))
        higher.append(top[True] is not None and (top[False] is None
                                                 or top[True] > top[False]))
      if not wins:
        continue
      lag = 0.99 ** r["steps"]
      verdict = ("holds" if all(wins) and all(higher) else
                 "partly" if any(wins) or any(higher) else "does not reproduce")
      if verdict == "partly":
        verdict += (": " + ", ".join(
            f"{o}: {'wider' if w else 'not wider'} range, "
            f"{'higher' if h else 'no higher'} largest usable rate"
            for o, w, h in zip(dict.fromkeys(c["optimizer"] for c in r["cells"].values()),
                               wins, higher)))
      if lag > 0.05:
        verdict = (f"inconclusive: after {r['steps']} steps BN's running statistics still "
                   f"weigh their initial values by {lag:.0%}, which depresses BN's "
                   "inference accuracy")
      rows.append((f"BN makes training less sensitive to hyperparameters and allows "
                   f"higher learning rates (seeds 000, 002) -- {r['model'].upper()}",
                   f"learning rates within {NEAR_BEST_POINTS:g} points of the optimizer's "
                   f"best after {r['steps']} steps ({_epochs_text(r['epochs'])}), BN vs no BN: "
                   + "; ".join(parts),
                   verdict))
    rec = records.get("bn_paper_mlp")
    if rec is not None:
      runs = rec["results"]["runs"]
      shift = {k: runs[k]["median_total_shift_after_10pct"]["mean"] for k in ("bn", "nobn")}
      jitter = {k: runs[k]["median_drift_after_10pct"]["mean"] for k in ("bn", "nobn")}
      final = {k: runs[k]["final_test_accuracy"]["mean"] for k in ("bn", "nobn")}
      ratios = {t: _mlp_ratio(runs, t) for t in MLP_THRESHOLDS}
      faster = [t for t, x in ratios.items() if x is not None and x[0] > 1]
      shift_ok = shift["bn"] < shift["nobn"]
      verdict = ("holds" if shift_ok and len(faster) == len(ratios) else
                 "partly" if shift_ok or faster else "does not reproduce")
      verdict += (": BN reaches every accuracy level sooner and its sigmoid inputs drift "
                  "less over training" if verdict == "holds" else "")
      if jitter["bn"] > jitter["nobn"]:
        verdict += "; but BN's inputs jitter more from one evaluation to the next"
      rows.append(("BN reduces internal covariate shift and the BN MLP trains faster "
                   "(BN paper Fig. 1, seed 002)",
                   "steps to reach " + ", ".join(
                       f"{100 * t:g}% test accuracy: no BN / BN = {_ratio_text(x)}"
                       for t, x in ratios.items())
                   + f"; final ({runs['bn']['steps'][-1]:,} steps) {100 * final['bn']:.2f}% "
                   f"vs {100 * final['nobn']:.2f}%; median of the last layer's sigmoid "
                   f"inputs moves {shift['bn']:.3f} vs {shift['nobn']:.3f} of their "
                   "15-85 width after the first 10% of training, step-to-step jitter "
                   f"{jitter['bn']:.3f} vs {jitter['nobn']:.3f}",
                   verdict))
    rec = records.get("feature_scaling")
    if rec is not None:
      s = rec["results"]["summary"]
      rows.append(("Feature scaling: cond(H) 9.2e4 -> 281.7 -> ~1, so GD converges "
                   "faster (seed 003)",
                   f"cond {s['dollars_inches']['condition_number']['mean']:.3g} -> "
                   f"{s['kilodollars_feet']['condition_number']['mean']:.4g} -> "
                   f"{s['standardized']['condition_number']['mean']:.3f}; GD steps "
                   f"{s['dollars_inches']['gd_steps']['mean']:.3g} -> "
                   f"{s['kilodollars_feet']['gd_steps']['mean']:.0f} -> "
                   f"{s['standardized']['gd_steps']['mean']:.1f}",
                   "holds (numbers a few % above the seed's single sample)"))
    rec = records.get("scale_invariance")
    if rec is not None:
      exact = [c for c in rec["results"]["cases"] if c["epsilon"] <= 1e-10]
      worst = max(row["output_rel_error"]["max"] for c in exact for row in c["rows"])
      rows.append(("BN(aWu) = BN(Wu) and the gradient scales as 1/a (BN paper 3.3, "
                   "seed 002)",
                   f"max relative error {worst:.1e} with epsilon -> 0; with epsilon "
                   "1e-5 / 1e-3 it breaks once a^2 var(Wu) ~ epsilon",
                   "holds up to epsilon"))
    rec = records.get("inference_stats")
    if rec is not None:
      r = rec["results"]
      running = [v["mean"] for v in r["running_stats_by_batch_size"].values()]
      batch = {k: v for k, v in r["batch_stats_by_batch_size"].items() if "mean" in v}
      smallest = min(batch, key=int)
      by_momentum = {}
      for v in r["variants"].values():
        if not v["unbiased_running_var"]:
          by_momentum[v["momentum"]] = v["summary"]["mean"]
      unbiased_effect = max(
          abs(v["summary"]["mean"] - next(
              w["summary"]["mean"] for w in r["variants"].values()
              if w["momentum"] == v["momentum"] and not w["unbiased_running_var"]))
          for v in r["variants"].values() if v["unbiased_running_var"])
      largest = max(batch, key=int)
      rows.append(("At test time running averages replace batch statistics, robustly "
                   "(seeds 000, 001)",
                   f"after {r['steps']} steps, running statistics give "
                   + ", ".join(f"{100 * acc:.1f}% (momentum {m:g})"
                               for m, acc in by_momentum.items())
                   + ", independent of the inference batch size ("
                   + (f"{100 * min(running):.2f}% for every size: "
                      if max(running) == min(running) else
                      f"{100 * min(running):.2f}-{100 * max(running):.2f}% for sizes ")
                   + f"{', '.join(r['running_stats_by_batch_size'])}); batch statistics give "
                   f"{100 * batch[smallest]['mean']:.1f}% at batch {smallest} and "
                   f"{100 * batch[largest]['mean']:.1f}% at {largest}, batch size 1 is "
                   f"undefined; unbiased running variance changes accuracy by at most "
                   f"{100 * unbiased_effect:.3f} points",
                   "holds once the EMA has forgotten its initial value"
                   + "".join(f"; momentum {m:g} after {r['steps']} steps fails"
                             for m, acc in by_momentum.items()
                             if acc < max(by_momentum.values()) - 0.05)))
    rec = records.get("param_table")
    if rec is not None:
      ok = all(rec["results"]["matches_seed"].values())
      rows.append(("Parameter table 38,910 / 38,650 / 260 (seed 003)",
                   "identical, layer by layer" if ok else "differs",
                   "holds" if ok else "does not reproduce"))
    self.add("## Summary", "", "| claim | what the runs here show | verdict |",
             "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in rows), "")

  def write(self):
    records = _load_all(self.workdir)
    self.add("# jaxbn: what holds of the seeds' claims about batch normalization", "",
             "Generated by `python -m experiments.report --workdir "
             f"{self.workdir}` from the JSON files the experiments wrote; do not edit by "
             "hand. Each section names the exact command (and commit) that produced its "
             "numbers; rerun it to regenerate them. All runs: CPU, float32 unless stated.",
             "")
    self.add(*INTRO, "")
    self.summary(records)
    present = {rec["experiment"] for rec in records.values()}
    missing = [n for n in SECTIONS if n not in present]
    if not any(rec["experiment"] == "lr_sweep" and rec["results"]["model"] == "cnn"
               for rec in records.values()):
      missing.append("lr_sweep on the seed CNN (`--model cnn`, the script's default; "
                     "the sweep below uses the BN paper's MLP)")
    if missing:
      self.add("Not run (no JSON found): " + ", ".join(missing), "")
    quick = [stem for stem, rec in records.items() if rec["quick"]]
    if quick:
      self.add("**Warning: smoke-test (--quick) numbers, not results:** "
               + ", ".join(quick), "")
    for section in SECTIONS:
      for record in records.values():
        if record["experiment"] == section:
          getattr(self, section)(record)
    os.makedirs(os.path.dirname(self.output) or ".", exist_ok=True)
    with open(self.output, "w") as f:
      f.write("\n".join(self.lines).rstrip() + "\n")
    print(f"wrote {self.output}")


INTRO = [
    "All of it, from nothing to this page: `python -m experiments.run_all --workdir "
    "runs/experiments` (the list of commands is `experiments/run_all.py`; each section "
    "below gives the one it ran, the commit and the wall time on this project's 2-core "
    "CPU). Rerun it and the tables and figures come back with the same shape and, up to "
    "XLA:CPU's float rounding across machines, the same numbers: every run is seeded.",
    "",
    "Conventions: MNIST from tfds (`training.input_pipeline`), 50,000 training images "
    "(train[:50000]) and 10,000 validation images (train[50000:]) as in the seed; test = "
    "the 10,000 MNIST test images. Models from `training.models` (the seed's Keras CNN "
    "with Keras' BN momentum 0.99 and epsilon 1e-3; the BN paper's sigmoid MLP). "
    "Accuracies are in %, as mean ± standard deviation (ddof=1) over seeds; each seed "
    "sets the initialization and the data order. BN networks are evaluated with their "
    "running statistics (inference mode) unless stated.",
]


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m experiments.report",
                                   description=__doc__)
  parser.add_argument("--workdir", required=True,
                      help="directory with the experiments' JSON and PNG files")
  parser.add_argument("--output", default="docs/results.md")
  args = parser.parse_args(argv)
  Report(args.workdir, args.output).write()


if __name__ == "__main__":
  main()
