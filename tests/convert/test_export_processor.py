"""`to-hf` exports what the original's `AutoProcessor` reads: the processor configs (values from the
model config, checked against the released openvla-7b's and timm's data configs), the tokenizer,
and the other files of the HF directory the model was converted from (remote code, README), which
never replace a file the exporter writes. The original's `processing_prismatic.py` cannot be
fetched here: `remote_processing.py` is our own stand-in under its class names."""

import importlib.util
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import model as model_configs
from openvla_jax.checkpoints import converted
from openvla_jax.convert import processor
from openvla_jax.models import vit
from openvla_jax.models.config import DINOV2_ID, SIGLIP_ID, TowerConfig, VisionConfig, as_config
from openvla_jax.models.preprocess import preprocess_image
from openvla_jax.tokenizer.small_spm import write_sentencepiece
from openvla_jax.tokenizer.text import TextTokenizer
from tests.support.helpers import timm, torch
from tests.support.vla_refs import NORM_STATS, TINY, build_torch_vla, write_hf_dir

_spec = importlib.util.spec_from_file_location(
    "convert_cli", Path(__file__).resolve().parents[2] / "scripts" / "convert.py"
)
convert_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_cli)

PROMPT = "In: What action should the robot take to pick up the red block?\nOut:"
# The released openvla-7b's preprocessor_config.json, as its remote code reads it (tvf_normalize_params
# hold the float32 values of the means and stds).
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
OPENVLA_7B_PREPROCESSOR = {
    "auto_map": {
        "AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
        "AutoProcessor": "processing_prismatic.PrismaticProcessor",
    },
    "image_processor_type": "PrismaticImageProcessor",
    "processor_class": "PrismaticProcessor",
    "image_resize_strategy": "resize-naive",
    "use_fused_vision_backbone": True,
    "input_sizes": [[3, 224, 224], [3, 224, 224]],
    "interpolations": ["bicubic", "bicubic"],
    "means": [IMAGENET_MEAN, [0.5, 0.5, 0.5]],
    "stds": [IMAGENET_STD, [0.5, 0.5, 0.5]],
    "tvf_resize_params": [{"antialias": True, "interpolation": 3, "max_size": None, "size": [224, 224]}] * 2,
    "tvf_crop_params": [{"output_size": [224, 224]}] * 2,
    "tvf_normalize_params": [
        {"inplace": False, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        {"inplace": False, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    ],
    "tvf_do_letterbox": False,
    "tvf_letterbox_fill": None,
}


def assert_preprocessor_equal(got: dict, want: dict):
    """Equal, with the float32-rounded normalisation values compared in float32."""
    got, want = json.loads(json.dumps(got)), json.loads(json.dumps(want))
    for g, w in zip(got.pop("tvf_normalize_params"), want.pop("tvf_normalize_params")):
        assert g["inplace"] is w["inplace"] is False
        for k in ("mean", "std"):
            np.testing.assert_array_equal(np.float32(g[k]), np.float32(w[k]))
            assert g[k] == [float(np.float32(x)) for x in w[k]]
    assert got == want


def single(model_id: str, image_size: int):
    return as_config(model_configs.get_config("7b")).replace(
        vision=VisionConfig(image_size=image_size, featurizer=TowerConfig(model_id), fused_featurizer=None),
        projector={"arch": "gelu-mlp"},
    )


def test_processor_configs_fused_and_single_backbone():
    assert_preprocessor_equal(processor.image_processor_config(model_configs.get_config("7b")), OPENVLA_7B_PREPROCESSOR)
    assert processor.processor_config() == {
        "auto_map": {"AutoProcessor": "processing_prismatic.PrismaticProcessor"},
        "processor_class": "PrismaticProcessor",
    }
    # One tower: one entry per list, at the config's image size, with that tower's statistics.
    for model_id, mean, std in ((DINOV2_ID, IMAGENET_MEAN, IMAGENET_STD), (SIGLIP_ID, [0.5] * 3, [0.5] * 3)):
        want = dict(
            OPENVLA_7B_PREPROCESSOR,
            use_fused_vision_backbone=False,
            input_sizes=[[3, 112, 112]],
            interpolations=["bicubic"],
            means=[mean],
            stds=[std],
            tvf_resize_params=[{"antialias": True, "interpolation": 3, "max_size": None, "size": [112, 112]}],
            tvf_crop_params=[{"output_size": [112, 112]}],
            tvf_normalize_params=[{"inplace": False, "mean": mean, "std": std}],
        )
        assert_preprocessor_equal(processor.image_processor_config(single(model_id, 112)), want)
    # The tiny test model: the fused towers' statistics, at its image size.
    tiny, s = processor.image_processor_config(TINY), TINY.vision.image_size
    assert tiny["use_fused_vision_backbone"] and tiny["input_sizes"] == [[3, s, s]] * 2
    # The other strategies the original knows: Resize(S) keeps the aspect ratio; letterbox pads with
    # the last tower's mean.
    crop = processor.image_processor_config(TINY, "resize-crop")
    assert [p["size"] for p in crop["tvf_resize_params"]] == [s, s] and crop["tvf_do_letterbox"] is False
    box = processor.image_processor_config(TINY, "letterbox")
    assert box["tvf_do_letterbox"] is True and box["tvf_letterbox_fill"] == [127, 127, 127]
    with pytest.raises(ValueError, match="image_resize_strategy 'squash'"):
        processor.image_processor_config(TINY, "squash")
    with pytest.raises(ValueError, match="no image preprocessing known for tower 'vit_base_patch16_clip_224.openai'"):
        processor.tower_data("vit_base_patch16_clip_224.openai")


def test_tower_statistics_are_timms():
    """Every tower `models/vit.py` knows: what timm's pretrained data config says (the original's
    converter read the processor's values from it)."""
    t = timm()
    for arch in vit.ARCHITECTURES:
        cfg = t.models.get_pretrained_cfg(arch)
        got = processor.tower_data(arch)
        assert (got["interpolation"], tuple(got["mean"]), tuple(got["std"])) == (cfg.interpolation, cfg.mean, cfg.std)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny fp32 OpenVLA HF directory as a hub snapshot holds it: weights, config, tokenizer, the
    remote code, a README; plus files an export must not take from it."""
    path = tmp_path_factory.mktemp("openvla-tiny")
    write_hf_dir(build_torch_vla(), path)
    write_sentencepiece(path, ["pick up the red block", "open the drawer"], vocab_size=300)
    pad = TextTokenizer(str(path)).pad_id
    (path / "added_tokens.json").write_text(json.dumps({"<PAD>": pad}))
    tokenizer_config = dict(tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False)
    tokenizer_config.update(pad_token="<PAD>", model_max_length=2048, padding_side="right")
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    shutil.copyfile(Path(__file__).with_name("remote_processing.py"), path / "processing_prismatic.py")
    # AutoProcessor reads config.json too (its auto_map names this module's OpenVLAConfig).
    (path / "configuration_prismatic.py").write_text(
        "from transformers import PretrainedConfig\n\n\nclass OpenVLAConfig(PretrainedConfig):\n"
        '    model_type = "openvla"\n'
    )
    (path / "README.md").write_text("# OpenVLA tiny\n")
    # Stale copies of what the export writes itself, and what it never carries.
    (path / "preprocessor_config.json").write_text(json.dumps({"input_sizes": [[3, 999, 999]]}))
    (path / "generation_config.json").write_text('{"stale": true}')
    (path / "dataset_statistics.json").write_text('{"stale": {}}')
    (path / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (path / "extras").mkdir()
    (path / "extras" / "notes.txt").write_text("not carried: only top-level files are")
    return path


@pytest.fixture(scope="module")
def converted_dir(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("jax") / "ckpt"
    assert convert_cli.main(["to-jax", str(source), str(out)]) == 0
    return out


def test_to_jax_records_the_source(source, converted_dir):
    assert json.loads((converted_dir / "source.json").read_text()) == {"hf_dir": str(source.absolute())}
    assert converted.load_converted(converted_dir)[2]["source_hf_dir"] == str(source.absolute())


@pytest.fixture
def auto_processor(tmp_path, monkeypatch):
    """`AutoProcessor.from_pretrained(dir, trust_remote_code=True)`, its remote-code cache in tmp_path."""
    torch()
    import transformers
    from transformers import dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield lambda d: transformers.AutoProcessor.from_pretrained(str(d), trust_remote_code=True)
    for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
        del sys.modules[name]


def test_export_opens_with_auto_processor(source, converted_dir, tmp_path, auto_processor):
    from PIL import Image

    out = tmp_path / "hf"
    assert convert_cli.main(["to-hf", str(converted_dir), str(out), "--dtype", "float32"]) == 0
    # Carried from the source: the remote code and README, byte for byte.
    for name in ("processing_prismatic.py", "configuration_prismatic.py", "README.md"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    # Written by the exporter (never the source's stale copies); weights only as the export's shards.
    assert json.loads((out / "preprocessor_config.json").read_text()) == processor.image_processor_config(TINY)
    assert json.loads((out / "generation_config.json").read_text())["pad_token_id"] == 32000
    assert json.loads((out / "dataset_statistics.json").read_text()) == NORM_STATS
    assert not (out / "model.safetensors").exists() and (out / "model.safetensors.index.json").exists()
    assert not (out / ".gitattributes").exists() and not (out / "extras").exists()
    assert (out / "tokenizer.model").read_bytes() == (source / "tokenizer.model").read_bytes()

    proc = auto_processor(out)
    assert type(proc).__name__ == "PrismaticProcessor"
    assert type(proc.image_processor).__name__ == "PrismaticImageProcessor"
    rng = np.random.default_rng(0)
    ours = TextTokenizer(str(converted_dir))
    # An upscale and a downscale of landscape frames. (Pillow 13 resizes frames whose height shrinks
    # much more than their width vertically first, python-pillow/Pillow#9549; `preprocess_image`
    # keeps the earlier horizontal-first order, so tall frames differ there by a few levels.)
    for shape in ((90, 130, 3), (300, 400, 3)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        got = proc(PROMPT, Image.fromarray(image), return_tensors="np")
        pixels = got["pixel_values"]
        assert pixels.shape == (1, 6, TINY.vision.image_size, TINY.vision.image_size) and pixels.dtype == np.float32
        want = preprocess_image(image, TINY.vision.image_size).transpose(2, 0, 1)
        np.testing.assert_allclose(pixels[0], want, rtol=0, atol=1e-5)
        assert got["input_ids"][0].tolist() == ours.encode(PROMPT)
    assert proc.tokenizer.pad_token_id == ours.pad_id


def test_source_dir_flag_and_a_moved_source(source, converted_dir, tmp_path, caplog, capsys):
    # The recorded source is gone: the export still has its own files, with a warning naming it.
    moved = tmp_path / "moved"
    shutil.copytree(converted_dir, moved)
    (moved / "source.json").write_text(json.dumps({"hf_dir": str(tmp_path / "gone")}))
    with caplog.at_level(logging.WARNING):
        converted.convert_to_hf(moved, tmp_path / "a", dtype="float32")
    assert "gone" in caplog.text and "no longer exists" in caplog.text
    assert (tmp_path / "a" / "preprocessor_config.json").exists() and not (tmp_path / "a" / "README.md").exists()
    # --source-hf-dir names another directory to carry from.
    other = tmp_path / "other"
    other.mkdir()
    (other / "processing_prismatic.py").write_text("# other remote code\n")
    (other / "config.json").write_text("{}")
    assert convert_cli.main(["to-hf", str(moved), str(tmp_path / "b"), "--source-hf-dir", str(other)]) == 0
    assert (tmp_path / "b" / "processing_prismatic.py").read_text() == "# other remote code\n"
    assert json.loads((tmp_path / "b" / "config.json").read_text())["model_type"] == "openvla"
    # A given directory that does not exist fails before anything is written.
    assert convert_cli.main(["to-hf", str(moved), str(tmp_path / "c"), "--source_hf_dir", str(tmp_path / "nope")]) == 2
    assert f"source HF directory {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
