"""jaxbn: batch normalization for JAX as pure functions over pytrees."""

from jaxbn._batch_norm import BatchNormParams as BatchNormParams
from jaxbn._batch_norm import BatchNormState as BatchNormState
from jaxbn._batch_norm import batch_norm as batch_norm
from jaxbn._batch_norm import init as init
from jaxbn._stats import Moments as Moments
from jaxbn._stats import merge_moments as merge_moments
from jaxbn._stats import moments as moments

__version__ = "0.1.0"

__all__ = [
    "BatchNormParams",
    "BatchNormState",
    "Moments",
    "batch_norm",
    "init",
    "merge_moments",
    "moments",
]
