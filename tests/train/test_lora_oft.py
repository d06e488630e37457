"""OpenVLA-OFT from an OpenVLA checkpoint: `init_from` loads every parameter the checkpoint has and
initializes only the parts the config adds (proprio projector, action head), naming them in the log;
a shape mismatch, an unexpected key or any other missing key is still refused. LoRA on the backbone
with the new heads trained in full runs through the loop, exports, and the export predicts chunks.
And OFT's step learning-rate decay."""

import logging

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from openvla_jax.models import vla
from openvla_jax.train import lora as LO
from openvla_jax.train import optimizer as O
from openvla_jax.train.trainable import init_params
from tests.support import helpers
from tests.train.test_lora import CFG

HEADS = r"(proprio_projector|action_head)/.*"


def oft_model_config():
    cfg = CFG.copy_and_resolve_references()
    cfg.action_chunk, cfg.decoding, cfg.action_head, cfg.proprio_dim = 4, "parallel", "l1", 4
    return cfg


def test_init_params_adds_only_the_new_parts_and_names_them(caplog):
    openvla = helpers.random_params(vla.from_config(CFG, dtype=jnp.float32), 0)
    oft = vla.from_config(oft_model_config(), dtype=jnp.float32)
    with caplog.at_level(logging.WARNING):
        params, added = init_params(openvla, oft, "the params in ckpt", seed=7)
    assert added and all(p.startswith(("proprio_projector/", "action_head/")) for p in added)
    assert "action_head/fc_in/kernel" in added and "proprio_projector/fc1/kernel" in added
    assert "action_head/fc_in/kernel" in caplog.text and "proprio_projector/fc2/bias" in caplog.text
    flat, base = LO.flat_params(params), LO.flat_params(openvla)
    for p, x in base.items():  # every parameter the checkpoint has, as it has it
        assert flat[p] is x
    assert np.abs(flat["action_head/fc_in/kernel"]).max() > 0  # a real init, not zeros
    again, _ = init_params(openvla, oft, "the params in ckpt", seed=7)
    np.testing.assert_array_equal(LO.flat_params(again)["action_head/fc_in/kernel"], flat["action_head/fc_in/kernel"])

    # what is still refused: a wrong shape, a key the model lacks, a missing key of the backbone
    bad = LO.flat_params(openvla)
    bad["projector/fc1/kernel"] = bad["projector/fc1/kernel"][:, :3]
    with pytest.raises(ValueError, match=r"projector/fc1/kernel: want shape \(\d+, \d+\), got"):
        init_params(LO.nest_params(bad), oft, "ckpt", 0)
    bad = dict(LO.flat_params(openvla), **{"extra/kernel": np.zeros((2, 2))})
    with pytest.raises(ValueError, match=r"unexpected extra/kernel"):
        init_params(LO.nest_params(bad), oft, "ckpt", 0)
    bad = {p: x for p, x in LO.flat_params(openvla).items() if p != "language_model/norm/scale"}
    with pytest.raises(ValueError, match=r"language_model/norm/scale: want shape \(64,\), missing"):
        init_params(LO.nest_params(bad), oft, "ckpt", 0)


def test_step_decay_divides_the_lr_by_ten_after_n_updates():
    cfg = ml_collections.ConfigDict(dict(O.default_optimizer_config().to_dict(), lr=5e-4, lr_decay_after=3))
    schedule = O.make_schedule(cfg)
    np.testing.assert_allclose([float(schedule(s)) for s in range(5)], [5e-4] * 3 + [5e-5] * 2, rtol=1e-6)
    warm = dict(cfg.to_dict(), schedule="warmup_cosine", warmup_steps=2, total_steps=10)
    schedule = O.make_schedule(ml_collections.ConfigDict(warm))
    plain = O.make_schedule(ml_collections.ConfigDict(dict(warm, lr_decay_after=0)))
    np.testing.assert_allclose(float(schedule(5)), 0.1 * float(plain(5)), rtol=1e-6)
    assert float(O.make_schedule(O.default_optimizer_config())(10**6)) == 2e-5  # default: no decay
    with pytest.raises(ValueError, match="lr_decay_after"):
        O.make_schedule(ml_collections.ConfigDict(dict(cfg.to_dict(), lr_decay_after=-1)))


def test_oft_lora_config_is_the_ofts_recipe():
    from configs import finetune

    c = finetune.get_config("oft_lora")
    assert LO.LoraConfig.from_dict(c.lora.to_dict()).full == HEADS
    assert (c.model.action_chunk, c.model.num_images, c.model.proprio_dim, c.model.action_head) == (8, 2, 8, "l1")
    assert (c.optimizer.lr, c.optimizer.lr_decay_after, c.optimizer.lr_decay_factor) == (5e-4, 100_000, 0.1)
    assert c.lora.rank == 32 and c.base_quant == "none"


@pytest.mark.slow  # the loop in-process for 3 steps + an export: ~1-2 min on 2 shared cores
@pytest.mark.parametrize("quant", ["none", "int4"])
def test_oft_lora_from_an_openvla_checkpoint_trains_and_predicts_chunks(tmp_path, caplog, quant):
    """`configs/finetune.py:oft_lora`'s shape on the small demo model: init_from an OpenVLA-style
    checkpoint without heads; the run starts (heads initialized, logged), trains the adapters and the
    heads, and the export (base + merged adapters + heads) predicts chunks of actions from proprio."""
    from configs.finetune import lora_config
    from openvla_jax import OpenVLA
    from openvla_jax.train.loop import train
    from tests.support.train_runner import demo_data_and_random_base, small_config, train_configs_oft

    data_dir, base = demo_data_and_random_base(tmp_path, seed=3)
    config = small_config(data_dir, 3)
    oft = train_configs_oft()
    for k in ("action_chunk", "decoding", "action_head", "proprio_dim"):
        config.model[k] = oft.model[k]
    config.data.future_action_window_size = oft.data.future_action_window_size
    config.train.offline_eval_every = 0
    config.train.save_every = 3
    config.lora = lora_config()
    config.lora.rank = 4
    config.lora.full = HEADS
    config.base_dtype = "float32"
    config.base_quant = quant
    config.base_group_size = 32
    config.optimizer.lr_decay_after = 2
    config.init_from = str(base)
    with caplog.at_level(logging.WARNING):
        summary = train(config, tmp_path / "run")
    assert "lacks" in caplog.text and "action_head/fc_in/kernel" in caplog.text
    assert summary["step"] == 3 and np.isfinite(summary["train/l1"])
    adapters, cfg = LO.load_adapters(tmp_path / "run" / "adapters")
    assert cfg.full == HEADS and "W" in adapters["action_head/fc_in/kernel"]
    vla_ = OpenVLA.load(tmp_path / "run" / "export", dtype="float32")
    k = oft.model.action_chunk
    assert (vla_.action_chunk, vla_.proprio_dim, vla_.continuous) == (k, 4, True)
    actions = vla_.predict_action(
        np.zeros((1, 128, 128, 3), np.uint8), ["pick up the red block"], "demo_tabletop", proprio=np.zeros((1, 4))
    )
    assert actions.shape == (1, k, 7) and np.all(np.isfinite(actions))
