"""`make demo`: the whole learning path on the bundled tabletop task, on 2 CPU cores in minutes.

  1. build the demo dataset (data/demo) if it is not there (scripts/make_demo_data.py);
  2. train a small OpenVLA on it (configs/train.py:demo) in runs/demo, resuming if interrupted;
  3. evaluate the exported model in closed loop: `OpenVLA.predict_action` drives the gripper in
     held-out episodes (seeds disjoint from the dataset's), beside the scripted expert and a random
     policy on the same episodes, and writes runs/demo/eval/{filmstrip.png,closed_loop.json};
  4. print the `demo:` line: success with its 95% interval, per-dimension agreement with the
     expert, policy calls per episode, and the time of each stage.

Re-running continues or re-evaluates the same run; `--fresh` starts over. `--variant=oft_demo`
(`make demo-oft`) runs OpenVLA-OFT's recipe the same way, in runs/oft_demo: it fine-tunes the demo
model (trained first in runs/demo when `make demo` has not run) to predict chunks of 2 actions in
one forward pass (parallel decoding) with the robot state as a proprio token, and runs each chunk
open-loop, so an episode takes fewer policy calls. `--variant=oft_demo_l1`: the same with OFT's
continuous L1 head.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from absl import app, flags, logging

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

flags.DEFINE_string("data_dir", "data/demo", "demo dataset (built here if absent)")
flags.DEFINE_enum("variant", "demo", ["demo", "oft_demo", "oft_demo_l1"], "configs/train.py variant")
flags.DEFINE_string("workdir", None, "training work dir (checkpoints, metrics, export, eval); default runs/<variant>")
flags.DEFINE_integer("steps", None, "override the number of training steps")
flags.DEFINE_integer("episodes", 128, "held-out closed-loop episodes (the success rate's sample)")
flags.DEFINE_integer("execute", None, "actions of each predicted chunk run before asking again (default: all)")
flags.DEFINE_bool("fresh", False, "delete the work dir first (an OFT variant keeps its base model, runs/demo)")
FLAGS = flags.FLAGS


def load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def workdir() -> str:
    return FLAGS.workdir or f"runs/{FLAGS.variant}"


def evaluate(export: str, out: Path, episodes: int, execute=None) -> dict:
    """Closed loop of the exported model, the expert and a random policy on the same episodes;
    writes out/filmstrip.png and out/closed_loop.json; returns the three results."""
    from openvla_jax import OpenVLA
    from openvla_jax.envs import tabletop
    from openvla_jax.evaluate.closed_loop import closed_loop
    from openvla_jax.evaluate.filmstrip import write_filmstrip

    vla = OpenVLA.load(export, dtype="float32")  # preprocessing as the export records: the training resize
    policy = closed_loop(vla, n_episodes=episodes, seed=0, execute=execute, record=8, progress=True)
    expert = closed_loop(tabletop.image_expert_policy, n_episodes=episodes, seed=0)
    rand = closed_loop(tabletop.random_policy(0), n_episodes=episodes, seed=0)
    out.mkdir(parents=True, exist_ok=True)
    film = write_filmstrip(
        policy.pop("recorded"),
        out / "filmstrip.png",
        title=f"{FLAGS.variant}: closed-loop success {policy['success_rate']:.0%} over {episodes} held-out episodes",
    )
    for r in (expert, rand):
        r.pop("recorded")
    results = {
        "policy": policy,
        "expert": expert,
        "random": rand,
        "filmstrip": str(film),
        "image_resize": vla.image_resize,
        "center_crop": vla.center_crop,
    }
    (out / "closed_loop.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def main(argv):
    del argv
    import tensorflow_datasets as tfds

    logging.set_verbosity(logging.WARNING)  # tfds logs every dataset it opens at INFO
    tfds.disable_progress_bar()
    from configs import train as train_configs
    from openvla_jax.train.loop import train

    t0 = time.time()
    load_script("make_demo_data").make_demo_data(FLAGS.data_dir)
    t_data = time.time() - t0
    if FLAGS.fresh:
        shutil.rmtree(workdir(), ignore_errors=True)
    config = train_configs.get_config(FLAGS.variant)
    config.data.data_dir = config.data.tokenizer_dir = FLAGS.data_dir
    t_base = 0.0
    if config.init_from == train_configs.DEMO_EXPORT:  # the OFT variants fine-tune the demo model
        base = train_configs.get_config("demo")
        base.data.data_dir = base.data.tokenizer_dir = FLAGS.data_dir
        base_dir = str(Path(train_configs.DEMO_EXPORT).parent)
        print(f"demo: OFT fine-tunes a trained model: the demo model in {base_dir} (trained now unless done)")
        tb = time.time()
        config.init_from = train(base, base_dir)["export"]
        t_base = time.time() - tb
    if FLAGS.steps:
        config.train.steps = FLAGS.steps
        config.optimizer.total_steps = max(FLAGS.steps, config.optimizer.warmup_steps + 1)
    t1 = time.time()
    summary = train(config, workdir())
    t_train = time.time() - t1
    t2 = time.time()
    r = evaluate(summary["export"], Path(workdir()) / "eval", FLAGS.episodes, FLAGS.execute)
    t_eval = time.time() - t2
    p, lo_hi = r["policy"], r["policy"]["ci95"]
    agree = " ".join(f"{k} {v:.2f}" for k, v in p["agreement"].items())
    total = time.time() - t0
    print(
        f"demo: closed-loop success {p['success_rate']:.2f} (95% CI {lo_hi[0]:.2f}-{lo_hi[1]:.2f}) over "
        f"{p['episodes']} held-out episodes; expert {r['expert']['success_rate']:.2f}, random policy "
        f"{r['random']['success_rate']:.2f}; {p['calls_per_episode']:.1f} policy calls per episode "
        f"({p['mean_steps']:.1f} steps); agreement with the expert per action: {agree}"
    )
    print(
        f"demo: {total / 60:.1f} min in all (data {t_data / 60:.1f}, "
        + (f"base model {t_base / 60:.1f}, fine-tuning " if config.init_from else "training ")
        + f"{t_train / 60:.1f} for {summary['step']} steps, evaluation {t_eval / 60:.1f}); filmstrip: {r['filmstrip']}"
    )
    line = dict(
        variant=FLAGS.variant,
        steps=summary["step"],
        success=p["success_rate"],
        ci95=p["ci95"],
        episodes=p["episodes"],
        expert=r["expert"]["success_rate"],
        random=r["random"]["success_rate"],
        calls_per_episode=round(p["calls_per_episode"], 2),
        mean_steps=round(p["mean_steps"], 2),
        agreement={k: round(v, 3) for k, v in p["agreement"].items()},
        by_task=p["success_rate_by_task"],
        minutes=dict(
            total=round(total / 60, 2),
            data=round(t_data / 60, 2),
            base=round(t_base / 60, 2),
            train=round(t_train / 60, 2),
            eval=round(t_eval / 60, 2),
        ),
        export=summary["export"],
        filmstrip=r["filmstrip"],
    )
    print("demo: " + json.dumps(line))


if __name__ == "__main__":
    app.run(main)
