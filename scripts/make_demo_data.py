"""Build the bundled demo: an RLDS dataset of expert episodes and a small sentencepiece tokenizer.

    python scripts/make_demo_data.py --out_dir data/demo --episodes 6000

Writes, atomically (a temp dir renamed into place; a finished build holds ``demo_manifest.json``):
  {out_dir}/demo_tabletop/1.0.0/   RLDS tfds dataset, splits train and val
  {out_dir}/tokenizer.model        sentencepiece BPE, Llama ids (unk 0, bos 1, eos 2), "▁" a piece
  {out_dir}/demo_manifest.json     what was built, with which flags

Skips the build when a complete one exists (``--force`` rebuilds).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

from absl import app, flags
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from openvla_jax.data.rlds_writer import write_rlds  # noqa: E402
from openvla_jax.envs import tabletop  # noqa: E402
from openvla_jax.tokenizer.small_spm import train_sentencepiece  # noqa: E402

DATASET_NAME = tabletop.DATASET_NAME
MANIFEST = "demo_manifest.json"
DEMO_EPISODES = 6000  # about 1.5 min to build on 2 cores

FLAGS = flags.FLAGS


def define_flags() -> None:
    """CLI flags; defined only when run as a script so importing this module (tests) adds none."""
    flags.DEFINE_string("out_dir", "data/demo", "Output directory.")
    flags.DEFINE_integer("episodes", DEMO_EPISODES, "Total number of expert episodes (train + val).")
    flags.DEFINE_float("val_fraction", 0.1, "Fraction of episodes in the val split.")
    flags.DEFINE_integer("seed", 0, "Episode i of the dataset uses env seed (seed, 0, i).")
    flags.DEFINE_integer("vocab_size", 400, "Upper bound on the sentencepiece vocabulary size.")
    flags.DEFINE_bool("force", False, "Rebuild even if a complete build exists.")


def build(out_dir: str, episodes: int, val_fraction: float, seed: int, vocab_size: int) -> dict:
    """Build into ``{out_dir}.tmp-{pid}``; returns the manifest. The caller renames it into place."""
    if episodes < 2:
        raise ValueError(f"--episodes must be >= 2 (one train, one val), got {episodes}")
    n_val = min(max(1, round(episodes * val_fraction)), episodes - 1) if val_fraction > 0 else 0
    n_train = episodes - n_val
    bar = tqdm(total=episodes, desc="demo episodes", unit="ep")

    def gen(lo: int, hi: int):
        for i in range(lo, hi):
            yield tabletop.expert_episode((seed, 0, i))
            bar.update(1)

    splits = {"train": gen(0, n_train)}
    if n_val:
        splits["val"] = gen(n_train, episodes)
    path = write_rlds(
        out_dir,
        DATASET_NAME,
        splits,
        image_format="png",
        description="Procedurally rendered tabletop demo task (openvla_jax.envs.tabletop).",
    )
    bar.close()
    texts = [tabletop.instruction_for(t, c) for t in tabletop.TASKS for c in tabletop.COLORS]
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(train_sentencepiece(texts, vocab_size))
    return {
        "dataset": DATASET_NAME,
        "version": "1.0.0",
        "path": os.path.relpath(path, out_dir),
        "episodes": episodes,
        "train_episodes": n_train,
        "val_episodes": n_val,
        "seed": seed,
        "val_fraction": val_fraction,
        "vocab_size": vocab_size,
        "image_size": tabletop.IMAGE_SIZE,
        "scene_version": tabletop.SCENE_VERSION,
    }


def is_complete(out_dir: str, **settings) -> bool:
    """A finished build (its manifest is written last) made with these settings and this scene."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        manifest = json.load(f)
    want = dict(settings, scene_version=tabletop.SCENE_VERSION)
    return all(manifest.get(k) == v for k, v in want.items())


def make_demo_data(
    out_dir: str = "data/demo",
    episodes: int = DEMO_EPISODES,
    val_fraction: float = 0.1,
    seed: int = 0,
    vocab_size: int = 400,
    force: bool = False,
) -> str:
    """Build (or skip, when complete and not ``force``) the demo data; returns the output dir."""
    out_dir = os.path.abspath(out_dir)
    settings = dict(episodes=episodes, val_fraction=val_fraction, seed=seed, vocab_size=vocab_size)
    if not force and is_complete(out_dir, **settings):
        print(f"demo data already built in {out_dir}; pass --force to rebuild")
        return out_dir
    t0 = time.time()
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        manifest = build(tmp, episodes, val_fraction, seed, vocab_size)
        manifest["build_seconds"] = round(time.time() - t0, 2)
        with open(os.path.join(tmp, MANIFEST), "w") as f:  # written last: marks the build complete
            json.dump(manifest, f, indent=2)
        if os.path.exists(out_dir):  # an old or broken build: move aside, then swap in the new one
            old = f"{out_dir}.old-{os.getpid()}"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.makedirs(os.path.dirname(out_dir), exist_ok=True)
            os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"wrote {manifest['train_episodes']} train + {manifest['val_episodes']} val episodes and "
        f"tokenizer.model to {out_dir} in {time.time() - t0:.1f}s"
    )
    return out_dir


def main(argv) -> None:
    del argv
    import tensorflow_datasets as tfds  # noqa: PLC0415

    tfds.disable_progress_bar()  # our episode bar says it all; tfds' own bars interleave with it
    make_demo_data(FLAGS.out_dir, FLAGS.episodes, FLAGS.val_fraction, FLAGS.seed, FLAGS.vocab_size, FLAGS.force)


if __name__ == "__main__":
    define_flags()
    app.run(main)
