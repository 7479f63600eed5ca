"""The batch-norm implementations under test, behind one functional interface.

Every JAX implementation is a `JaxBatchNorm` whose `init(x)` returns
`(params, state)` pytrees and whose `apply(params, state, x, training,
axis_name)` returns `(y, new_state)` with `y` of `x`'s dtype. Inputs are given
in the layout the library expects (`layout`: equinox normalizes channel-first
examples, everything else is channels-last); `to_layout` converts an NHWC or
(N, C) array to it. All use momentum 0.99 (weight of the old value) and
epsilon 1e-5, scale and bias on.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MOMENTUM = 0.99
EPSILON = 1e-5


class JaxBatchNorm(NamedTuple):
  name: str
  layout: str  # "channels_last" or "channels_first"
  init: Callable[[jax.Array], tuple[Any, Any]]
  apply: Callable[..., tuple[jax.Array, Any]]

  def to_layout(self, x):
    return to_channels_first(x) if self.layout == "channels_first" else x

  def from_layout(self, y):
    return from_channels_first(y) if self.layout == "channels_first" else y


def to_channels_first(x):
  """(N, ..., C) -> (N, C, ...)."""
  return jnp.moveaxis(x, -1, 1) if x.ndim > 2 else x


def from_channels_first(y):
  return jnp.moveaxis(y, 1, -1) if y.ndim > 2 else y


def _jaxbn() -> JaxBatchNorm:
  import jaxbn

  def init(x):
    return jaxbn.init(x.shape[-1])

  def apply(params, state, x, training, axis_name=None):
    return jaxbn.batch_norm(params, state, x, training=training, momentum=MOMENTUM,
                            epsilon=EPSILON, axis_name=axis_name)

  return JaxBatchNorm("jaxbn", "channels_last", init, apply)


def _flax_linen(use_fast_variance: bool) -> JaxBatchNorm:
  from flax import linen as nn

  def module(x, axis_name):
    return nn.BatchNorm(momentum=MOMENTUM, epsilon=EPSILON, dtype=x.dtype,
                        axis_name=axis_name, use_fast_variance=use_fast_variance)

  def init(x):
    variables = module(x, None).init(jax.random.key(0), x, use_running_average=False)
    return variables["params"], variables["batch_stats"]

  def apply(params, state, x, training, axis_name=None):
    variables = {"params": params, "batch_stats": state}
    if not training:
      return module(x, axis_name).apply(variables, x, use_running_average=True), state
    y, updates = module(x, axis_name).apply(variables, x, use_running_average=False,
                                            mutable=["batch_stats"])
    return y, updates["batch_stats"]

  name = "flax.linen" + ("" if use_fast_variance else " (use_fast_variance=False)")
  return JaxBatchNorm(name, "channels_last", init, apply)


def _flax_nnx() -> JaxBatchNorm:
  from flax import nnx
  graphdefs = {}

  def build(x, axis_name):
    key = (x.shape[-1], axis_name)
    if key not in graphdefs:
      module = nnx.BatchNorm(x.shape[-1], momentum=MOMENTUM, epsilon=EPSILON,
                             dtype=x.dtype, axis_name=axis_name, rngs=nnx.Rngs(0))
      graphdefs[key] = nnx.split(module, nnx.Param, nnx.BatchStat)
    return graphdefs[key]

  def init(x):
    _, params, stats = build(x, None)
    return params, stats

  def apply(params, state, x, training, axis_name=None):
    graphdef = build(x, axis_name)[0]
    module = nnx.merge(graphdef, params, state)
    y = module(x, use_running_average=not training)
    _, _, new_state = nnx.split(module, nnx.Param, nnx.BatchStat)
    return y, new_state

  return JaxBatchNorm("flax.nnx", "channels_last", init, apply)


def _haiku() -> JaxBatchNorm:
  import haiku as hk
  transformed = {}

  def get(axis_name):
    if axis_name not in transformed:
      def forward(x, is_training):
        return hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=MOMENTUM,
                            eps=EPSILON, cross_replica_axis=axis_name)(x, is_training)
      transformed[axis_name] = hk.without_apply_rng(hk.transform_with_state(forward))
    return transformed[axis_name]

  def init(x):
    return get(None).init(None, x, True)

  def apply(params, state, x, training, axis_name=None):
    y, new_state = get(axis_name).apply(params, state, x, training)
    return y.astype(x.dtype), (new_state if training else state)

  return JaxBatchNorm("haiku", "channels_last", init, apply)


def _equinox() -> JaxBatchNorm:
  import equinox as eqx
  modules = {}

  def build(channels, axis_name):
    key = (channels, axis_name)
    if key not in modules:
      names = ("batch",) + (tuple(axis_name) if isinstance(axis_name, (tuple, list))
                            else (() if axis_name is None else (axis_name,)))
      modules[key] = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
          channels, axis_name=names, eps=EPSILON, momentum=MOMENTUM, mode="batch")
    return modules[key]

  def init(x):
    module, state = build(x.shape[1], None)
    return {"weight": module.weight, "bias": module.bias}, state

  def apply(params, state, x, training, axis_name=None):
    template = build(x.shape[1], axis_name)[0]
    module = eqx.tree_at(lambda m: (m.weight, m.bias), template,
                         (params["weight"], params["bias"]))
    batched = jax.vmap(lambda xi, s: module(xi, s, inference=not training),
                       axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    y, new_state = batched(x, state)
    return y.astype(x.dtype), new_state

  return JaxBatchNorm("equinox (mode='batch')", "channels_first", init, apply)


def jax_implementations(names: tuple[str, ...] | None = None) -> list[JaxBatchNorm]:
  """The JAX implementations, jaxbn first (the ratios' reference)."""
  builders = {
      "jaxbn": _jaxbn,
      "flax.linen": lambda: _flax_linen(True),
      "flax.linen (use_fast_variance=False)": lambda: _flax_linen(False),
      "flax.nnx": _flax_nnx,
      "haiku": _haiku,
      "equinox (mode='batch')": _equinox,
  }
  chosen = list(builders) if names is None else list(names)
  return [builders[name]() for name in chosen]


def train_step(impl: JaxBatchNorm, axis_name=None) -> Callable:
  """`(params, state, x, ct) -> (y, new_state, dparams, dx)`: forward + backward.

  The backward pass is the VJP of `y` with cotangent `ct` w.r.t. the
  parameters and the input: what one BN layer does in a training step.
  """
  def step(params, state, x, ct):
    (y, new_state), vjp = jax.vjp(
        lambda p, s, v: impl.apply(p, s, v, True, axis_name), params, state, x)
    zero_state = jax.tree.map(jnp.zeros_like, new_state)
    dparams, _, dx = vjp((ct, zero_state))
    return y, new_state, dparams, dx
  return step


def train_forward(impl: JaxBatchNorm, axis_name=None) -> Callable:
  """`(params, state, x) -> (y, new_state)`: the training-mode forward only."""
  def forward(params, state, x):
    return impl.apply(params, state, x, True, axis_name)
  return forward


def inference_step(impl: JaxBatchNorm) -> Callable:
  """`(params, state, x) -> y` with the running statistics."""
  def step(params, state, x):
    return impl.apply(params, state, x, False)[0]
  return step


def warm_state(impl: JaxBatchNorm, params, state, x):
  """The state after one training step on `x` (the steady-state path)."""
  return jax.jit(lambda p, s, v: impl.apply(p, s, v, True)[1])(params, state, x)


def std_error(y, x, epsilon: float = EPSILON) -> float:
  """Largest per-channel |std(y) - exact std| of a train-mode output.

  With scale 1 and bias 0 the exact output of channel c has standard deviation
  sqrt(var_c / (var_c + epsilon)), var_c computed in float64 from the very
  values of `x` (after its own rounding to x.dtype). `y` and `x` are
  channels-last (NHWC or (N, C)).
  """
  x64 = np.asarray(jnp.asarray(x, jnp.float32), np.float64).reshape(-1, x.shape[-1])
  y64 = np.asarray(jnp.asarray(y, jnp.float32), np.float64).reshape(-1, y.shape[-1])
  var = x64.var(axis=0)
  expected = np.sqrt(var / (var + epsilon))
  return float(np.max(np.abs(y64.std(axis=0) - expected)))


# --- PyTorch (CPU) ------------------------------------------------------------

TORCH_LAYOUTS = ("NCHW", "channels_last")


class TorchCase(NamedTuple):
  """One PyTorch batch-norm layer with its input, ready to run."""
  name: str
  train: Callable[[], Any]      # forward + autograd backward, synchronous
  infer: Callable[[], Any]      # eval-mode forward under no_grad
  forward_nhwc: Callable[[], np.ndarray]  # one train-mode forward, NHWC float32


def torch_case(x, ct, layout: str, threads: int = 2) -> TorchCase:
  """`torch.nn.BatchNorm2d` (4-D, NHWC `x` given) or `BatchNorm1d` (2-D).

  Args:
    x, ct: channels-last arrays (JAX or NumPy; bf16 allowed); `ct` is the
      output cotangent of the backward pass.
    layout: "NCHW" (contiguous) or "channels_last" (NHWC memory); 2-D inputs
      have one layout and ignore it.
    threads: `torch.set_num_threads`.
  """
  import torch
  torch.set_num_threads(threads)
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[str(x.dtype)]

  def to_torch(a):
    t = torch.from_numpy(np.array(jnp.asarray(a, jnp.float32)))
    if t.ndim == 4:
      t = t.permute(0, 3, 1, 2)
      t = t.contiguous(memory_format=torch.channels_last if layout == "channels_last"
                       else torch.contiguous_format)
    return t.to(dtype)

  channels = x.shape[-1]
  # PyTorch's momentum is the weight of the NEW value.
  module_type = torch.nn.BatchNorm2d if x.ndim == 4 else torch.nn.BatchNorm1d
  module = module_type(channels, eps=EPSILON, momentum=1.0 - MOMENTUM)
  tx, tct = to_torch(x), to_torch(ct)
  tx.requires_grad_(True)

  def train():
    module.train()
    tx.grad = None
    module.zero_grad(set_to_none=True)
    module(tx).backward(tct)

  def infer():
    module.eval()
    with torch.no_grad():
      return module(tx)

  def forward_nhwc():
    module.train()
    with torch.no_grad():
      y = module(tx).float()
    if y.ndim == 4:
      y = y.permute(0, 2, 3, 1)
    return y.contiguous().numpy()

  name = "torch " + ("BatchNorm2d " + layout if x.ndim == 4 else "BatchNorm1d")
  return TorchCase(name, train, infer, forward_nhwc)
