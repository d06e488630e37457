"""The public `OpenVLA` API on a tiny PyTorch-built HF checkpoint: logits, greedy action ids with the
"▁" rule, batched predict_action equal to one-by-one calls and to the original's decode+unnormalize."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from openvla_jax import OpenVLA
from openvla_jax.models.preprocess import preprocess_images
from openvla_jax.tokenizer.prompt import inference_prompt_ids
from openvla_jax.tokenizer.text import TextTokenizer
from tests.support.helpers import max_abs
from tests.support.rlds_fixtures import train_tiny_sentencepiece
from tests.support.vla_refs import NORM_STATS, build_torch_vla, inputs, torch_greedy, torch_logits, write_hf_dir

INSTRUCTIONS = ["Pick up the red block", "open the drawer", "put the green cup to the left of the big bowl"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    model = build_torch_vla()
    write_hf_dir(model, path)
    shutil.copy(Path(train_tiny_sentencepiece(str(tmp_path_factory.mktemp("tok")))) / "tokenizer.model", path)
    return model, path, OpenVLA.load(path, dtype="float32")


def original_unnormalize(ids, stats):
    """What OpenVLAForActionPrediction.predict_action does with the generated ids (NumPy, float64)."""
    bins = np.linspace(-1, 1, 256)
    centers = (bins[:-1] + bins[1:]) / 2.0
    d = np.clip(32000 - ids - 1, 0, 254)
    a = centers[d]
    mask = np.array(stats.get("mask", np.ones_like(stats["q01"], dtype=bool)))
    high, low = np.array(stats["q99"]), np.array(stats["q01"])
    return np.where(mask, 0.5 * (a + 1) * (high - low) + low, a)


def test_logits_match_torch_in_hf_layout(ckpt):
    model, _, vla = ckpt
    pv, ids, mask, lengths = inputs(b=2, t=10)
    out = vla.logits(pv, ids, mask)  # NCHW pixel values, as the HF processor makes them
    ref = torch_logits(model, pv, ids, mask)
    assert out.shape == ref.shape == (2, 10 + 256, 32064)
    for i, n in enumerate(lengths):
        assert max_abs(out[i, : n + 256], ref[i, : n + 256]) < 1e-4


def test_action_token_ids_apply_the_space_rule_and_match_torch(ckpt):
    model, _, vla = ckpt
    pv, ids, mask, lengths = inputs(b=3, t=12, seed=3)
    ids[0, lengths[0] - 1] = 29871  # row 0 already ends with "▁": nothing appended
    got = vla.action_token_ids(pv, ids, mask)
    rows = [list(ids[i, :n]) + ([] if ids[i, n - 1] == 29871 else [29871]) for i, n in enumerate(lengths)]
    t = max(map(len, rows))
    ref_ids = np.array([r + [0] * (t - len(r)) for r in rows])
    ref = torch_greedy(model, pv, ref_ids, [len(r) for r in rows])
    np.testing.assert_array_equal(got, ref)


def test_predict_action_batched_equals_single_and_original_formula(ckpt):
    model, path, vla = ckpt
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(240, 320), (224, 224), (180, 200)]]
    batched = vla.predict_action(images, INSTRUCTIONS)
    singles = np.concatenate([vla.predict_action(images[i], INSTRUCTIONS[i]) for i in range(3)])
    np.testing.assert_array_equal(batched, singles)
    # the same through the torch reference: preprocess, prompt, greedy, decode, unnormalize
    tok = TextTokenizer(str(path))
    rows = [inference_prompt_ids(tok, s) for s in INSTRUCTIONS]
    t = max(map(len, rows))
    ids = np.array([r + [0] * (t - len(r)) for r in rows])
    pv = preprocess_images(images).transpose(0, 3, 1, 2)
    ref_ids = torch_greedy(model, pv, ids, [len(r) for r in rows])
    expected = original_unnormalize(ref_ids, NORM_STATS["bridge_orig"]["action"])
    assert batched.shape == (3, 7) and batched.dtype == np.float64
    np.testing.assert_allclose(batched, expected, rtol=0, atol=1e-6)


def test_decoder_compiles_once_per_bucket(ckpt):
    _, _, vla = ckpt
    images = np.zeros((4, 64, 64, 3), np.uint8)
    vla.predict_action(images[:3], INSTRUCTIONS)
    n = vla._decode._cache_size()
    vla.predict_action(images, INSTRUCTIONS + ["stack the blocks"])  # batch 4: same bucket as 3
    vla.predict_action(images[:3], INSTRUCTIONS[::-1])
    assert vla._decode._cache_size() == n


def test_unnorm_key_and_tokenizer_errors(ckpt, tmp_path):
    _, path, vla = ckpt
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match=r"unnorm_key 'nope' not in norm_stats; available: \['bridge_orig'\]"):
        vla.predict_action(image, "go", unnorm_key="nope")
    two = OpenVLA(vla.config, vla.params, {**NORM_STATS, "fractal": NORM_STATS["bridge_orig"]}, path, "float32")
    with pytest.raises(ValueError, match=r"pass unnorm_key= one of \['bridge_orig', 'fractal'\]"):
        two.predict_action(image, "go")
    no_tok = OpenVLA(vla.config, vla.params, NORM_STATS, None, "float32")
    with pytest.raises(FileNotFoundError, match="tokenizer files"):
        no_tok.predict_action(image, "go")
    with pytest.raises(ValueError, match="2 images but 1 instructions"):
        vla.predict_action([image, image], ["go"])
    with pytest.raises(FileNotFoundError, match="not an OpenVLA checkpoint"):
        OpenVLA.load(tmp_path)


def test_inputs_are_checked_where_they_enter(ckpt):
    _, path, vla = ckpt
    image = np.zeros((32, 32, 3), np.uint8)
    room = vla.max_prompt_tokens
    patches = (vla.config.vision.image_size // 14) ** 2  # 14-px patches
    assert room == vla.config.llm.max_position_embeddings - patches - 7 > 0
    long = " ".join(["block"] * (room + 10))
    with pytest.raises(
        ValueError, match=rf"too long for this model: \(row, prompt tokens\) \[\(1, \d+\)\]; at most {room}"
    ):
        vla.predict_action([image, image], ["go", long])
    capped = OpenVLA(vla.config, vla.params, NORM_STATS, path, "float32", max_prompt_tokens=12)
    with pytest.raises(ValueError, match="at most 12 prompt tokens"):
        capped.predict_action(image, "put the green cup to the left of the big bowl")
    with pytest.raises(ValueError, match="empty batch"):
        vla.predict_action([], [])
    with pytest.raises(TypeError, match="instruction 0 is NoneType, expected a string"):
        vla.predict_action([image], [None])
    with pytest.raises(ValueError, match=r"image 0 is empty: shape \(0, 0, 3\)"):
        vla.predict_action([np.zeros((0, 0, 3), np.uint8)], ["go"])


def test_a_nan_model_gives_no_action_and_strict_mode_refuses_non_action_tokens(ckpt):
    import jax

    from openvla_jax.policy import InvalidActionError

    _, path, vla = ckpt
    images = [np.full((32, 32, 3), v, np.uint8) for v in (0, 90, 200)]
    nan = jax.tree.map(lambda x: np.full(x.shape, np.nan, x.dtype), vla.params)
    broken = OpenVLA(vla.config, nan, NORM_STATS, path, "float32")
    with pytest.raises(InvalidActionError, match=r"rows \[0, 1, 2\] .* \(non-finite logits\)") as e:
        broken.predict_action(images, INSTRUCTIONS)
    assert e.value.rows == [0, 1, 2]
    ids = vla.action_token_ids(preprocess_images(images), *_prompt_ids(path))
    off = np.flatnonzero(~vla.action_tokenizer.is_action(ids).all(1)).tolist()
    assert off, "the random model should emit a non-action token somewhere (else this case tests nothing)"
    strict = OpenVLA(vla.config, vla.params, NORM_STATS, path, "float32", strict_actions=True)
    with pytest.raises(InvalidActionError, match="outside the action range") as e:
        strict.predict_action(images, INSTRUCTIONS)
    assert e.value.rows == off
    assert np.isfinite(vla.predict_action(images, INSTRUCTIONS)).all()  # default: the original's clipping


def _prompt_ids(path):
    tok = TextTokenizer(str(path))
    rows = [inference_prompt_ids(tok, s) for s in INSTRUCTIONS]
    t = max(map(len, rows))
    return np.array([r + [0] * (t - len(r)) for r in rows]), np.array([[j < len(r) for j in range(t)] for r in rows])
