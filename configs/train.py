"""Training configs: `python scripts/train.py --config=configs/train.py:<variant> --workdir=DIR`.

Variants:
  demo                  the tiny model, sized for the bundled tabletop task (`make demo`): 42-px
                        images, 768-token vocabulary, 5000 steps of 16, about 4 minutes on 2 CPU cores
  tiny                  the tiny model on any RLDS mixture (set data.data_dir / data.mixture)
  openvla_7b_pretrain   the original recipe: OpenVLA 7B on oxe_magic_soup_plus_minus, global batch
                        2048, AdamW lr 2e-5 constant, no warmup, wd 0, clip 1.0, bf16 compute with
                        fp32 master weights, FSDP over every device, remat on decoder layers, seed 7
  openvla_7b_finetune   full fine-tuning of a converted openvla-7b on your dataset (set
                        init_from, data.data_dir, data.mixture)
  oft_demo              OpenVLA-OFT's recipe on the demo (`make demo-oft`): the trained demo model
                        (runs/demo/export) fine-tuned to predict chunks of K=2 actions as discrete
                        tokens decoded in one pass (parallel decoding), the robot state as a proprio
                        token; 4000 steps
  oft_demo_l1           the same with OFT's continuous L1 head in place of the tokens
  oft_7b_libero         OpenVLA-OFT's LIBERO recipe on a converted openvla-7b: K=8, third-person +
                        wrist cameras, 8-d proprio, L1 head (set init_from, data.data_dir, data.mixture)

Override any field on the command line: `--config.train.steps=100 --config.data.batch_size=8`.
"""

import ml_collections

from configs import model as model_configs
from openvla_jax.parallel.mesh import default_mesh_config
from openvla_jax.train.optimizer import default_optimizer_config

VARIANTS = (
    "demo",
    "tiny",
    "openvla_7b_pretrain",
    "openvla_7b_finetune",
    "oft_demo",
    "oft_demo_l1",
    "oft_7b_libero",
)


def data_config(**overrides) -> ml_collections.ConfigDict:
    """Fields of `openvla_jax.data.rlds.DataConfig` plus where the tokenizer is."""
    cfg = ml_collections.ConfigDict(
        dict(
            data_dir="data/demo",
            mixture="demo_tabletop",
            tokenizer_dir="",  # directory with tokenizer.model ("" = the init checkpoint's)
            batch_size=16,  # global batch (all hosts together)
            shuffle_buffer=256_000,
            augment=False,
            image_view="primary",
            image_views=(),  # several cameras, e.g. ("primary", "wrist"): one per model.num_images
            pad_missing_views=False,  # a dataset without one of the views: black image (True) or an error
            window_size=1,
            future_action_window_size=0,
            normalization="bounds_q99",
            deterministic=True,  # needed for exact resume of the batch sequence
            ram_budget_gb=0.0,
            num_parallel_calls=-1,  # -1: tf.data AUTOTUNE
            num_parallel_reads=-1,
            eval_split=True,  # evaluate on the datasets' validation split (when they have one)
        )
    )
    cfg.update(overrides)
    return cfg


def train_loop_config(**overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(
        dict(
            steps=1000,
            log_every=10,  # metrics to TensorBoard + metrics.jsonl every N steps
            eval_every=0,  # 0: no periodic evaluation (teacher-forced loss / accuracy / L1)
            eval_batches=8,
            offline_eval_every=0,  # 0: none; else evaluate/offline.py (greedy decoding, per-dim L1/MSE)
            save_every=500,
            keep_last=2,
            keep_every=0,  # 0: none kept beyond the last K
            async_save=True,
            checksum=True,  # crc32 of every checkpoint file in the manifest
            progress=True,  # tqdm bar on the main process
            export_dir="",  # write an OpenVLA.load-able model here at the end ("" = workdir/export)
            allow_fresh_start=False,  # True: start at step 0 even where only incomplete checkpoints are
        )
    )
    cfg.update(overrides)
    return cfg


DEMO_STEPS = 5000
DEMO_EXPORT = "runs/demo/export"  # what `make demo` trains: the model the OFT demo variants start from
OFT_DEMO_STEPS = 4000


def demo_model(model: ml_collections.ConfigDict) -> None:
    """The `tiny` model sized for the demo task on 2 CPU cores (numbers only; BENCHMARKS.md, "Why the
    demo policy failed", has the ablations behind each)."""
    model.vision.image_size = 42  # 3 x 3 patches of 14 px: one per third of the wrist image
    model.llm.vocab_size = 768  # 448 text ids (<= 400 pieces + <PAD>), 256 action bins, 64 padding
    model.llm.initializer_range = 0.125  # larger init: attention is sharp from the start, learns ~2x faster


def get_config(variant: str = "demo") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown train variant {variant!r}; expected one of {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.seed = 7
    c.init_from = ""  # a converted checkpoint (scripts/convert.py to-jax) to start from
    c.compilation_cache_dir = ""  # persistent XLA cache ("" = $OPENVLA_JAX_COMPILATION_CACHE or none)
    c.optimizer = default_optimizer_config()
    c.mesh = default_mesh_config()
    if variant.startswith("oft_"):
        return oft_config(variant)
    if variant in ("demo", "tiny"):
        c.model = model_configs.get_config("tiny")
        c.model.dtype = "float32"  # CPU: bf16 matmuls are emulated and slower than fp32
        c.data = data_config(tokenizer_dir="data/demo" if variant == "demo" else "")
        c.train = train_loop_config()
        if variant == "demo":
            demo_model(c.model)
            c.data.batch_size = 16
            c.data.shuffle_buffer = 20_000
            c.optimizer.lr = 1e-3  # a tiny model from scratch learns at a much larger lr than 2e-5
            c.optimizer.schedule = "warmup_cosine"
            c.optimizer.warmup_steps = 100
            c.optimizer.total_steps = DEMO_STEPS
            # Cosine to half the peak, not to 0: at 5000 steps red and green blocks are told apart
            # (closed loop 97% against 84% decaying to 0; BENCHMARKS.md, "What the remaining 16% were").
            c.optimizer.end_lr_ratio = 0.5
            c.train = train_loop_config(
                steps=DEMO_STEPS, log_every=50, eval_every=1000, eval_batches=8, save_every=1000
            )
    else:
        c.model = model_configs.get_config("7b")
        c.model.remat_policy = "full"  # activation checkpointing on decoder layers, as the original
        c.model.scan_layers = True
        c.data = data_config(
            data_dir="", mixture="oxe_magic_soup_plus_minus", batch_size=2048, deterministic=False, ram_budget_gb=0.0
        )
        c.train = train_loop_config(steps=295_000, log_every=10, save_every=10_000, keep_last=3, keep_every=50_000)
        if variant == "openvla_7b_finetune":
            c.data.mixture = ""  # your dataset: --config.data.mixture=<registered name>
            c.data.batch_size = 16
            c.data.augment = True
            c.train.steps = 20_000
            c.train.save_every = 2_500
    return c


def oft_config(variant: str) -> ml_collections.ConfigDict:
    """The OFT variants: the same model and loop with the options of `models/vla.py` switched on."""
    if variant == "oft_7b_libero":
        c = get_config("openvla_7b_finetune")
        c.model.action_chunk = 8  # LIBERO: 8 actions per forward pass
        c.model.num_images = 2
        c.data.image_views = ("primary", "wrist")
        c.model.proprio_dim = 8  # LIBERO state: eef pos 3 + axis-angle 3 + gripper 2
        c.optimizer.lr = 5e-4
        c.data.mixture = "libero_spatial_no_noops"
    else:
        # OFT adapts a trained OpenVLA (BENCHMARKS.md, "The OFT variant": from scratch, the 2-layer
        # demo model did not learn chunks in the demo's budget; fine-tuned from the demo model it does).
        c = get_config("demo")
        c.init_from = DEMO_EXPORT
        c.model.action_chunk = 2  # a chunk of 2 grid moves: how far the block is, read from one image
        c.model.proprio_dim = 4  # the demo's state: x, y, z, gripper open
        c.optimizer.lr = 5e-4
        c.optimizer.total_steps = c.train.steps = OFT_DEMO_STEPS
    c.variant = variant
    c.model.decoding = "parallel"
    c.model.action_head = "tokens" if variant == "oft_demo" else "l1"
    c.data.window_size = 1
    c.data.future_action_window_size = c.model.action_chunk - 1
    return c
