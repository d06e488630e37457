"""The checkpoint formats, one module each (written whole or not at all, through `utils/files.py`):

- `converted`: a model converted from (or exportable to) the HF OpenVLA checkpoint: orbax params +
  `model_config.json`, statistics, tokenizer (`scripts/convert.py to-jax`, training exports).
- `quantized`: int8 / int4 weights in safetensors + `quant_config.json` (`save_quantized`).
- `training`: a training run's steps (params, optimizer state, data position, manifest with
  checksums), resumable (`Checkpointer`).
"""
