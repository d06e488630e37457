"""Open X-Embodiment dataset registry: configs, standardize functions, named mixtures."""

from openvla_jax.data.oxe import transforms  # noqa: F401
from openvla_jax.data.oxe.configs import (  # noqa: F401
    REGISTRY,
    ActionEncoding,
    DatasetConfig,
    StateEncoding,
    check_loadable,
    get_dataset_config,
    register_dataset,
)
from openvla_jax.data.oxe.datasets import STANDARDIZE  # noqa: F401  (importing it fills REGISTRY)
from openvla_jax.data.oxe.mixtures import MIXTURES, get_mixture, loadable_mixture  # noqa: F401
