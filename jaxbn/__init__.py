"""jaxbn: batch normalization for JAX as pure functions over pytrees."""

from jaxbn._activation import batch_norm_activation as batch_norm_activation
from jaxbn._state import BatchNormParams as BatchNormParams
from jaxbn._state import BatchNormState as BatchNormState
from jaxbn._batch_norm import batch_norm as batch_norm
from jaxbn._state import init as init
from jaxbn._folding import fold_into_conv as fold_into_conv
from jaxbn._folding import fold_into_dense as fold_into_dense
from jaxbn._ghost import ghost_batch_norm as ghost_batch_norm
from jaxbn._microbatch import batch_norm_moments as batch_norm_moments
from jaxbn._microbatch import empty_moments as empty_moments
from jaxbn._microbatch import moments_state as moments_state
from jaxbn._microbatch import update_stats as update_stats
from jaxbn._precise import recompute_stats as recompute_stats
from jaxbn._renorm import batch_renorm as batch_renorm
from jaxbn._stats import Moments as Moments
from jaxbn._stats import merge_moments as merge_moments
from jaxbn._stats import moments as moments
from jaxbn._sync import sync_stats as sync_stats
from jaxbn import scaling as scaling
from jaxbn._torch_interop import from_torch as from_torch
from jaxbn._torch_interop import to_torch as to_torch
from jaxbn._validation import MomentumWarning as MomentumWarning

__version__ = "0.1.0"


def __getattr__(name: str):
  # The flax and Equinox adapters import those libraries; load them on first
  # use so `import jaxbn` stays light. `from jaxbn import linen` works either way.
  if name in ("linen", "nnx", "equinox"):
    import importlib
    return importlib.import_module(f"jaxbn.{name}")
  if name in scaling.__all__:
    import warnings
    warnings.warn(f"jaxbn.{name} moved to jaxbn.scaling.{name} (see CHANGELOG.md); the "
                  "old name will be removed in a later release.", DeprecationWarning, stacklevel=2)
    return getattr(scaling, name)
  raise AttributeError(f"module 'jaxbn' has no attribute {name!r}")


__all__ = [
    "BatchNormParams",
    "BatchNormState",
    "Moments",
    "batch_norm",
    "batch_norm_activation",
    "batch_norm_moments",
    "empty_moments",
    "moments_state",
    "update_stats",
    "init",
    "merge_moments",
    "moments",
    "MomentumWarning",
    "batch_renorm",
    "ghost_batch_norm",
    "recompute_stats",
    "sync_stats",
    "fold_into_conv",
    "fold_into_dense",
    "from_torch",
    "to_torch",
    "scaling",
]
