"""jaxbn: batch normalization for JAX as pure functions over pytrees."""

from jaxbn._activation import batch_norm_activation as batch_norm_activation
from jaxbn._batch_norm import BatchNormParams as BatchNormParams
from jaxbn._batch_norm import BatchNormState as BatchNormState
from jaxbn._batch_norm import batch_norm as batch_norm
from jaxbn._batch_norm import init as init
from jaxbn._folding import fold_into_conv as fold_into_conv
from jaxbn._folding import fold_into_dense as fold_into_dense
from jaxbn._ghost import ghost_batch_norm as ghost_batch_norm
from jaxbn._microbatch import batch_norm_moments as batch_norm_moments
from jaxbn._microbatch import empty_moments as empty_moments
from jaxbn._microbatch import moments_state as moments_state
from jaxbn._microbatch import update_stats as update_stats
from jaxbn._precise import recompute_stats as recompute_stats
from jaxbn._renorm import batch_renorm as batch_renorm
from jaxbn._scaling import MinMaxStats as MinMaxStats
from jaxbn._scaling import StandardizeStats as StandardizeStats
from jaxbn._scaling import fit_min_max as fit_min_max
from jaxbn._scaling import fit_standardize as fit_standardize
from jaxbn._scaling import init_min_max as init_min_max
from jaxbn._scaling import init_standardize as init_standardize
from jaxbn._scaling import merge_min_max as merge_min_max
from jaxbn._scaling import merge_standardize as merge_standardize
from jaxbn._scaling import min_max_scale as min_max_scale
from jaxbn._scaling import min_max_unscale as min_max_unscale
from jaxbn._scaling import standardize as standardize
from jaxbn._scaling import unstandardize as unstandardize
from jaxbn._scaling import update_min_max as update_min_max
from jaxbn._scaling import update_standardize as update_standardize
from jaxbn._stats import Moments as Moments
from jaxbn._stats import merge_moments as merge_moments
from jaxbn._stats import moments as moments
from jaxbn._sync import sync_stats as sync_stats
from jaxbn._torch_interop import from_torch as from_torch
from jaxbn._torch_interop import to_torch as to_torch

__version__ = "0.1.0"


def __getattr__(name: str):
  # The flax and Equinox adapters import those libraries; load them on first
  # use so `import jaxbn` stays light. `from jaxbn import linen` works either way.
  if name in ("linen", "nnx", "equinox"):
    import importlib
    return importlib.import_module(f"jaxbn.{name}")
  raise AttributeError(f"module 'jaxbn' has no attribute {name!r}")


__all__ = [
    "MinMaxStats",
    "StandardizeStats",
    "fit_min_max",
    "fit_standardize",
    "init_min_max",
    "init_standardize",
    "merge_min_max",
    "merge_standardize",
    "min_max_scale",
    "min_max_unscale",
    "standardize",
    "unstandardize",
    "update_min_max",
    "update_standardize",
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
    "batch_renorm",
    "ghost_batch_norm",
    "recompute_stats",
    "sync_stats",
    "fold_into_conv",
    "fold_into_dense",
    "from_torch",
    "to_torch",
    "linen",
    "nnx",
    "equinox",
]
