"""Device meshes, logical-axis sharding rules, global batches and multi-process start-up."""

from openvla_jax.parallel.batch import global_batch
from openvla_jax.parallel.distributed import maybe_initialize
from openvla_jax.parallel.mesh import default_mesh_config, make_mesh, single_device_mesh
from openvla_jax.parallel.rules import RULES
from openvla_jax.parallel.sharding import opt_state_shardings, param_shardings, replicated

__all__ = [
    "RULES",
    "default_mesh_config",
    "global_batch",
    "make_mesh",
    "maybe_initialize",
    "opt_state_shardings",
    "param_shardings",
    "replicated",
    "single_device_mesh",
]
