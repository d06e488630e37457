"""Run the training loop on a small config in its own process (tests/train/test_train_loop.py).

    python tests/support/train_runner.py DATA_DIR WORKDIR STEPS [--sigterm-at K] [--kill-after-save K]

--sigterm-at K: the process sends itself SIGTERM after step K (the loop must save K and exit 0).
--kill-after-save K: after step K+1, wait until checkpoint K is complete, then SIGKILL itself (no
chance to clean up): the resumed run must continue from K.
--learn 1: the learning check's settings (one save at the end, lr schedule over STEPS, log every 10).
--nan-at K: the batch of step K has NaN pixels (its loss is NaN), logged and saved every 5 steps.
--oft 1: the OFT options of configs/train.py:oft_demo_l1 (chunks of 2, parallel decoding, L1 head,
proprio token) on the same small model, from scratch.
--lora R: LoRA of rank R (configs/finetune.py's targets) on the frozen base $INIT_FROM (a converted
checkpoint of this small model), fp32, through the same loop.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def demo_data_and_random_base(tmp: Path, seed: int) -> tuple[str, Path]:
    """(a 12-episode demo data dir under `tmp`, a converted checkpoint `tmp/base` of `small_config`'s
    model with random weights, whose statistics name another dataset): what fine-tuning tests start from."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from openvla_jax.checkpoints.converted import save_converted
    from openvla_jax.models import vla
    from tests.support.rlds_fixtures import load_script

    data_dir = load_script("make_demo_data").make_demo_data(
        str(tmp / "demo"), episodes=12, val_fraction=0.25, seed=seed
    )
    model_config = small_config(data_dir, 1).model  # the demo's tiny model, 56 px, one LLM layer
    module = vla.from_config(model_config, dtype=jnp.float32)
    size = model_config.vision.image_size
    params = jax.jit(
        lambda k: nn.meta.unbox(module.init(k, jnp.zeros((1, size, size, 6)), jnp.zeros((1, 4), jnp.int32))["params"])
    )(jax.random.key(0))
    base = save_converted(
        tmp / "base", model_config, jax.tree.map(np.asarray, params), {"some_other_robot": {}}, data_dir
    )
    return data_dir, Path(base)


def small_config(data_dir: str, steps: int):
    from configs import train as train_configs

    c = train_configs.get_config("demo")
    c.model.vision.image_size = 56  # 4x4 patches: fast steps, same code path
    c.model.llm.num_hidden_layers = 1
    c.data.data_dir = c.data.tokenizer_dir = data_dir
    c.data.batch_size = 8
    c.data.shuffle_buffer = 64
    c.data.num_parallel_calls = 1
    c.data.num_parallel_reads = 1
    c.optimizer.total_steps, c.optimizer.warmup_steps = 100, 20
    c.train.steps = steps
    c.train.log_every = 1
    c.train.save_every = 2
    c.train.keep_last = 3
    c.train.eval_every = 0
    c.train.offline_eval_every = steps  # once, at the end: greedy decoding on the validation split
    c.train.eval_batches = 2
    c.train.progress = False
    c.train.checksum = True
    return c


def train_configs_oft():
    from configs import train as train_configs

    return train_configs.get_config("oft_demo_l1")


def main(argv):
    data_dir, workdir, steps = argv[1], argv[2], int(argv[3])
    opts = dict(zip(argv[4::2], map(int, argv[5::2])))
    import jax

    jax.config.update("jax_compilation_cache_dir", str(Path(workdir).parent / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    from openvla_jax.train.loop import train

    def on_step(step, metrics):
        if step == opts.get("--sigterm-at"):
            os.kill(os.getpid(), signal.SIGTERM)
        k = opts.get("--kill-after-save")
        if k is not None and step == k + 1:
            manifest = Path(workdir) / "checkpoints" / str(k) / "manifest.json"
            deadline = time.time() + 60
            while not manifest.exists() and time.time() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)

    config = small_config(data_dir, steps)
    if opts.get("--learn"):
        config.optimizer.total_steps = steps
        config.optimizer.lr = 3e-3
        config.train.save_every = steps
        config.train.log_every = 10
        config.train.checksum = False
    if opts.get("--oft"):
        oft = train_configs_oft()
        for k in ("action_chunk", "decoding", "action_head", "proprio_dim"):
            config.model[k] = oft.model[k]
        config.data.future_action_window_size = oft.data.future_action_window_size
        config.train.offline_eval_every = 0  # offline eval decodes OpenVLA token rows only
    if opts.get("--nan-at"):
        from openvla_jax.parallel import batch as loop  # the loop imports global_batch from here when it starts

        config.train.log_every = config.train.save_every = 5
        calls, real = [0], loop.global_batch

        def poisoned(host, *args, **kwargs):
            calls[0] += 1
            if calls[0] == opts["--nan-at"]:
                host = dict(host, pixel_values=host["pixel_values"] * float("nan"))
            return real(host, *args, **kwargs)

        loop.global_batch = poisoned
        on_step = None  # no per-step callback: the loop reads metrics only when it logs or saves
    if opts.get("--lora"):
        from configs.finetune import lora_config

        config.lora = lora_config()
        config.lora.rank = opts["--lora"]
        config.base_dtype = "float32"
    config.init_from = os.environ.get("INIT_FROM", "")
    summary = train(config, workdir, on_step=on_step)
    print("SUMMARY " + json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str))}))


if __name__ == "__main__":
    main(sys.argv)
