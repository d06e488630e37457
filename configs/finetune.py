"""Fine-tuning configs: `python scripts/finetune.py --config=configs/finetune.py:<variant> --workdir=DIR`.

Variants (the original OpenVLA fine-tuning recipe: AdamW lr 5e-4, weight decay 0.01,
batch 16, image augmentation on, constant lr, clip 1.0, seed 7):
  lora   LoRA rank 32, alpha 16, dropout 0, every linear layer but lm_head (`train/lora.py`); the base
         stays frozen in `base_dtype`; writes adapters, dataset_statistics.json and a merged export
  full   every parameter trained (delegates to `train/loop.py`; fp32 master weights)

Set where the model and the data come from:
  --config.init_from=<converted checkpoint>   (scripts/convert.py to-jax, or a training export)
  --config.data.data_dir=<RLDS dir> --config.data.mixture=<registered dataset or mixture>
The model shape is read from init_from's model_config.json (`model` below only supplies defaults).
"""

import ml_collections

from configs import model as model_configs
from configs import train as train_configs

VARIANTS = ("lora", "full")


def lora_config() -> ml_collections.ConfigDict:
    """Fields of `openvla_jax.train.lora.LoraConfig`."""
    return ml_collections.ConfigDict(
        dict(
            rank=32,
            alpha=16.0,
            dropout=0.0,
            target=r".*/kernel",  # re.fullmatch over '/'-joined param paths
            exclude=r".*(lm_head|patch_embed)/kernel",  # not lm_head; patch embeddings are convolutions
        )
    )


def get_config(variant: str = "lora") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown finetune variant {variant!r}; expected one of {VARIANTS}")
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
        c.lora = lora_config()
        c.base_dtype = "bfloat16"  # the frozen base's dtype on device ("float32" on CPU)
        c.export_merged = True  # write workdir/export (merged, OpenVLA.load / to-hf)
    else:
        c.model.remat_policy = "full"
        c.model.scan_layers = True
    return c
