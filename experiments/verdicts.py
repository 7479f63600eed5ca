"""The rules that turn the experiments' numbers into the verdicts of docs/results.md.

Pure functions of plain numbers (no jax, no JSON layout). Each rule is one
function; its thresholds are the module constants below; it returns a `Verdict`
whose `rule` states the rule with those thresholds, which the report prints
next to the outcome. Change a number and the verdict follows.

Outcomes, from best to worst: "holds", "partly", "does not reproduce"; plus
"inconclusive" (the numbers cannot decide) and "not tested" (nothing measured).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

HOLDS, PARTLY, FAILS = "holds", "partly", "does not reproduce"
INCONCLUSIVE, NOT_TESTED = "inconclusive", "not tested"

# BN CNN accuracy after epochs 1-3 vs the seed's: within this many points counts as matching.
MATCH_POINTS = 0.3
# No-BN / BN ratios of epochs (or steps) to an accuracy. 8x counts as "10x": one
# evaluation of resolution and three seeds cannot tell 8 from 10.
TENFOLD = 8.0
FASTER = 1.25  # at least this: BN faster
SAME = 0.8  # above this (and below FASTER): about the same; at or below: no BN faster
# Learning-rate sweep: a rate is usable when its mean accuracy is within this many points
# of the optimizer's best run; the sweep says nothing while BN's running statistics still
# weigh their initial values (momentum^steps) by more than EMA_LAG_LIMIT.
NEAR_BEST_POINTS = 5.0
EMA_LAG_LIMIT = 0.05
# Feature scaling: the seed's condition numbers come from one unnamed sample.
SEED_CONDITION_NUMBERS = (9.2e4, 281.7)
CONDITION_TOLERANCE = 0.25  # relative difference from the seed's numbers that still matches
STANDARDIZED_CONDITION_LIMIT = 1.5  # the seed's "about 1"
# Scale invariance: relative error allowed from rounding alone (epsilon -> 0), by dtype;
# epsilon "breaks" invariance when it makes some error exceed EPSILON_BREAK.
EXACT_EPSILON = 1e-10
ROUNDING_TOLERANCE = {"float32": 1e-5, "float64": 1e-9}
EPSILON_BREAK = 0.01
# Inference with running statistics.
BATCH_SIZE_SPREAD_POINTS = 0.1  # accuracy spread over inference batch sizes
RUNNING_VS_BATCH_POINTS = 1.0  # best running statistics vs the largest batch's own statistics
FAILED_MOMENTUM_POINTS = 5.0  # a momentum this far below the best one fails


class Verdict(NamedTuple):
  """An outcome, what in the numbers decided it, and the rule that did.

  Attributes:
    outcome: one of HOLDS, PARTLY, FAILS, INCONCLUSIVE, NOT_TESTED.
    detail: the finding in words (may be empty).
    rule: the rule with its thresholds, e.g. "holds: every ratio >= 8".
  """
  outcome: str
  detail: str
  rule: str

  def markdown(self) -> str:
    """'**holds**: detail (rule: ...)' for a report cell."""
    detail = f": {self.detail}" if self.detail else ""
    return f"**{self.outcome}**{detail} (rule: {self.rule})"


class Ratio(NamedTuple):
  """How many times BN's time (epochs or steps) no BN needed to reach an accuracy.

  Attributes:
    value: no-BN mean time / BN mean time.
    lower_bound: True when some no-BN seeds never got there; they count at the
      run's length, so the true ratio is at least `value`.
    bn: mean time of the BN seeds that got there.
    nobn: mean time of the no-BN seeds (the run's length for those that never did).
  """
  value: float
  lower_bound: bool
  bn: float
  nobn: float


def ratio_finding(ratio: Ratio | None, unit: str = "epochs") -> str:
  """Plain words for one no-BN / BN ratio, by the TENFOLD / FASTER / SAME thresholds."""
  if ratio is None:
    return "not measurable (BN never reached it)"
  if ratio.lower_bound:
    return (f"BN took {ratio.bn:.2g} {unit}, not every no-BN seed had got there when "
            f"the run ended: >= {ratio.value:.2g}x"
            + (", consistent with 10x" if ratio.value >= TENFOLD else ""))
  value = f"{ratio.value:.2g}x (BN {ratio.bn:.2g}, no BN {ratio.nobn:.2g} {unit})"
  if ratio.value >= TENFOLD:
    return f"{value}: consistent with 10x"
  if ratio.value >= FASTER:
    return f"{value}: BN faster, but not 10x"
  if ratio.value > SAME:
    return f"{value}: about the same"
  return f"{value}: no BN faster"


RATIO_WORDS = (f"a ratio >= {TENFOLD:g} is consistent with 10x, >= {FASTER:g} BN faster, "
               f"> {SAME:g} about the same, else no BN faster")


def epochs_match_claim(gaps: Mapping[str, Sequence[float]]) -> Verdict:
  """BN's accuracy after epochs 1-3 against the seed's Keras run.

  Args:
    gaps: per optimizer, BN's mean validation accuracy minus the seed's, in points,
      at each of the epochs 1-3 that were measured.
  """
  rule = (f"holds when every optimizer is at most {MATCH_POINTS:g} points below the seed "
          "at every epoch, partly when some optimizer is, does not reproduce when none is")
  words, matching = [], []
  for optimizer, points in gaps.items():
    if not points:
      continue
    matches = min(points) >= -MATCH_POINTS
    matching.append(matches)
    if matches:
      words.append(f"{optimizer} matches or exceeds it")
    elif max(points) < -MATCH_POINTS:
      words.append(f"{optimizer} is below it by {-max(points):.1f}-{-min(points):.1f} points")
    else:
      words.append(f"{optimizer} is within {MATCH_POINTS:g} points at some epochs and below "
                   "at others")
  if not matching:
    return Verdict(NOT_TESTED, "no BN run was evaluated at the seed's epochs", rule)
  outcome = HOLDS if all(matching) else PARTLY if any(matching) else FAILS
  return Verdict(outcome, "; ".join(words), rule)


def tenfold_epochs(ratios: Mapping[tuple[str, float], Ratio | None],
                   never_trained: Sequence[str] = ()) -> Verdict:
  """"Without BN the CNN needs 10x more epochs", from no-BN / BN epoch ratios.

  Args:
    ratios: `{(optimizer, accuracy threshold): Ratio or None (BN never got there)}`.
    never_trained: optimizers with which some no-BN seed never trained at all.
  """
  rule = (f"holds when every no-BN / BN ratio is >= {TENFOLD:g}, partly when some are, "
          f"does not reproduce when a measured ratio (not a bound) is below {TENFOLD:g} and "
          "none reaches it, inconclusive when only lower bounds below it exist")
  measured = [x for x in ratios.values() if x is not None]
  exact = [x.value for x in measured if not x.lower_bound]
  bounds = [x.value for x in measured if x.lower_bound]
  if not measured:
    return Verdict(NOT_TESTED, "BN never reached the thresholds", rule)
  if all(x.value >= TENFOLD for x in measured):
    outcome, detail = HOLDS, "for every optimizer and threshold"
  elif any(x.value >= TENFOLD for x in measured):
    where = ", ".join(f"{optimizer} at {100 * threshold:g}%"
                      for (optimizer, threshold), x in ratios.items()
                      if x is not None and x.value >= TENFOLD)
    outcome = PARTLY
    detail = (f"only for {where}; elsewhere the ratios (or their lower bounds) are below "
              f"{TENFOLD:g}x")
  else:
    words = []
    if exact:
      words.append(f"no BN needs {min(exact):.2g}-{max(exact):.2g}x the epochs of BN, "
                   "not 10x")
    if bounds:
      words.append("where no BN did not get there within the run the bound is "
                   f">= {min(bounds):.2g}-{max(bounds):.2g}x, which neither confirms nor "
                   "rules out 10x")
    outcome, detail = (FAILS if exact else INCONCLUSIVE), "; ".join(words)
  if never_trained:
    detail += ("; more than that: with " + " and ".join(never_trained) + " some seeds "
               "without BN never train at all, while every BN seed does")
  return Verdict(outcome, detail, rule)


def tenfold_at_tuned_rate(ratios: Sequence[float]) -> Verdict:
  """A 10x gap when BN gets the learning rate it allows and no BN keeps Keras' default.

  Args:
    ratios: per optimizer, the epochs no BN at Keras' default learning rate needs to
      reach BN's best swept accuracy, over the sweep's epochs.
  """
  rule = (f"holds when for some optimizer the ratio is >= {TENFOLD:g} (each network at its "
          "own best rate is section 2a)")
  if not ratios:
    return Verdict(NOT_TESTED, "needs the CNN learning-rate sweep and the BN vs no BN run",
                   rule)
  if any(x >= TENFOLD for x in ratios):
    return Verdict(HOLDS, "a 10x gap appears when BN's network is also given the higher "
                   "learning rate it tolerates and the other keeps Keras' default", rule)
  return Verdict(FAILS, f"no 10x gap even then (largest {max(ratios):.2g}x)", rule)


class SweepOutcome(NamedTuple):
  """One optimizer's learning-rate sweep, BN vs no BN.

  Attributes:
    wider: BN has more usable learning rates than no BN.
    higher: BN's largest usable learning rate is above no BN's.
  """
  wider: bool
  higher: bool


def learning_rate_robustness(outcomes: Mapping[str, SweepOutcome],
                             ema_weight: float) -> Verdict:
  """"BN makes training less sensitive to hyperparameters and allows higher rates".

  Args:
    outcomes: per optimizer, how BN's usable learning rates compare with no BN's.
    ema_weight: momentum^steps, what BN's running statistics still owe their initial
      values at the end of the sweep's budget.
  """
  rule = (f"usable = mean accuracy within {NEAR_BEST_POINTS:g} points of the optimizer's "
          "best; holds when for every optimizer BN has more usable rates and a higher "
          "largest usable rate, partly when some of these hold, inconclusive when the "
          f"running statistics still weigh their initial values by more than "
          f"{EMA_LAG_LIMIT:.0%}")
  if not outcomes:
    return Verdict(NOT_TESTED, "no optimizer was swept both with and without BN", rule)
  if ema_weight > EMA_LAG_LIMIT:
    return Verdict(INCONCLUSIVE, f"BN's running statistics still weigh their initial "
                   f"values by {ema_weight:.0%}, which depresses BN's inference accuracy",
                   rule)
  wins = [o.wider for o in outcomes.values()]
  higher = [o.higher for o in outcomes.values()]
  if all(wins) and all(higher):
    return Verdict(HOLDS, "", rule)
  if any(wins) or any(higher):
    return Verdict(PARTLY, ", ".join(
        f"{optimizer}: {'wider' if o.wider else 'not wider'} range, "
        f"{'higher' if o.higher else 'no higher'} largest usable rate"
        for optimizer, o in outcomes.items()), rule)
  return Verdict(FAILS, "", rule)


def covariate_shift(step_ratios: Mapping[float, Ratio | None], shift: Mapping[str, float],
                    jitter: Mapping[str, float]) -> Verdict:
  """"BN reduces internal covariate shift and the BN MLP trains faster" (BN paper Fig. 1).

  Args:
    step_ratios: `{test accuracy threshold: no-BN / BN steps Ratio or None}`.
    shift: `{"bn": ..., "nobn": ...}`, how far the last layer's sigmoid inputs move
      (median, in 15-85 widths) after the first 10% of training.
    jitter: the same keys, their mean move between consecutive evaluations.
  """
  rule = ("holds when BN's inputs shift less than no BN's and BN reaches every threshold "
          "in fewer steps (ratio > 1), partly when one of the two holds")
  faster = [x is not None and x.value > 1 for x in step_ratios.values()]
  shifts_less = shift["bn"] < shift["nobn"]
  if shifts_less and all(faster):
    outcome = HOLDS
    words = ["BN reaches every accuracy level sooner and its sigmoid inputs drift less "
             "over training"]
  else:
    outcome = PARTLY if shifts_less or any(faster) else FAILS
    words = [f"BN's inputs shift {'less' if shifts_less else 'no less'}; BN is faster at "
             f"{sum(faster)} of {len(faster)} thresholds"]
  if jitter["bn"] > jitter["nobn"]:
    words.append("but BN's inputs jitter more from one evaluation to the next")
  return Verdict(outcome, "; ".join(words), rule)


def feature_scaling(condition: Mapping[str, float], steps: Mapping[str, float]) -> Verdict:
  """"Feature scaling: cond(H) 9.2e4 -> 281.7 -> ~1, so GD converges faster".

  Args:
    condition: mean cond(H) for "dollars_inches", "kilodollars_feet", "standardized".
    steps: mean gradient-descent steps to converge, same keys.
  """
  seed_raw, seed_rescaled = SEED_CONDITION_NUMBERS
  rule = ("holds when cond(H) and the GD steps both fall from dollars/inches to "
          "thousand $/feet to standardized, standardized cond(H) <= "
          f"{STANDARDIZED_CONDITION_LIMIT:g}, and the two unscaled condition numbers are "
          f"within {CONDITION_TOLERANCE:.0%} of the seed's {seed_raw:.2g} and {seed_rescaled:g}; "
          "partly when only the ordering holds")
  order = ("dollars_inches", "kilodollars_feet", "standardized")
  ordered = all(a[order[i]] > a[order[i + 1]] for a in (condition, steps) for i in range(2))
  ordered &= condition["standardized"] <= STANDARDIZED_CONDITION_LIMIT
  off = (condition["dollars_inches"] / seed_raw - 1,
         condition["kilodollars_feet"] / seed_rescaled - 1)
  detail = (f"the unscaled condition numbers are {off[0]:+.0%} and {off[1]:+.0%} from the "
            "seed's single sample")
  if not ordered:
    return Verdict(FAILS, "cond(H) or the GD steps do not fall with each scaling; " + detail,
                   rule)
  if max(abs(x) for x in off) <= CONDITION_TOLERANCE:
    return Verdict(HOLDS, detail, rule)
  return Verdict(PARTLY, "the ordering holds; " + detail, rule)


def scale_invariance(exact: Mapping[str, float], with_epsilon: Mapping[str, float]) -> Verdict:
  """"BN(aWu) = BN(Wu) and the gradient scales as 1/a" (BN paper section 3.3).

  Args:
    exact: per dtype, the worst relative error (BN output, a * grad W, grad u; every
      seed; every a >= 0.1) with epsilon <= EXACT_EPSILON.
    with_epsilon: per "dtype, epsilon" label, the worst relative error over every a
      with a larger epsilon.
  """
  rule = (f"holds when with epsilon <= {EXACT_EPSILON:g} every relative error for a >= 0.1 "
          "is within rounding (" + ", ".join(f"{d} <= {t:g}"
                                             for d, t in ROUNDING_TOLERANCE.items())
          + f"); 'up to epsilon' when a larger epsilon makes some error exceed "
          f"{EPSILON_BREAK:.0%}")
  if not exact:
    return Verdict(NOT_TESTED, f"no case with epsilon <= {EXACT_EPSILON:g}", rule)
  within = {d: e <= ROUNDING_TOLERANCE.get(d, ROUNDING_TOLERANCE["float32"])
            for d, e in exact.items()}
  errors = ", ".join(f"{d} {e:.1e}" for d, e in exact.items())
  if not all(within.values()):
    return Verdict(FAILS, f"worst errors with epsilon -> 0: {errors}", rule)
  broken = [label for label, e in with_epsilon.items() if e > EPSILON_BREAK]
  if broken:
    return Verdict(HOLDS + " up to epsilon", f"worst errors with epsilon -> 0: {errors}; "
                   f"broken by epsilon in {', '.join(broken)}", rule)
  return Verdict(HOLDS, f"worst errors with epsilon -> 0: {errors}", rule)


def running_statistics(by_momentum: Mapping[float, float], initial_weight: Mapping[float, float],
                       by_inference_batch: Sequence[float], batch_statistics: float,
                       steps: int) -> Verdict:
  """"At test time running averages replace batch statistics, robustly".

  Args:
    by_momentum: mean test accuracy (fraction) with running statistics, per momentum.
    initial_weight: per momentum, momentum^steps (the initial state's remaining weight).
    by_inference_batch: running-statistics accuracy at each inference batch size.
    batch_statistics: accuracy normalizing each test batch with its own statistics, at
      the largest inference batch.
    steps: training steps.
  """
  rule = (f"holds when running-statistics accuracy varies by <= {BATCH_SIZE_SPREAD_POINTS:g} "
          f"points over inference batch sizes, the best momentum is within "
          f"{RUNNING_VS_BATCH_POINTS:g} point of batch statistics at the largest batch, and "
          f"no momentum is more than {FAILED_MOMENTUM_POINTS:g} points below the best; "
          "partly when only the first two hold")
  spread = 100 * (max(by_inference_batch) - min(by_inference_batch))
  best = max(by_momentum.values())
  gap = 100 * (batch_statistics - best)
  failed = {m: a for m, a in by_momentum.items()
            if 100 * (best - a) > FAILED_MOMENTUM_POINTS}
  detail = (f"spread over batch sizes {spread:.2f} points; best running statistics "
            f"{gap:.2f} points below batch statistics")
  detail += "".join(f"; momentum {m:g} after {steps} steps fails ({100 * a:.1f}%, initial "
                    f"state still weighs {initial_weight[m]:.2g})" for m, a in failed.items())
  if spread > BATCH_SIZE_SPREAD_POINTS or gap > RUNNING_VS_BATCH_POINTS:
    return Verdict(FAILS, detail, rule)
  return Verdict(PARTLY if failed else HOLDS, detail, rule)


def parameter_table(totals_match: bool, rows_match: bool) -> Verdict:
  """The MNIST CNN's Keras parameter table, reproduced layer by layer."""
  rule = "holds when the totals and every layer's output shape and count match"
  if totals_match and rows_match:
    return Verdict(HOLDS, "identical, layer by layer", rule)
  return Verdict(FAILS, "totals differ" if not totals_match else "layers differ", rule)
