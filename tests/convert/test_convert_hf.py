"""HF <-> JAX converter: config.json fields, bit-exact round trips through orbax, Prismatic names,
bad inputs named, pickles refused, interrupted saves leave nothing complete-looking, the CLI."""

import importlib.util
import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from configs import model as model_configs
from openvla_jax.checkpoints import converted as checkpoint
from openvla_jax.convert import hf
from openvla_jax.convert.hf import hf_config_from_model_config, load_hf, model_config_from_hf, save_hf
from openvla_jax.convert.io import StateDictError, open_state_dict, save_state_dict
from tests.support.helpers import torch
from tests.support.vla_refs import NORM_STATS, TINY, build_torch_vla, write_hf_dir

_spec = importlib.util.spec_from_file_location(
    "convert_cli", Path(__file__).resolve().parents[2] / "scripts" / "convert.py"
)
convert_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_cli)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """The tiny torch OpenVLA as an fp32 HF directory, with (dummy) tokenizer files."""
    path = tmp_path_factory.mktemp("hf")
    state = write_hf_dir(build_torch_vla(), path)
    (path / "tokenizer.model").write_bytes(b"\x00sentencepiece-bytes\xff")
    (path / "added_tokens.json").write_text('{"<PAD>": 32000}')
    return path, state


def read_all(path) -> dict:
    reader = open_state_dict(path)
    return {k: reader[k] for k in reader}


def assert_bitwise_equal(a: dict, b: dict):
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:5]
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes(), k


def test_config_json_has_every_original_field_and_defaults():
    cfg7 = model_configs.get_config("7b")
    j = hf_config_from_model_config(cfg7, NORM_STATS, "bfloat16")
    assert j["model_type"] == "openvla" and j["architectures"] == ["OpenVLAForActionPrediction"]
    assert j["auto_map"] == {
        "AutoConfig": "configuration_prismatic.OpenVLAConfig",
        "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
    }
    assert j["arch_specifier"] == "no-align+fused-gelu-mlp" and j["use_fused_vision_backbone"] is True
    assert j["timm_model_ids"] == ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"]
    assert j["timm_override_act_layers"] == [None, None] and j["image_sizes"] == [224, 224]
    assert j["vision_backbone_id"] == "dinosiglip-vit-so-224px" and j["llm_backbone_id"] == "llama2-7b-pure"
    assert (j["pad_token_id"], j["pad_to_multiple_of"], j["n_action_bins"], j["llm_max_length"]) == (
        32000,
        64,
        256,
        2048,
    )
    assert j["image_resize_strategy"] == "resize-naive" and j["hf_llm_id"] == "meta-llama/Llama-2-7b-hf"
    assert j["output_projector_states"] is False and j["torch_dtype"] == "bfloat16" and "transformers_version" in j
    # As in openvla-7b: text_config only says what differs from LlamaConfig's defaults; no timm_overrides.
    assert j["text_config"] == {
        "model_type": "llama",
        "pad_token_id": 32000,
        "torch_dtype": "bfloat16",
        "vocab_size": 32064,
    }
    assert "timm_overrides" not in j and j["norm_stats"] == NORM_STATS
    back = model_config_from_hf(j)
    assert back.llm.to_dict() == cfg7.llm.to_dict()
    assert back.vision.to_dict() == cfg7.vision.to_dict() and back.projector.arch == "fused-gelu-mlp"
    # Absent text_config fields -> LlamaConfig defaults (kv heads follow heads; eps 1e-6).
    minimal = model_config_from_hf({"timm_model_ids": j["timm_model_ids"], "text_config": {"num_attention_heads": 8}})
    assert (minimal.llm.hidden_size, minimal.llm.num_hidden_layers, minimal.llm.num_key_value_heads) == (4096, 32, 8)
    assert (minimal.llm.rms_norm_eps, minimal.llm.rope_theta, minimal.llm.vocab_size) == (1e-6, 10000.0, 32000)
    # timm_overrides round trip for tiny checkpoints; single backbone + gelu-mlp.
    tiny = model_config_from_hf(hf_config_from_model_config(TINY))
    assert tiny.vision.to_dict() == TINY.vision.to_dict() and tiny.llm.to_dict() == TINY.llm.to_dict()
    single = model_config_from_hf(
        {
            "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m"],
            "use_fused_vision_backbone": False,
            "arch_specifier": "gelu-mlp",
        }
    )
    assert single.vision.fused_featurizer is None and single.projector.arch == "gelu-mlp"
    with pytest.raises(ValueError, match="needs 2 timm_model_ids"):
        model_config_from_hf({"timm_model_ids": ["a"], "use_fused_vision_backbone": True})
    with pytest.raises(ValueError, match="linear"):
        model_config_from_hf({**j, "arch_specifier": "no-align+linear"})


@pytest.mark.parametrize("scanned", [False, True], ids=["unscanned", "scanned"])
def test_round_trip_fp32_hf_jax_hf_is_bitwise(hf_dir, tmp_path, scanned):
    """HF (single fp32 file) -> orbax -> HF (fp32 shards): every tensor identical, unused ones too."""
    src, state = hf_dir
    argv = ["to-jax", str(src), str(tmp_path / "jax")] + (["--scanned"] if scanned else [])
    assert convert_cli.main(argv) == 0
    assert (tmp_path / "jax" / checkpoint.MARKER).exists()
    assert (
        convert_cli.main(
            ["to-hf", str(tmp_path / "jax"), str(tmp_path / "hf"), "--dtype", "float32", "--max-shard-size", "300KB"]
        )
        == 0
    )
    out = tmp_path / "hf"
    back = read_all(out)
    assert_bitwise_equal(back, {k: np.asarray(v) for k, v in state.items()})
    for unused in (
        "vision_backbone.featurizer.blocks.2.ls2.scale_factor",
        "vision_backbone.featurizer.norm.weight",
        "vision_backbone.fused_featurizer.attn_pool.latent",
        "vision_backbone.fused_featurizer.blocks.2.mlp.fc2.bias",
    ):
        assert unused in back
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in back.values())
    assert len(set(index["weight_map"].values())) > 1
    config = json.loads((out / "config.json").read_text())
    assert config["norm_stats"] == NORM_STATS and config["torch_dtype"] == "float32"
    assert config["timm_overrides"] == {
        TINY.vision.featurizer.model_id: {"embed_dim": 64, "depth": 3, "num_heads": 4},
        TINY.vision.fused_featurizer.model_id: {"embed_dim": 48, "depth": 3, "num_heads": 4},
    }
    assert json.loads((out / "generation_config.json").read_text())["pad_token_id"] == 32000
    assert (out / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    assert (out / "added_tokens.json").exists() and not (out / "tokenizer.json").exists()
    assert json.loads((tmp_path / "jax" / "dataset_statistics.json").read_text()) == NORM_STATS


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_scanned_checkpoint_quantizes_like_the_unscanned_one(hf_dir, tmp_path, mode):
    """Quantization takes a kernel's input axes from `models.kernels`, as LoRA and conversion do: a
    `--scanned` checkpoint (stacked `layers` and ViT `blocks`) gets the same scales and the same
    greedy actions as the unscanned one, not scales taken along the layer axis."""
    from openvla_jax import OpenVLA, quant

    src, _ = hf_dir
    loaded = {}
    for scanned in (False, True):
        out = tmp_path / f"jax_{scanned}"
        assert convert_cli.main(["to-jax", str(src), str(out)] + (["--scanned"] if scanned else [])) == 0
        loaded[scanned] = OpenVLA.load(out, dtype="float32", quantize=mode, group_size=32)
    flat, stacked = loaded[False].params, loaded[True].params
    q0 = flat["vision_backbone"]["featurizer"]["blocks_1"]["attn"]["qkv"]["kernel"]
    qs = stacked["vision_backbone"]["featurizer"]["blocks"]["attn"]["qkv"]["kernel"]
    assert isinstance(qs, quant.QTensor) and qs.lead == 1 and qs.scale.shape[1:] == q0.scale.shape
    np.testing.assert_array_equal(np.asarray(qs.scale)[1], np.asarray(q0.scale))
    rng = np.random.default_rng(0)
    pv = rng.normal(size=(6, TINY.vision.image_size, TINY.vision.image_size, 6)).astype(np.float32)
    ids = rng.integers(2, 31000, size=(6, 9)).astype(np.int32)
    ids[:, 0] = 1
    np.testing.assert_array_equal(loaded[True].action_token_ids(pv, ids), loaded[False].action_token_ids(pv, ids))


def test_round_trip_bf16_shards_is_bitwise(hf_dir, tmp_path):
    src, _ = hf_dir
    cfg, params, _ = load_hf(src)
    save_hf(tmp_path / "bf16", cfg, params, dtype="bfloat16", max_shard_size="200KB")
    original = read_all(tmp_path / "bf16")
    assert {v.dtype for v in original.values()} == {np.dtype(ml_dtypes.bfloat16)}
    # Small chunks: the params reach orbax in many partial saves, merged at finalize.
    checkpoint.convert_to_jax(tmp_path / "bf16", tmp_path / "jax", chunk_bytes=150_000)
    _, restored, _ = checkpoint.load_converted(tmp_path / "jax")
    assert all(x.dtype == ml_dtypes.bfloat16 for x in _leaves(restored))  # stored as bf16, not upcast
    checkpoint.convert_to_hf(tmp_path / "jax", tmp_path / "back", dtype="bfloat16", max_shard_size="200KB")
    assert_bitwise_equal(read_all(tmp_path / "back"), original)


def _leaves(tree):
    return [v for sub in tree.values() for v in (_leaves(sub) if isinstance(sub, dict) else [sub])]


def test_prismatic_prefixes_load_like_hf_names(hf_dir, tmp_path):
    src, state = hf_dir
    renames = {
        "vision_backbone.featurizer.": "dino_featurizer.",
        "vision_backbone.fused_featurizer.": "siglip_featurizer.",
        "projector.fc1.": "projector.0.",
        "projector.fc2.": "projector.2.",
        "projector.fc3.": "projector.4.",
        "language_model.": "llm.",
    }
    prismatic = {}
    for k, v in state.items():
        for new, old in renames.items():
            if k.startswith(new):
                k = old + k[len(new) :]
                break
        prismatic[k.replace(".scale_factor", ".gamma")] = v
    assert "llm.model.norm.weight" in prismatic and "dino_featurizer.blocks.0.ls1.gamma" in prismatic
    (tmp_path / "p").mkdir()
    save_state_dict(tmp_path / "p" / "model.safetensors", prismatic)
    (tmp_path / "p" / "config.json").write_text((src / "config.json").read_text())
    _, got, _ = load_hf(tmp_path / "p")
    _, want, _ = load_hf(src)
    a, b = _leaves(got), _leaves(want)
    assert len(a) == len(b) and all(x.tobytes() == y.tobytes() for x, y in zip(a, b))


def test_missing_extra_and_misshapen_keys_are_listed(hf_dir, tmp_path):
    src, state = hf_dir
    bad = dict(state)
    del bad["language_model.model.layers.1.mlp.up_proj.weight"]
    bad["language_model.model.layers.9.mlp.up_proj.weight"] = np.zeros((2, 2), np.float32)
    bad["projector.fc2.weight"] = bad["projector.fc2.weight"].T.copy()
    (tmp_path / "bad").mkdir()
    save_state_dict(tmp_path / "bad" / "model.safetensors", bad)
    (tmp_path / "bad" / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(StateDictError) as e:
        load_hf(tmp_path / "bad")
    assert e.value.missing == ["language_model.model.layers.1.mlp.up_proj.weight"]
    assert e.value.unexpected == ["language_model.model.layers.9.mlp.up_proj.weight"]
    assert [m[0] for m in e.value.misshapen] == ["projector.fc2.weight"]
    assert "projector.fc2.weight (expected (64, 448), got (448, 64))" in str(e.value)


def test_reader_matches_safetensors_and_names_a_truncated_file(hf_dir, tmp_path):
    """Our plain-read reader returns what safetensors' own loader returns; a cut file is named."""
    from safetensors.numpy import load_file

    src, _ = hf_dir
    ours, theirs = read_all(src), load_file(str(src / "model.safetensors"))
    assert_bitwise_equal(ours, theirs)
    cut = tmp_path / "model.safetensors"
    data = (src / "model.safetensors").read_bytes()
    cut.write_bytes(data[: len(data) - 1000])
    whole = open_state_dict(src / "model.safetensors")
    last = max(whole, key=lambda k: whole._where[k][2])
    with pytest.raises(ValueError, match=f"{cut}: tensor '{last}' has data_offsets .* within the file"):
        open_state_dict(cut)  # found from the header, before any tensor is read


def test_pickled_checkpoint_is_refused(hf_dir, tmp_path, capsys):
    src, _ = hf_dir
    t = torch()
    d = tmp_path / "pickled"
    d.mkdir()
    t.save({"x": t.zeros(2)}, d / "pytorch_model.bin")
    (d / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(ValueError, match="never loads pickled checkpoints.*safe_serialization=True"):
        load_hf(d)
    assert convert_cli.main(["to-jax", str(d), str(tmp_path / "out")]) == 2
    assert "never loads pickled" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert convert_cli.main(["to-jax", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_interrupted_saves_leave_no_complete_looking_output(hf_dir, tmp_path, monkeypatch):
    src, _ = hf_dir
    cfg, params, extras = load_hf(src)
    real_write = hf.write_safetensors
    calls = []

    def crash_on_second_shard(path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_write(path, *a, **kw)

    monkeypatch.setattr(hf, "write_safetensors", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        save_hf(tmp_path / "hf_out", cfg, params, max_shard_size="200KB")
    assert not (tmp_path / "hf_out").exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    from orbax.checkpoint.experimental.v1 import partial

    real_save, chunks = partial.save, []

    def crash_on_second_chunk(*a, **kw):  # the first chunk is on disk when the "disk fills up"
        chunks.append(1)
        if len(chunks) == 2:
            raise OSError("disk full")
        return real_save(*a, **kw)

    monkeypatch.setattr(partial, "save", crash_on_second_chunk)
    with pytest.raises(OSError):
        checkpoint.save_converted(tmp_path / "jax_out", cfg, params, extras["norm_stats"], chunk_bytes=100_000)
    assert len(chunks) == 2 and list(tmp_path.iterdir()) == []
    # A directory without the commit marker is not taken for a converted checkpoint.
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        checkpoint.load_converted(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="missing_dir does not exist; expected a converted checkpoint"):
        checkpoint.load_converted(tmp_path / "missing_dir")
    # And an existing non-empty output is never overwritten.
    with pytest.raises(FileExistsError, match="not empty"):
        save_hf(tmp_path / "half", cfg, params)


def test_max_shard_size_parsing():
    assert hf.parse_size("5GB") == 5 * 10**9 and hf.parse_size("2GiB") == 2 * 2**30
    assert hf.parse_size("500MB") == 5 * 10**8 and hf.parse_size(123) == 123
    with pytest.raises(ValueError, match="5GB"):
        hf.parse_size("five gigs")
