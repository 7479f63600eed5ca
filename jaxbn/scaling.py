"""Input feature scaling: standardization and min-max scaling as pure functions.

`jaxbn.scaling.fit_standardize(x)` -> `StandardizeStats`, applied with
`standardize` and undone with `unstandardize`; `fit_min_max` -> `MinMaxStats`,
`min_max_scale`, `min_max_unscale`. Statistics stream over batches (`init_*`,
`update_*`) and pool exactly across fits and replicas (`merge_*`,
`axis_name=`). See `jaxbn._scaling` for the conventions.
"""

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
]
