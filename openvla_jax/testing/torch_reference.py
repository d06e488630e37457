"""The PyTorch reference OpenVLA, for tests and benchmarks only (the library never imports torch).

Assembled as the original `OpenVLAForActionPrediction` is: two timm towers (second-to-last block,
no final norm, prefix tokens dropped), the fc1/GELU/fc2/GELU/fc3 projector and a transformers
`LlamaForCausalLM`, input embeddings `[emb(BOS), projected patches, emb(tokens[1:])]`. Submodule
names are the HF checkpoint's (`vision_backbone.{featurizer,fused_featurizer}`, `projector.fc1..3`,
`language_model`), so `state_dict()` is an HF OpenVLA state dict after `gamma -> scale_factor`.
Any `configs/model.py` variant builds (timm ids with the config's width/depth/heads overrides).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from openvla_jax.models.config import as_config, as_tower
from openvla_jax.testing.torch_compat import import_torch, transformers_llama

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer


def timm_tower(tower, seed: int, img_size: int = 224, randomize: bool = True, **kw) -> VisionTransformer:
    """timm model `tower.model_id` at the tower's size (None fields keep timm's). `randomize`: every
    tensor random (LayerScale gammas, norms, pos/cls/reg tokens, attention pool), so a mix-up shows."""
    t = import_torch()
    import timm

    t.manual_seed(seed)
    tower = as_tower(tower)
    sizes = {k: getattr(tower, k) for k in ("embed_dim", "depth", "num_heads") if getattr(tower, k) is not None}
    model = timm.create_model(tower.model_id, pretrained=False, num_classes=0, img_size=img_size, **sizes, **kw)
    model = cast("VisionTransformer", model.eval())  # every tower in models/vit.py ARCHITECTURES
    if randomize:
        with t.no_grad():
            for name, p in model.named_parameters():
                scale = 1.0 if name in ("cls_token", "reg_token", "pos_embed") or "latent" in name else 0.1
                base = 1.0 if ("norm" in name and name.endswith("weight")) or name.endswith("gamma") else 0.0
                p.copy_(base + scale * t.randn_like(p))
    return model


def second_to_last(model, x_nchw):
    """Prismatic's featurizer forward: `get_intermediate_layers(n={len(blocks) - 2})`, unpacked."""
    return model.get_intermediate_layers(x_nchw, n={len(model.blocks) - 2})[0]


def build_torch_vla(model_config, seed: int = 0, attn_implementation: str = "eager", randomize: bool = True):
    """-> torch module (eval mode) with `forward(pixel_values NCHW [B,6,H,W], ids, mask) -> logits
    [B, T + P, V]` and `greedy_ids(pixel_values [1,...], ids [1, T], num_tokens)` (KV-cached, batch 1,
    as the original's `generate`)."""
    t = import_torch()
    model_config = as_config(model_config)
    nn = t.nn
    dino = timm_tower(model_config.vision.featurizer, seed + 1, randomize=randomize)
    siglip = timm_tower(model_config.vision.fused_featurizer, seed + 2, randomize=randomize)
    vision_dim = dino.embed_dim + siglip.embed_dim
    hidden = model_config.llm.hidden_size

    class Projector(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
            self.fc2 = nn.Linear(4 * vision_dim, hidden)
            self.fc3 = nn.Linear(hidden, hidden)
            self.act = nn.GELU()

        def forward(self, x):
            return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))

    class TorchVLA(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_backbone = nn.Module()
            self.vision_backbone.featurizer = dino
            self.vision_backbone.fused_featurizer = siglip
            t.manual_seed(seed + 3)
            self.projector = Projector()
            self.language_model = transformers_llama(model_config.llm, attn_implementation)
            if randomize:
                with t.no_grad():
                    for name, p in self.projector.named_parameters():
                        p.copy_(0.1 * t.randn_like(p))
                    for name, p in self.language_model.named_parameters():
                        if "norm" in name:
                            p.copy_(1.0 + 0.1 * t.randn_like(p))

        def embed(self, pixel_values, input_ids):
            vb = self.vision_backbone
            img, fused = t.split(pixel_values, [3, 3], dim=1)
            feats = t.cat([second_to_last(vb.featurizer, img), second_to_last(vb.fused_featurizer, fused)], dim=2)
            patches = self.projector(feats)
            emb = self.language_model.get_input_embeddings()(input_ids)
            return t.cat([emb[:, :1], patches.to(emb.dtype), emb[:, 1:]], dim=1), patches.shape[1]

        def forward(self, pixel_values, input_ids, attention_mask):
            x, p = self.embed(pixel_values, input_ids)
            ones = t.ones((input_ids.shape[0], p), dtype=attention_mask.dtype)
            mask = t.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
            return self.language_model(inputs_embeds=x, attention_mask=mask).logits

        def greedy_ids(self, pixel_values, input_ids, num_tokens: int = 7):
            """Greedy token ids `[1, num_tokens]` with a KV cache: one prefill, then one token a step."""
            x, _ = self.embed(pixel_values, input_ids)
            out = self.language_model(inputs_embeds=x, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = [nxt]
            for _ in range(num_tokens - 1):
                out = self.language_model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                ids.append(nxt)
            return t.cat(ids, dim=1)

    return TorchVLA().eval()


def hf_state_dict(model) -> dict:
    """The torch model's state dict with the HF checkpoint's names (LayerScale `gamma` -> `scale_factor`)."""
    return {k.replace(".gamma", ".scale_factor"): v.detach().contiguous() for k, v in model.state_dict().items()}
