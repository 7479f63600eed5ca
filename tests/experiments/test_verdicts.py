"""Every verdict rule of docs/results.md flips when its numbers cross its thresholds.

The report itself is also checked to render without jax (it needs only NumPy).
"""

import subprocess
import sys

import pytest

from experiments import _report_numbers as numbers
from experiments import _report_text as text
from experiments import verdicts as v
from experiments.verdicts import Ratio


def test_report_renders_without_importing_jax():
  script = ("import sys\nfrom experiments import report\n"
            "print(sorted(m for m in ('jax', 'tensorflow', 'matplotlib', 'flax') "
            "if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                       text=True).stdout
  assert out.strip() == "[]"


def test_verdict_markdown_states_the_rule():
  verdict = v.parameter_table(True, True)
  assert verdict.markdown() == (
      "**holds**: identical, layer by layer (rule: holds when the totals and every "
      "layer's output shape and count match)")


def test_epochs_match_claim():
  assert v.epochs_match_claim({"sgd": [0.1, -0.2], "adam": [0.5]}).outcome == v.HOLDS
  mixed = v.epochs_match_claim({"sgd": [0.1, -0.5], "adam": [0.5]})
  assert mixed.outcome == v.PARTLY
  assert "sgd is within 0.3 points at some epochs and below at others" in mixed.detail
  below = v.epochs_match_claim({"sgd": [-1.0, -2.0]})
  assert below.outcome == v.FAILS and below.detail == "sgd is below it by 1.0-2.0 points"
  assert v.epochs_match_claim({"sgd": []}).outcome == v.NOT_TESTED
  assert "0.3 points below" in below.rule


def test_ratio_finding_thresholds():
  assert v.ratio_finding(Ratio(3.0, False, 1.5, 4.5)) == (
      "3x (BN 1.5, no BN 4.5 epochs): BN faster, but not 10x")
  assert v.ratio_finding(Ratio(8.0, False, 1, 8)).endswith("consistent with 10x")
  assert v.ratio_finding(Ratio(7.9, False, 1, 7.9)).endswith("BN faster, but not 10x")
  assert v.ratio_finding(Ratio(1.25, False, 1, 1.25)).endswith("BN faster, but not 10x")
  assert v.ratio_finding(Ratio(1.2, False, 1, 1.2)).endswith("about the same")
  assert v.ratio_finding(Ratio(0.8, False, 1, 0.8)).endswith("no BN faster")
  assert v.ratio_finding(Ratio(10 / 3, True, 3, 10)).endswith("when the run ended: >= 3.3x")
  assert v.ratio_finding(None) == "not measurable (BN never reached it)"


def test_tenfold_epochs():
  slow, fast = Ratio(3.0, False, 1.5, 4.5), Ratio(12.0, False, 1, 12)
  bound = Ratio(10 / 3, True, 3, 10)
  assert v.tenfold_epochs({("sgd", 0.98): fast, ("sgd", 0.99): Ratio(8.0, True, 1, 8)}
                          ).outcome == v.HOLDS
  partly = v.tenfold_epochs({("sgd", 0.98): fast, ("adam", 0.98): slow})
  assert partly.outcome == v.PARTLY and partly.detail.startswith("only for sgd at 98%")
  fails = v.tenfold_epochs({("sgd", 0.98): slow, ("sgd", 0.99): bound, ("adam", 0.99): None})
  assert fails.outcome == v.FAILS
  assert fails.detail.startswith("no BN needs 3-3x") and ">= 3.3-3.3x" in fails.detail
  assert v.tenfold_epochs({("sgd", 0.99): bound}).outcome == v.INCONCLUSIVE
  assert v.tenfold_epochs({("sgd", 0.99): None}).outcome == v.NOT_TESTED
  stuck = v.tenfold_epochs({("sgd", 0.98): slow}, never_trained=["sgd"])
  assert "with sgd some seeds without BN never train" in stuck.detail


def test_tenfold_at_tuned_rate():
  assert v.tenfold_at_tuned_rate([1.6, 9.8]).outcome == v.HOLDS
  assert v.tenfold_at_tuned_rate([1.6, 7.9]).outcome == v.FAILS
  assert v.tenfold_at_tuned_rate([]).outcome == v.NOT_TESTED


def test_learning_rate_robustness():
  both = v.SweepOutcome(wider=True, higher=True)
  narrow = v.SweepOutcome(wider=False, higher=True)
  neither = v.SweepOutcome(wider=False, higher=False)
  assert v.learning_rate_robustness({"sgd": both, "adam": both}, 1e-7).outcome == v.HOLDS
  partly = v.learning_rate_robustness({"sgd": narrow, "adam": both}, 1e-7)
  assert partly.outcome == v.PARTLY
  assert partly.detail.startswith("sgd: not wider range, higher largest usable rate")
  assert v.learning_rate_robustness({"sgd": neither}, 1e-7).outcome == v.FAILS
  lagging = v.learning_rate_robustness({"sgd": both}, 0.06)
  assert lagging.outcome == v.INCONCLUSIVE and "6%" in lagging.detail
  assert v.learning_rate_robustness({"sgd": both}, 0.05).outcome == v.HOLDS
  assert v.learning_rate_robustness({}, 0.0).outcome == v.NOT_TESTED


def test_covariate_shift():
  faster = {0.9: Ratio(1.8, False, 1, 1.8), 0.95: Ratio(1.4, False, 1, 1.4)}
  slower = {0.9: Ratio(1.8, False, 1, 1.8), 0.95: Ratio(0.9, False, 1, 0.9)}
  less, more = {"bn": 0.05, "nobn": 0.12}, {"bn": 0.2, "nobn": 0.12}
  calm = {"bn": 0.02, "nobn": 0.04}
  assert v.covariate_shift(faster, less, calm).outcome == v.HOLDS
  assert v.covariate_shift(slower, less, calm).outcome == v.PARTLY
  assert v.covariate_shift({0.9: None}, more, calm).outcome == v.FAILS
  jittery = v.covariate_shift(faster, less, {"bn": 0.04, "nobn": 0.02})
  assert jittery.outcome == v.HOLDS and jittery.detail.endswith(
      "but BN's inputs jitter more from one evaluation to the next")


def test_feature_scaling():
  steps = {"dollars_inches": 4.7e5, "kilodollars_feet": 489, "standardized": 1.3}
  cond = {"dollars_inches": 9.96e4, "kilodollars_feet": 303.6, "standardized": 1.005}
  held = v.feature_scaling(cond, steps)
  assert held.outcome == v.HOLDS
  assert held.detail == ("the unscaled condition numbers are +8% and +8% from the seed's "
                         "single sample")
  assert v.feature_scaling({**cond, "dollars_inches": 1.2e5}, steps).outcome == v.PARTLY
  assert v.feature_scaling({**cond, "standardized": 1.6}, steps).outcome == v.FAILS
  assert v.feature_scaling(cond, {**steps, "standardized": 500}).outcome == v.FAILS


def test_scale_invariance():
  exact = {"float32": 1e-6, "float64": 7e-11}
  broken = {"float32 with epsilon 1e-05": 0.75}
  assert v.scale_invariance(exact, broken).outcome == "holds up to epsilon"
  assert v.scale_invariance(exact, {"float32 with epsilon 1e-05": 0.005}).outcome == v.HOLDS
  assert v.scale_invariance({**exact, "float32": 2e-5}, broken).outcome == v.FAILS
  assert v.scale_invariance({**exact, "float64": 2e-9}, broken).outcome == v.FAILS
  assert v.scale_invariance({}, broken).outcome == v.NOT_TESTED


def test_running_statistics():
  accuracy = {0.9: 0.987, 0.99: 0.980}
  weight = {0.9: 1e-143, 0.99: 2e-14, 0.999: 0.044}
  held = v.running_statistics(accuracy, weight, [0.9787] * 4, 0.9874, 3124)
  assert held.outcome == v.HOLDS
  slow = v.running_statistics({**accuracy, 0.999: 0.856}, weight, [0.9787] * 4, 0.9874, 3124)
  assert slow.outcome == v.PARTLY
  assert "momentum 0.999 after 3124 steps fails (85.6%, initial state still weighs 0.044)" in (
      slow.detail)
  assert v.running_statistics(accuracy, weight, [0.9787, 0.9770], 0.9874, 3124
                              ).outcome == v.FAILS  # 0.17 points of spread
  assert v.running_statistics(accuracy, weight, [0.9787] * 4, 0.9990, 3124
                              ).outcome == v.FAILS  # 1.2 points below batch statistics


def test_parameter_table():
  assert v.parameter_table(True, True).outcome == v.HOLDS
  assert v.parameter_table(True, False).outcome == v.FAILS
  assert v.parameter_table(False, True).detail == "totals differ"


def _run(optimizer, use_bn, accuracies_per_epoch):
  """A bn_vs_nobn run whose seeds have these accuracies after epochs 1, 2, ..."""
  history = [{"step": 10 * (e + 1), "epoch": float(e + 1), "validation_accuracy": acc}
             for e, acc in enumerate(accuracies_per_epoch)]
  return {f"{optimizer}_{'bn' if use_bn else 'nobn'}": {
      "optimizer": optimizer, "use_bn": use_bn, "history": history}}


def test_epochs_ratio_from_histories():
  runs = {**_run("sgd", True, [[0.97, 0.98], [0.985, 0.985]] + [[0.99, 0.99]] * 8),
          **_run("sgd", False, [[0.9, 0.9]] * 3 + [[0.98, 0.97]] + [[0.98, 0.98]] * 6)}
  # BN reaches 98% after 1.5 epochs on average (seeds: 2, 1), no BN after 4.5 (4, 5).
  assert numbers.epochs_ratio(runs, "sgd", 0.98) == Ratio(3.0, False, 1.5, 4.5)
  # No BN never reaches 99% in 10 epochs: a lower bound, 10 / 3.
  bound = numbers.epochs_ratio(runs, "sgd", 0.99)
  assert bound.lower_bound and bound.value == pytest.approx(10 / 3)
  assert text.ratio_text(bound) == ">= 3.3x"
  assert numbers.epochs_ratio(runs, "sgd", 0.999) is None  # BN never got there
  assert numbers.accuracy_at_epochs(runs["sgd_bn"]) == pytest.approx(
      {1: 0.975, 2: 0.985, 3: 0.99})
  assert text.reach_cell([None, {"epoch": 2.0, "step": 20}]) == (
      "2.00 ± 0.00 (20 steps) (1 of 2 seeds)")
