"""Fine-tuning configs: `python scripts/finetune.py --config=configs/finetune.py:<variant> --workdir=DIR`.

Variants (the original OpenVLA fine-tuning recipe: AdamW lr 5e-4, weight decay 0.01,
batch 16, image augmentation on, constant lr, clip 1.0, seed 7):
  lora      LoRA rank 32, alpha 16, dropout 0, every linear layer but lm_head (`train/lora.py`), applied
            unmerged inside the forward pass; the base stays frozen in `base_dtype`, or with its linear
            kernels in int8 / int4 (`--config.base_quant=int4`, `quant/frozen.py`: 4-bit weights as
            the original's `--use_quantization`); writes adapters, dataset_statistics.json and a
            merged export
  oft_lora  OpenVLA-OFT's recipe (LIBERO) on a converted openvla-7b: LoRA rank 32 on the backbone,
            the new proprio projector and L1 action head trained in full (initialized fresh: the
            checkpoint has none), chunks of K=8 actions decoded in one pass, third-person + wrist
            cameras, 8-d proprio; batch 8, lr 5e-4 decayed 10x after 100k steps (OFT's
            `num_steps_before_decay`)
  full      every parameter trained (delegates to `train/loop.py`; fp32 master weights)

Set where the model and the data come from:
  --config.init_from=<converted checkpoint>   (scripts/convert.py to-jax, or a training export)
  --config.data.data_dir=<RLDS dir> --config.data.mixture=<registered dataset or mixture>
The model shape is read from init_from's model_config.json (`model` below only supplies defaults).
"""

import ml_collections

from configs import model as model_configs
from configs import train as train_configs

VARIANTS = ("lora", "oft_lora", "full")


def lora_config() -> ml_collections.ConfigDict:
    """Fields of `openvla_jax.train.lora.LoraConfig`."""
    return ml_collections.ConfigDict(
        dict(
            rank=32,
            alpha=16.0,
            dropout=0.0,
            target=r".*/kernel",  # re.fullmatch over '/'-joined param paths
            exclude=r".*(lm_head|patch_embed)/kernel",  # not lm_head; patch embeddings are convolutions
            full="",  # re.fullmatch: parameters trained in full beside the adapters (OFT: the new heads)
        )
    )


def get_config(variant: str = "lora") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown finetune variant {variant!r}; expected one of {VARIANTS}")
    if variant == "oft_lora":
        return oft_lora_config()
    c = train_configs.get_config("openvla_7b_finetune")
    c.variant = variant
    c.model = model_configs.get_config("7b")  # replaced by init_from's model_config.json
    c.model.dtype = "bfloat16"
    c.optimizer.lr = 5e-4
    c.optimizer.weight_decay = 0.01
    c.optimizer.schedule = "constant"
    c.data.mixture = "demo_tabletop"  # your dataset: --config.data.mixture=<name>
    c.data.data_dir = "data/demo"
    c.data.batch_size = 16
    c.data.augment = True
    c.data.shuffle_buffer = 100_000
    c.data.deterministic = False
    c.train.steps = 10_000
    c.train.save_every = 1_000
    c.train.eval_every = 0
    if variant == "lora":
        add_lora(c)
    else:
        c.model.remat_policy = "full"
        c.model.scan_layers = True
    return c


def add_lora(c: ml_collections.ConfigDict) -> None:
    c.lora = lora_config()
    # recompute each decoder layer / ViT block in the backward pass: ~1/3 more forward compute for a
    # 7B step at batch 16 under 24 GB (BENCHMARKS.md, LoRA); the original keeps every activation (72 GB)
    c.model.remat_policy = "full"
    c.base_dtype = "bfloat16"  # the frozen base's dtype on device ("float32" on CPU)
    c.base_quant = "none"  # or "int8" / "int4": the base's linear kernels quantized (adapters stay fp32)
    c.base_group_size = 128  # int4: input rows per scale
    c.export_merged = True  # write workdir/export (merged, OpenVLA.load / to-hf)


def oft_lora_config() -> ml_collections.ConfigDict:
    """OpenVLA-OFT's `vla-scripts/finetune.py` LIBERO settings on our OFT model options
    (`configs/train.py:oft_7b_libero`): LoRA r=32 + the heads in full, batch 8, lr 5e-4, step decay."""
    c = train_configs.get_config("oft_7b_libero")
    c.variant = "oft_lora"
    add_lora(c)
    c.lora.full = r"(proprio_projector|action_head)/.*"
    c.optimizer.lr = 5e-4
    c.optimizer.weight_decay = 0.01  # OFT's AdamW(params, lr) keeps torch's default decay, as OpenVLA's
    c.optimizer.lr_decay_after = 100_000
    c.optimizer.lr_decay_factor = 0.1
    c.data.batch_size = 8  # OFT's LIBERO runs: 8 per GPU; this is the global batch (8 x devices for theirs)
    c.data.augment = True
    c.train.steps = 150_000  # OFT: --max_steps 150005, --save_freq 10000
    c.train.save_every = 10_000
    return c
