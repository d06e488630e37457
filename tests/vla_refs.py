"""A tiny OpenVLA in PyTorch, assembled as the original `OpenVLAForActionPrediction` is: two timm
towers (second-to-last block, no norm, prefix dropped), an fc1/GELU/fc2/GELU/fc3 projector and a
transformers `LlamaForCausalLM`; input embeddings `[emb(BOS), projected patches, emb(tokens[1:])]`.
Every tensor is random (norms, LayerScale, tokens included) so a mix-up anywhere shows."""

import json
from pathlib import Path

import numpy as np

from helpers import torch
from openvla_jax.convert.hf_config import hf_config_from_model_config
from openvla_jax.models.llama import LlamaConfig
from openvla_jax.utils.torch_compat import transformers_llama
from vision_refs import DINO, SIGLIP, TINY, second_to_last, timm_tower

NORM_STATS = {
    "bridge_orig": {
        "action": {"mean": [0.1] * 7, "std": [0.5] * 7, "max": [1.0] * 7, "min": [-1.0] * 7,
                   "q01": [-0.9] * 7, "q99": [0.9] * 6 + [1.0], "mask": [True] * 6 + [False]},
        "proprio": {k: [0.0] * 7 for k in ("mean", "std", "max", "min", "q01", "q99")},
        "num_transitions": 100, "num_trajectories": 3,
    }
}


def build_torch_vla(config=TINY, seed=0):
    """-> torch module with the HF OpenVLA submodule names (`vision_backbone.{featurizer,fused_featurizer}`,
    `projector.fc{1,2,3}`, `language_model`) and a Prismatic-style `forward(pixel_values, ids, mask)`."""
    t = torch()

    nn = t.nn
    vision_dim = DINO.embed_dim + SIGLIP.embed_dim
    llm = config.llm

    class Projector(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
            self.fc2 = nn.Linear(4 * vision_dim, llm.hidden_size)
            self.fc3 = nn.Linear(llm.hidden_size, llm.hidden_size)
            self.act = nn.GELU()

        def forward(self, x):
            return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))

    class TorchVLA(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_backbone = nn.Module()
            self.vision_backbone.featurizer = timm_tower(DINO, seed + 1)
            self.vision_backbone.fused_featurizer = timm_tower(SIGLIP, seed + 2)
            t.manual_seed(seed + 3)
            self.projector = Projector()
            self.language_model = transformers_llama(LlamaConfig.from_dict(llm))
            with t.no_grad():
                for name, p in self.projector.named_parameters():
                    p.copy_(0.1 * t.randn_like(p))
                for name, p in self.language_model.named_parameters():
                    if "norm" in name:
                        p.copy_(1.0 + 0.1 * t.randn_like(p))

        def forward(self, pixel_values, input_ids, attention_mask):
            """pixel_values NCHW `[B, 6, 224, 224]`, ids/mask `[B, T]` -> logits `[B, T + 256, V]`."""
            vb = self.vision_backbone
            img, fused = t.split(pixel_values, [3, 3], dim=1)
            feats = t.cat([second_to_last(vb.featurizer, img), second_to_last(vb.fused_featurizer, fused)], dim=2)
            patches = self.projector(feats)
            emb = self.language_model.get_input_embeddings()(input_ids)
            x = t.cat([emb[:, :1], patches, emb[:, 1:]], dim=1)
            ones = t.ones((input_ids.shape[0], patches.shape[1]), dtype=attention_mask.dtype)
            mask = t.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
            return self.language_model(inputs_embeds=x, attention_mask=mask).logits

    return TorchVLA().eval()


def hf_state_dict(model) -> dict:
    """The torch model's state dict with the HF checkpoint's names (LayerScale `gamma` -> `scale_factor`)."""
    return {k.replace(".gamma", ".scale_factor"): v.detach().contiguous() for k, v in model.state_dict().items()}


def write_hf_dir(model, path: Path, config=TINY, norm_stats=NORM_STATS) -> dict:
    """An OpenVLA HF directory: `model.safetensors` (fp32, original key names) + config.json."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    sd = hf_state_dict(model)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config_from_model_config(config, norm_stats, "float32"), indent=2))
    return {k: v.numpy() for k, v in sd.items()}


def torch_logits(model, pixel_values, ids, mask) -> np.ndarray:
    t = torch()
    with t.no_grad():
        return model(t.tensor(pixel_values), t.tensor(ids, dtype=t.long), t.tensor(mask, dtype=t.long)).numpy()


def torch_greedy(model, pixel_values, ids, lengths, num_tokens=7) -> np.ndarray:
    """Greedy ids `[B, num_tokens]`: each row alone, unpadded, full forward per step (no cache)."""
    t = torch()
    out = []
    with t.no_grad():
        for i, n in enumerate(lengths):
            row = t.tensor(ids[i : i + 1, :n], dtype=t.long)
            pv = t.tensor(pixel_values[i : i + 1])
            got = []
            for _ in range(num_tokens):
                nxt = model(pv, row, t.ones_like(row))[:, -1].argmax(-1)
                got.append(int(nxt))
                row = t.cat([row, nxt[:, None]], dim=1)
            out.append(got)
    return np.array(out, np.int32)


def inputs(b=2, t=10, seed=0, vocab=32064):
    """NCHW pixel values, BOS-first right-padded ids, mask, lengths."""
    rng = np.random.default_rng(seed)
    pv = rng.standard_normal((b, 6, 224, 224)).astype(np.float32)
    ids = rng.integers(3, vocab, size=(b, t)).astype(np.int32)
    ids[:, 0] = 1
    lengths = np.array([t, t - 3, t - 5, t - 1][:b])
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, 32000)
    return pv, ids, mask, lengths


def valid_positions(x, lengths, num_patches=256):
    """Concatenate each row's real (non-padding) positions of `[B, T + P, ...]`."""
    return np.concatenate([x[i, : n + num_patches] for i, n in enumerate(lengths)])
