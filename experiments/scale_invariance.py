"""BN paper section 3.3: batch normalization makes a layer invariant to weight scale.

For `y = BN(W u)` in training mode the paper states `BN(W u) = BN((a W) u)`,
`d y / d u` is unchanged and `d L / d(a W) = (1/a) d L / d W`: larger weights
get smaller gradients, which is why BN tolerates higher learning rates. This
checks all three numerically with `jaxbn.batch_norm` for scales `a` over six
orders of magnitude, in float32 and float64, and shows where `epsilon` (added
to the variance) breaks the invariance: once `a^2 var(W u)` approaches
`epsilon`.

  python -m experiments.scale_invariance --workdir runs/experiments
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxbn
from experiments import _common

NAME = "scale_invariance"
SCALES = (1e-3, 1e-2, 0.1, 0.5, 2.0, 10.0, 100.0, 1000.0)
EPSILONS = (1e-12, 1e-5, 1e-3)  # ~exact, jaxbn/flax/PyTorch default, Keras default


def _relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _check(seed: int, dtype, epsilon: float, batch: int, fan_in: int, fan_out: int):
  keys = jax.random.split(jax.random.key(seed), 4)
  inputs = jax.random.normal(keys[0], (batch, fan_in), dtype) + 1.0
  weights = jax.random.normal(keys[1], (fan_in, fan_out), dtype) / np.sqrt(fan_in)
  upstream = jax.random.normal(keys[2], (batch, fan_out), dtype)
  params, state = jaxbn.init(fan_out, dtype=dtype)

  def layer(w, u):
    y, _ = jaxbn.batch_norm(params, state, u @ w, training=True, epsilon=epsilon)
    return y

  def loss(w, u):
    return jnp.sum(layer(w, u) * upstream)

  forward = jax.jit(layer)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))
  y_ref = forward(weights, inputs)
  grad_w_ref, grad_u_ref = grads(weights, inputs)
  rows = []
  for scale in SCALES:
    y = forward(scale * weights, inputs)
    grad_w, grad_u = grads(scale * weights, inputs)
    rows.append({
        "a": scale,
        # BN(aWu) == BN(Wu)
        "output_rel_error": _relative_error(y, y_ref),
        # dL/d(aW) == dL/dW / a
        "weight_grad_rel_error": _relative_error(scale * grad_w, grad_w_ref),
        # dL/du unchanged (the layer Jacobian does not depend on the scale)
        "input_grad_rel_error": _relative_error(grad_u, grad_u_ref),
        "weight_grad_norm_ratio": float(jnp.linalg.norm(grad_w) /
                                        jnp.linalg.norm(grad_w_ref)),
        "a2_var_over_epsilon": float(scale**2 * jnp.min(jnp.var(inputs @ weights, 0))
                                     / epsilon),
    })
  return rows


def run(args) -> dict:
  batch, fan_in, fan_out = (16, 8, 4) if args.quick else (256, 100, 50)
  results = {"scales": SCALES, "epsilons": EPSILONS, "batch": batch, "fan_in": fan_in,
             "fan_out": fan_out, "cases": []}
  for dtype_name in ("float32",) if args.quick else ("float32", "float64"):
    with jax.enable_x64(dtype_name == "float64"):
      dtype = jnp.dtype(dtype_name)
      for epsilon in EPSILONS:
        per_seed = [_check(seed, dtype, epsilon, batch, fan_in, fan_out)
                    for seed in args.seeds]
        case = {"dtype": dtype_name, "epsilon": epsilon, "rows": []}
        for i, scale in enumerate(SCALES):
          row = {"a": scale}
          for key in per_seed[0][i]:
            if key != "a":
              row[key] = _common.mean_std([s[i][key] for s in per_seed])
          case["rows"].append(row)
        results["cases"].append(case)
        worst = max(r["output_rel_error"]["max"] for r in case["rows"])
        print(dtype_name, epsilon, "worst output rel error", worst)
  return results


def plot(args, results) -> None:
  fig, axes = _common.figure(1, 3, width=4.2)
  keys = (("output_rel_error", "BN(aWu) vs BN(Wu)"),
          ("weight_grad_rel_error", "a * dL/d(aW) vs dL/dW"),
          ("input_grad_rel_error", "dL/du at aW vs at W"))
  for ax, (key, title) in zip(axes[0], keys):
    for case in results["cases"]:
      errors = [max(r[key]["max"], 1e-17) for r in case["rows"]]
      ax.loglog(results["scales"], errors, marker="o",
                linestyle="-" if case["dtype"] == "float64" else "--",
                label=f"{case['dtype']}, eps={case['epsilon']:g}")
    ax.set_xlabel("weight scale a")
    ax.set_ylabel("max relative error (over seeds)")
    ax.set_title(title, fontsize=9)
  axes[0, 0].legend(fontsize=6)
  fig.suptitle("Scale invariance of batch norm (BN paper section 3.3)")
  _common.save_figure(args, fig)


def main(argv=None):
  _common.run_experiment(NAME, __doc__, run, plot, argv)


if __name__ == "__main__":
  main()
