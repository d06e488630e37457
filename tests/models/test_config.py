"""The typed model config: one source of defaults, misspelled fields named, the HF config.json round trip."""

import dataclasses
import json

import ml_collections
import pytest

from configs import model as model_configs
from configs import train as train_configs
from openvla_jax.convert.hf_config import hf_config_from_model_config, model_config_from_hf
from openvla_jax.models import vla
from openvla_jax.models.config import (
    LlamaConfig,
    TowerConfig,
    VisionConfig,
    VLAConfig,
    as_config,
    read_model_config,
    write_model_config,
)
from openvla_jax.tokenizer.actions import ActionTokenizer


def test_configs_are_the_dataclass_defaults_plus_their_numbers():
    seven = as_config(model_configs.get_config("7b"))
    assert seven == VLAConfig(variant="7b")  # OpenVLA-7B is the default model
    assert seven.to_dict() == model_configs.get_config("7b").to_dict()
    tiny = as_config(model_configs.get_config("tiny"))
    assert (tiny.llm.hidden_size, tiny.llm.num_key_value_heads, tiny.vision.fused_featurizer.embed_dim) == (64, 4, 48)
    assert (tiny.dtype, tiny.param_dtype, tiny.numerics.scan_layers, tiny.actions.decoding) == (
        "bfloat16",
        "float32",
        False,
        "autoregressive",
    )
    # Every train / finetune variant's model section converts (overrides are known fields).
    for variant in train_configs.VARIANTS:
        as_config(train_configs.get_config(variant).model)


def test_absent_fields_take_the_defaults():
    partial = {"llm": {"hidden_size": 64, "num_attention_heads": 4}, "vision": {"image_size": 56}}
    c = VLAConfig.from_dict(partial)
    assert c.llm == LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4)
    assert c.vision.featurizer == VisionConfig().featurizer and c.numerics == VLAConfig().numerics
    assert ActionTokenizer.for_model(c).vocab_size == 32000  # 32064 less pad_to_multiple_of 64


@pytest.mark.parametrize(
    "where, key, suggestion",
    [
        ((), "scan_layer", "scan_layers"),
        (("llm",), "num_hiden_layers", "num_hidden_layers"),
        (("vision",), "img_size", "image_size"),
        (("vision", "fused_featurizer"), "embed_dims", "embed_dim"),
    ],
)
def test_a_misspelled_field_in_a_config_dict_is_an_error_naming_it(where, key, suggestion):
    cd = model_configs.get_config("tiny")
    node = cd
    for w in where:
        node = node[w]
    with node.unlocked():
        node[key] = 1
    name = ".".join(("model",) + where + (key,))
    with pytest.raises(ValueError, match=rf"{name} \(did you mean '{suggestion}'\?\)"):
        vla.from_config(cd)
    with pytest.raises(ValueError, match=rf"{name} \(did you mean '{suggestion}'\?\)"):
        as_config(cd.to_dict())


def test_a_misspelled_field_in_model_config_json_names_the_file(tmp_path):
    d = VLAConfig(variant="tiny").to_dict()
    d["action_chunks"] = 4
    path = tmp_path / "model_config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"model_config.json: .*model.action_chunks \(did you mean 'action_chunk'\?\)"):
        read_model_config(path)


def test_replace_and_types_are_checked():
    c = VLAConfig()
    with pytest.raises(ValueError, match=r"model.dtpye \(did you mean 'dtype'\?\)"):
        c.replace(dtpye="float32")
    with pytest.raises(TypeError, match="model.llm.num_hidden_layers: expected an int"):
        VLAConfig.from_dict({"llm": {"num_hidden_layers": 2.5}})
    with pytest.raises(ValueError, match="model.decoding"):
        c.replace(decoding="beam")
    assert c.replace(center_crop=1).center_crop == 1.0 and isinstance(c.replace(center_crop=1).center_crop, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.dtype = "float32"


def test_model_config_json_round_trips(tmp_path):
    c = as_config(train_configs.get_config("oft_demo").model)
    write_model_config(tmp_path / "model_config.json", c)
    assert read_model_config(tmp_path / "model_config.json") == c
    cd = c.to_config_dict()
    assert isinstance(cd, ml_collections.ConfigDict) and as_config(cd) == c


@pytest.mark.parametrize("variant", ["7b", "tiny"])
def test_typed_config_round_trips_through_hf_config_json(variant):
    # config.json holds the model's shape; numerics, OFT options and preprocessing are not in it.
    c = as_config(model_configs.get_config(variant)).replace(variant="hf")
    j = json.loads(json.dumps(hf_config_from_model_config(c, None, "bfloat16")))
    assert model_config_from_hf(j) == c
    single = c.replace(
        vision=VisionConfig(image_size=56, featurizer=TowerConfig(embed_dim=64, depth=3, num_heads=4)),
        projector={"arch": "gelu-mlp"},
        llm=dataclasses.replace(c.llm, num_key_value_heads=c.llm.num_attention_heads // 2, rope_theta=5e5),
        n_action_bins=128,
        pad_to_multiple_of=32,
    )
    assert model_config_from_hf(hf_config_from_model_config(single)) == single


def test_a_misspelled_field_in_hf_config_json_is_an_error_naming_it():
    j = hf_config_from_model_config(model_configs.get_config("tiny"))
    with pytest.raises(
        ValueError, match=r"config.json has an unknown field 'n_action_binz': did you mean 'n_action_bins'"
    ):
        model_config_from_hf({**j, "n_action_binz": 128})
    text = {**j["text_config"], "num_hiden_layers": 3}
    with pytest.raises(ValueError, match=r"text_config has an unknown field 'num_hiden_layers'"):
        model_config_from_hf({**j, "text_config": text})
    # Attributes transformers' PretrainedConfig writes (not ours, not close to ours) pass.
    model_config_from_hf({**j, "return_dict": True, "text_config": {**j["text_config"], "hidden_act": "silu"}})
