"""Seed 003's feature-scaling example: Hessian condition numbers and GD steps.

People are described by income and height, both Gaussian: income in dollars
(mean 3000, std 400), height in inches (mean 69, std 3). For least squares
without intercept the Hessian is `H = X^T X / n`. The seed says cond(H) is about
9.2e4 in dollars/inches, 281.7 in thousands of dollars/feet, and "close to 1"
after standardization. Here the same data are scaled with `jaxbn.scaling.standardize`
and `jaxbn.scaling.min_max_scale`, and plain gradient descent (step 1/lambda_max, from
w = 0) is run until the loss gap is below `tolerance` of its initial value.

  python -m experiments.feature_scaling --workdir runs/experiments
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxbn
from experiments import _common

NAME = "feature_scaling"
INCOME_MEAN, INCOME_STD = 3000.0, 400.0  # dollars
HEIGHT_MEAN, HEIGHT_STD = 69.0, 3.0  # inches
SEED_CONDITION_NUMBERS = {"dollars_inches": 9.2e4, "kilodollars_feet": 281.7,
                          "standardized": 1.0}


def _people(n: int, seed: int):
  """Features `(n, 2)` in dollars and inches, and a regression target `(n,)`."""
  rng = np.random.default_rng(seed)
  x = np.stack([rng.normal(INCOME_MEAN, INCOME_STD, n),
                rng.normal(HEIGHT_MEAN, HEIGHT_STD, n)], 1)
  # Any linear target works; this one (plus noise) makes both features matter.
  y = 0.01 * x[:, 0] + 2.0 * x[:, 1] + rng.normal(0, 5, n)
  return x, y


def _gradient_descent_steps(x, y, tolerance: float, max_steps: int) -> int:
  """Steps of GD with step 1/lambda_max until (L - L*) <= tolerance * (L0 - L*).

  The least-squares loss `mean((x w - y)**2) / 2` is the quadratic
  `w^T H w / 2 - b^T w + c` with `H = x^T x / n`, `b = x^T y / n`; iterating on
  `(H, b)` is the same GD, independent of `n`.
  """
  n = x.shape[0]
  hessian = jnp.asarray(x.T @ x / n)
  linear = jnp.asarray(x.T @ y / n)
  w_opt = jnp.linalg.solve(hessian, linear)

  def loss_gap(w):
    delta = w - w_opt
    return 0.5 * delta @ hessian @ delta

  target = tolerance * loss_gap(jnp.zeros_like(w_opt))
  step_size = 1.0 / jnp.linalg.eigvalsh(hessian)[-1]

  def not_done(carry):
    w, step = carry
    return (loss_gap(w) > target) & (step < max_steps)

  def gd_step(carry):
    w, step = carry
    return w - step_size * (hessian @ w - linear), step + 1

  _, steps = jax.lax.while_loop(not_done, gd_step, (jnp.zeros_like(w_opt), 0))
  return int(steps)


def _population_condition_numbers() -> dict:
  """cond(E[x x^T]) = cond(diag(std^2) + mean mean^T) for the seed's distributions."""
  mean = np.array([INCOME_MEAN, HEIGHT_MEAN])
  std = np.array([INCOME_STD, HEIGHT_STD])
  out = {}
  for name, factor in (("dollars_inches", np.array([1.0, 1.0])),
                       ("kilodollars_feet", np.array([1e-3, 1.0 / 12.0]))):
    m, s = mean * factor, std * factor
    eig = np.linalg.eigvalsh(np.diag(s * s) + np.outer(m, m))
    out[name] = float(eig[-1] / eig[0])
  out["standardized"] = 1.0
  return out


def run(args) -> dict:
  n = 1000 if args.quick else 100_000
  tolerance = 1e-6
  max_steps = 20_000 if args.quick else 10_000_000
  units = {
      "dollars_inches": np.array([1.0, 1.0]),
      "kilodollars_feet": np.array([1e-3, 1.0 / 12.0]),
  }
  per_seed = []
  with jax.enable_x64(True):  # float64 so that only conditioning limits GD
    for seed in args.seeds:
      raw, y = _people(n, seed)
      variants = {name: raw * factor for name, factor in units.items()}
      stats = jaxbn.scaling.fit_standardize(raw)
      variants["standardized"] = np.asarray(jaxbn.scaling.standardize(stats, raw))
      variants["standardized_ddof1"] = np.asarray(jaxbn.scaling.standardize(stats, raw, ddof=1))
      variants["min_max"] = np.asarray(
          jaxbn.scaling.min_max_scale(jaxbn.scaling.fit_min_max(raw), raw))
      record = {"seed": seed}
      for name, x in variants.items():
        hessian = x.T @ x / n
        eig = np.linalg.eigvalsh(hessian)
        record[name] = {
            "hessian": hessian,
            "condition_number": float(eig[-1] / eig[0]),
            "gd_steps": _gradient_descent_steps(x, y, tolerance, max_steps),
        }
      per_seed.append(record)
      print(seed, {k: (v["condition_number"], v["gd_steps"])
                   for k, v in record.items() if k != "seed"})
  names = [k for k in per_seed[0] if k != "seed"]
  summary = {
      name: {
          "condition_number": _common.mean_std([r[name]["condition_number"]
                                                for r in per_seed]),
          "gd_steps": _common.mean_std([r[name]["gd_steps"] for r in per_seed]),
          "hessian_mean": np.mean([r[name]["hessian"] for r in per_seed], 0),
          "seed_claim_condition_number": SEED_CONDITION_NUMBERS.get(name),
      } for name in names
  }
  return {"n": n, "tolerance": tolerance,
          "population_condition_number": _population_condition_numbers(), "max_steps": max_steps,
          "step_size": "1 / lambda_max(H)", "per_seed": per_seed, "summary": summary}


def plot(args, results) -> None:
  fig, axes = _common.figure(1, 2, width=4.6)
  names = list(results["summary"])
  summary = results["summary"]
  for ax, key, label in ((axes[0, 0], "condition_number", "cond(H)"),
                         (axes[0, 1], "gd_steps", "GD steps to 1e-6 loss gap")):
    means = [summary[n][key]["mean"] for n in names]
    stds = [summary[n][key]["std"] for n in names]
    ax.bar(range(len(names)), means, yerr=stds, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(label)
  fig.suptitle("Least squares on income/height: conditioning and GD steps")
  _common.save_figure(args, fig)


def main(argv=None):
  _common.run_experiment(NAME, __doc__, run, plot, argv)


if __name__ == "__main__":
  main()
