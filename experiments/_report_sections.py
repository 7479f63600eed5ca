"""One section of docs/results.md per experiment: its command, its tables, its figure.

Each function takes the `Page` being written and one experiment record (one JSON
file); `report.SECTIONS` lists them in page order.
"""

from __future__ import annotations

import numpy as np

from experiments import _common
from experiments import _report_numbers as numbers
from experiments import _report_text as text
from experiments import verdicts


def bn_vs_nobn(page: text.Page, record):
  """Section 1 (or 1b, raw pixels): validation accuracy per epoch, epochs to reach."""
  r = record["results"]
  runs = r["runs"]
  raw = r.get("pixel_scale") == 1.0
  title = ("## 1b. BN vs no BN on the MNIST CNN, raw 0-255 pixels" if raw else
           "## 1. BN vs no BN on the MNIST CNN")
  first = next(iter(runs.values()))
  page.add(title, "", text.provenance(record), "",
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
                if numbers.is_epoch_end(h) and h["epoch"] >= 1]
  page.add("| run | " + " | ".join(f"ep {first['history'][i]['epoch']:.0f}"
                                   for i in epoch_ends) + " |",
           "|---|" + "---:|" * len(epoch_ends))
  for label, run in runs.items():
    page.add(text.table_row(label, *(
        text.pct(_common.mean_std(run["history"][i]["validation_accuracy"]))
        for i in epoch_ends)))
  claim = r["seed_claim"]["bn_validation_accuracy_after_epoch"]
  epochs = [str(int(round(first["history"][i]["epoch"]))) for i in epoch_ends]
  page.add(text.table_row("seed's Keras run (BN, optimizer not stated)", *(
      f"{100 * claim[e]:.2f}" if e in claim else "" for e in epochs)))
  page.add("", "Epochs (and mean steps) to first reach a validation accuracy: mean ± "
           "std over the seeds that reached it (resolution: one evaluation, 1/"
           f"{r['evals_per_epoch']} epoch = {first['steps_per_epoch'] // r['evals_per_epoch']}"
           " steps); '(k of n seeds)' when only k got there, '-' when none did within "
           "the run:", "",
           text.table_row("run", *(f"{100 * t:g}%" for t in numbers.REACH_THRESHOLDS)),
           "|---|" + "---:|" * len(numbers.REACH_THRESHOLDS))
  for label, run in runs.items():
    page.add(text.table_row(label, *(
        text.reach_cell(_common.first_reaching(run["history"], "validation_accuracy", t))
        for t in numbers.REACH_THRESHOLDS)))
  page.add("", "How many times the epochs of BN the network without BN needs "
           "(no BN / BN, means over seeds; '>= x' when some no-BN seeds never got "
           "there, counting them at the run's length):", "",
           text.table_row("optimizer", *(f"{100 * t:g}%" for t in numbers.REACH_THRESHOLDS)),
           "|---|" + "---:|" * len(numbers.REACH_THRESHOLDS))
  for optimizer in numbers.optimizers(runs):
    page.add(text.table_row(optimizer, *(
        text.ratio_text(numbers.epochs_ratio(runs, optimizer, t))
        for t in numbers.REACH_THRESHOLDS)))
  page.add("", "Wall time per run of all seeds (training and evaluations): "
           + ", ".join(f"{label} {run['wall_time_s'] / 60:.1f} min"
                       for label, run in runs.items()) + ".", "")
  page.figure(record, "Validation accuracy of the MNIST CNN with and without BN"
              + (", raw pixels" if raw else ""))


def lr_sweep(page: text.Page, record):
  """Section 2a (CNN) or 2b (MLP): final accuracy per learning rate, usable rates."""
  r = record["results"]
  cells = r["cells"]
  model = {"cnn": "the MNIST CNN", "mlp": "the BN paper's sigmoid MLP"}[r["model"]]
  page.add(f"## 2{'a' if r['model'] == 'cnn' else 'b'}. Learning-rate robustness: "
           f"{model}", "", text.provenance(record), "",
           f"{r['steps']} steps of batch {r['batch_size']} per run "
           f"({text.epochs_text(r['epochs'])}, the same budget for every "
           "learning rate); "
           f"final accuracy on {r['validation_examples']:,} validation images (%), "
           "mean ± std over seeds; a diverged run (non-finite loss) counts as 10% and is "
           "marked with its number of diverged seeds. BN runs are evaluated with running "
           f"statistics (momentum 0.99), which after {r['steps']} steps still weigh their "
           f"initial values (mean 0, variance 1) by 0.99^{r['steps']} = "
           f"{0.99 ** r['steps']:.0%}.", "",
           text.table_row("learning rate", *cells),
           "|---:|" + "---:|" * len(cells))
  for i, lr in enumerate(r["learning_rates"]):
    row = []
    for cell in cells.values():
      entry = f"{100 * cell['mean'][i]:.1f} ± {100 * cell['std'][i]:.1f}"
      if cell["diverged_seeds"][i]:
        entry += f" ({cell['diverged_seeds'][i]} diverged)"
      row.append(entry)
    page.add(text.table_row(f"{lr:g}", *row))
  page.add("", f"Usable learning rates: mean accuracy within {verdicts.NEAR_BEST_POINTS:g} "
           "points of the best run of the same optimizer (BN or not):", "")
  for label, cell in cells.items():
    good = numbers.near_best(r, cell["optimizer"]).get(cell["use_bn"], [])
    listed = ", ".join(f"{x:g}" for x in good) or "none"
    page.add(f"- {label}: {len(good)} of {len(r['learning_rates'])} ({listed}); best "
             f"{100 * cell['best_accuracy']:.1f}% at lr={cell['best_learning_rate']:g}")
  page.add("")
  page.figure(record, f"Validation accuracy vs learning rate, {model}, with and "
              "without BN")


def bn_paper_mlp(page: text.Page, record):
  """Section 3: the BN paper's Figure 1 (accuracy and a sigmoid input's percentiles)."""
  r = record["results"]
  runs = r["runs"]
  page.add("## 3. The BN paper's MNIST MLP (Figure 1)", "", text.provenance(record), "",
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
    page.add(text.table_row(label, text.pct(run["final_test_accuracy"]),
                            text.num(run["median_drift_all"], "{:.3f}"),
                            text.num(run["median_drift_after_10pct"], "{:.3f}"),
                            text.num(run["median_total_shift_after_10pct"], "{:.3f}")))
  page.add("", "Test accuracy (%) over training, mean ± std:", "",
           text.table_row("step", *runs), "|---:|" + "---:|" * len(runs))
  steps = next(iter(runs.values()))["steps"]
  # Early steps densely (where the curves differ), then every tenth of the run.
  shown = {0, len(steps) - 1}
  shown |= {i for i, step in enumerate(steps) if step in (500, 1000, 2000, 3000)}
  shown |= set(range(0, len(steps), max(1, len(steps) // 10)))
  for i in sorted(shown):
    row = []
    for run in runs.values():
      acc = np.asarray(run["test_accuracy"][i], float)
      row.append(text.pct({"mean": np.nanmean(acc),
                           "std": np.nanstd(acc, ddof=1) if acc.size > 1 else 0.0}))
    page.add(text.table_row(steps[i], *row))
  page.add("", "Steps to first reach a test accuracy (mean ± std over seeds; resolution "
           f"{r['eval_every']} steps; '-' = not within the run) and how many times BN's "
           "steps the network without BN needed:", "",
           text.table_row("run", *(f"{100 * t:g}%" for t in numbers.MLP_THRESHOLDS)),
           "|---|" + "---:|" * len(numbers.MLP_THRESHOLDS))
  for label, run in runs.items():
    page.add(text.table_row(label, *(text.steps_cell(numbers.mlp_reach(run, t))
                                     for t in numbers.MLP_THRESHOLDS)))
  page.add(text.table_row("no BN / BN", *(text.ratio_text(numbers.mlp_ratio(runs, t))
                                          for t in numbers.MLP_THRESHOLDS)), "")
  page.figure(record, "BN paper Figure 1: test accuracy and a sigmoid input's percentiles")


_FEATURE_LABELS = {"dollars_inches": "dollars, inches", "kilodollars_feet": "thousand $, feet",
                   "standardized": "standardized (ddof=0)",
                   "standardized_ddof1": "standardized (ddof=1)",
                   "min_max": "min-max to [0, 1]"}


def feature_scaling(page: text.Page, record):
  """Section 4: condition numbers and gradient-descent steps per feature scaling."""
  r = record["results"]
  s = r["summary"]
  population = r["population_condition_number"]
  page.add("## 4. Feature scaling (seed 003)", "", text.provenance(record), "",
           f"{r['n']:,} people per seed: income ~ N(3000, 400) dollars, height ~ N(69, 3) "
           "inches; least squares without intercept, `H = X^T X / n`. Scaling with "
           "`jaxbn.scaling.fit_standardize` / `jaxbn.scaling.standardize` (ddof=0 and 1) "
           "and `jaxbn.scaling.fit_min_max` / `jaxbn.scaling.min_max_scale`. Gradient "
           "descent from w = 0 "
           f"with step {r['step_size']} until the loss gap is {r['tolerance']:g} of the "
           "initial one (float64).", "",
           "| features | seed's cond(H) | cond(H), this run | population cond(E[xx^T]) "
           "| GD steps to converge |", "|---|---:|---:|---:|---:|")
  for key, label in _FEATURE_LABELS.items():
    claim = s[key]["seed_claim_condition_number"]
    claim = "n/a" if claim is None else ("about 1" if claim == 1 else f"{claim:g}")
    pop = population.get(key)
    page.add(text.table_row(label, claim, text.num(s[key]["condition_number"]),
                            "n/a" if pop is None else f"{pop:.4g}",
                            text.num(s[key]["gd_steps"], "{:.0f}")))
  d, k = s["dollars_inches"], s["kilodollars_feet"]
  page.add("", f"Verdict: {numbers.feature_scaling_verdict(s).markdown()}.", "",
           f"The raw units give a condition number of {d['condition_number']['mean']:.3g} "
           f"and GD needs {d['gd_steps']['mean']:.3g} steps, rescaling the units gives "
           f"{k['condition_number']['mean']:.4g} and {k['gd_steps']['mean']:.0f} steps, "
           f"standardization gives {s['standardized']['condition_number']['mean']:.3g} and "
           f"{s['standardized']['gd_steps']['mean']:.2g} steps. The population values of the "
           f"seed's own distributions are {population['dollars_inches']:.4g} and "
           f"{population['kilodollars_feet']:.4g}; the seed's numbers come from one "
           "unnamed sample. Min-max scaling leaves the features uncentered, so its "
           f"condition number ({s['min_max']['condition_number']['mean']:.3g} here) varies "
           "with the sample extremes.", "")
  page.figure(record, "Condition numbers and gradient-descent steps per feature scaling")


def scale_invariance(page: text.Page, record):
  """Section 5: relative errors of BN(aWu) vs BN(Wu) and of the gradients, by a."""
  r = record["results"]
  page.add("## 5. Scale invariance (BN paper section 3.3)", "", text.provenance(record), "",
           f"`y = jaxbn.batch_norm(Wu)` in training mode, batch {r['batch']}, "
           f"{r['fan_in']} -> {r['fan_out']} features; max relative errors (worst seed) of "
           "`BN(aWu)` vs `BN(Wu)`, of `a * dL/d(aW)` vs `dL/dW`, and of `dL/du` at `aW` "
           "vs at `W`:", "",
           text.table_row("dtype", "epsilon", "quantity", *(f"a={a:g}" for a in r["scales"])),
           "|---|---|---|" + "---:|" * len(r["scales"]))
  for case in r["cases"]:
    for key, label in (("output_rel_error", "BN output"),
                       ("weight_grad_rel_error", "a * grad W"),
                       ("input_grad_rel_error", "grad u")):
      page.add(text.table_row(case["dtype"], f"{case['epsilon']:g}", label,
                              *(f"{row[key]['max']:.1e}" for row in case["rows"])))

  def worst(dtype, epsilon, a):
    case = next((c for c in r["cases"] if c["dtype"] == dtype and c["epsilon"] == epsilon),
                None)
    row = None if case is None else next((x for x in case["rows"] if x["a"] == a), None)
    if row is None:
      return "n/a"
    error = max(row[k]["max"] for k in ("output_rel_error", "weight_grad_rel_error",
                                        "input_grad_rel_error"))
    return f"{error:.0%}" if error >= 0.01 else f"{error:.0e}"

  page.add("", f"Verdict: {numbers.scale_invariance_verdict(r).markdown()}.", "",
           "Epsilon is what breaks the invariance once `a^2 var(Wu)` is no longer large "
           "compared with it: with epsilon = 1e-5 (jaxbn/flax/PyTorch default) the worst "
           f"error is {worst('float32', 1e-5, 2.0)} at a = 2, "
           f"{worst('float32', 1e-5, 0.01)} at a = 0.01 and "
           f"{worst('float32', 1e-5, 0.001)} at a = 0.001; with Keras' 1e-3 it is "
           f"{worst('float32', 1e-3, 2.0)} at a = 2. So BN's invariance -- and the "
           "gradient shrinking as 1/a as weights grow -- is exact only up to the epsilon "
           "term, and layers whose pre-activation variance is near epsilon are not "
           "normalized.", "")
  page.figure(record, "Scale invariance errors vs weight scale a")


def inference_stats(page: text.Page, record):
  """Section 6: running-statistics variants, inference batch sizes, batch statistics."""
  r = record["results"]
  page.add("## 6. Inference: running vs batch statistics", "", text.provenance(record), "",
           f"MNIST CNN with BN, {r['optimizer']}, batch {r['batch_size']}, {r['steps']} "
           f"steps; test accuracy (%) on the first {r['test_examples']:,} test images "
           f"(batch sizes below 50 and the running-statistics sweep: first "
           f"{r['small_test_examples']:,}).", "",
           "Running statistics by variant (one training run, all variants tracked):", "",
           "| running statistics | test accuracy (%) | weight of the initial (0, 1) "
           "state left |", "|---|---:|---:|")
  for name, v in r["variants"].items():
    page.add(text.table_row(name, text.pct(v["summary"]), f"{v['weight_of_initial_state']:.2g}"))
  over = r.get("variants_over_training")
  if over:
    steps = next(iter(over.values()))["steps"]
    page.add("", "The same variants over training (test accuracy %; in brackets the "
             "weight momentum^t that the initial state still has):", "",
             text.table_row("running statistics", *(f"step {t}" for t in steps)),
             "|---|" + "---:|" * len(steps))
    for name, curve in over.items():
      page.add(text.table_row(name, *(
          f"{text.pct(acc)} [{w:.2g}]"
          for acc, w in zip(curve["test_accuracy"], curve["weight_of_initial_state"]))))
  by_size = r["running_stats_by_batch_size"]
  page.add("", "Inference batch size (running statistics, momentum 0.99, biased):", "",
           text.table_row("batch size", *by_size), "|---|" + "---:|" * len(by_size),
           text.table_row("accuracy (%)", *(text.pct(v) for v in by_size.values())), "",
           "Normalizing with each test batch's own statistics (`training=True`):", "",
           "| batch size | accuracy (%) |", "|---:|---|")
  for size, v in r["batch_stats_by_batch_size"].items():
    page.add(text.table_row(size, text.pct(v) if "mean" in v else f"error: {v['error']}"))
  page.add("")
  page.figure(record, "Running vs batch statistics at inference")


_PARAMETER_ROWS = (("cnn", "MNIST CNN (bias before BN, as in Keras)"),
                   ("cnn_no_bias_before_bn", "MNIST CNN, no bias before BN"),
                   ("cnn_without_bn", "MNIST CNN without BN"),
                   ("bn_paper_mlp", "BN paper MLP (3x100 sigmoid)"))


def param_table(page: text.Page, record):
  """Section 7: the MNIST CNN's Keras parameter table, layer by layer."""
  r = record["results"]
  cnn = r["cnn"]
  page.add("## 7. The seed's parameter table", "", text.provenance(record), "",
           "The seed's Keras `model.summary()` says 38,910 parameters: 38,650 "
           "trainable, 260 non-trainable. From `training.models.MnistCNN` "
           "(`models.parameter_table`):", "", "```", cnn["formatted"], "```", "",
           f"Verdict: {numbers.parameter_table_verdict(r).markdown()}. Totals "
           f"{cnn['total']:,} / {cnn['trainable']:,} / {cnn['non_trainable']:,}.", "",
           "| model | total | trainable | non-trainable (running mean + var) |",
           "|---|---:|---:|---:|")
  for key, label in _PARAMETER_ROWS:
    t = r[key]
    page.add(text.table_row(label, f"{t['total']:,}", f"{t['trainable']:,}",
                            f"{t['non_trainable']:,}"))
  page.add("")
