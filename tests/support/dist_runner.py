"""One process of the multi-process training test (tests/train/test_train_distributed.py).

    python tests/support/dist_runner.py NUM_PROCESSES PROCESS_ID COORDINATOR STEPS

Each process joins the group (`parallel.distributed.maybe_initialize`), builds the same tiny model
and the same mesh over all global devices, and feeds its slice of a seeded global batch (rows
split by process, as the RLDS pipeline gives each host `batch_size // process_count` rows). With
NUM_PROCESSES 1 the one process feeds the whole batch. Process 0 prints one JSON line per step.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

GLOBAL_BATCH, LENGTH = 4, 14


def global_rows(step: int):
    from openvla_jax.testing.synthetic import synthetic_batch

    return synthetic_batch(GLOBAL_BATCH, LENGTH, 28, seed=100 + step)


def main(argv):
    n, pid, coordinator, steps = int(argv[1]), int(argv[2]), argv[3], int(argv[4])
    from openvla_jax.parallel import distributed

    distributed.maybe_initialize(coordinator, n, pid)
    import jax
    import ml_collections

    from configs import model as model_configs
    from openvla_jax.models import vla
    from openvla_jax.parallel.batch import global_batch
    from openvla_jax.parallel.mesh import make_mesh
    from openvla_jax.train.optimizer import default_optimizer_config, make_optimizer
    from openvla_jax.train.step import FAST_COMPILE, abstract_params, init_train_state, make_train_step

    cfg = model_configs.get_config("tiny")
    cfg.vision.image_size = 28
    cfg.llm.num_hidden_layers = 1
    module = vla.from_config(cfg, dtype="float32")
    mesh = make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1)))
    ocfg = default_optimizer_config()
    ocfg.lr = 1e-3
    tx, schedule = make_optimizer(ocfg, abstract_params(module))
    state = init_train_state(module, cfg, tx, mesh, None, jax.random.key(0), compiler_options=FAST_COMPILE)
    step_fn = make_train_step(module, tx, schedule, mesh, supervised_tokens=8, compiler_options=FAST_COMPILE)
    per = GLOBAL_BATCH // jax.process_count()
    for s in range(steps):
        rows = {k: v[jax.process_index() * per : (jax.process_index() + 1) * per] for k, v in global_rows(s).items()}
        state, metrics = step_fn(state, global_batch(rows, mesh))
        m = jax.device_get(metrics)
        norm = float(
            jax.device_get(jax.jit(lambda p: sum(jax.numpy.sum(x * x) for x in jax.tree.leaves(p)))(state.params))
        )
        if jax.process_index() == 0:
            print(
                json.dumps(
                    dict(
                        step=s + 1,
                        loss=float(m["loss"]),
                        grad_norm=float(m["grad_norm"]),
                        param_sq=norm,
                        devices=jax.device_count(),
                        processes=jax.process_count(),
                    )
                ),
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv)
