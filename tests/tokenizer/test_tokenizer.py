"""Action tokenizer, text tokenizer and prompt builder against hand calculations and sentencepiece."""

import numpy as np
import pytest

from openvla_jax.tokenizer.actions import ActionTokenizer
from openvla_jax.tokenizer.prompt import IGNORE_INDEX, inference_prompt_ids, prompt_prefix_ids, training_example
from openvla_jax.tokenizer.text import TextTokenizer
from tests.support.rlds_fixtures import train_tiny_sentencepiece


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return TextTokenizer(train_tiny_sentencepiece(str(tmp_path_factory.mktemp("tok"))))


def test_action_ids_hand_values():
    at = ActionTokenizer()
    # bins = linspace(-1, 1, 256): -1 -> digitize 1 -> 31999; 1 -> 256 -> 31744; 0 lies in
    # [bins[127], bins[128]) = [-1/255, 1/255) -> digitize 128 -> 31872; clipping beyond +-1.
    assert at.encode([-1.0, 1.0, 0.0, -5.0, 5.0]).tolist() == [31999, 31744, 31872, 31999, 31744]
    assert at.first_id == 31744
    # decode: idx = clip(32000 - id - 1, 0, 254); centers are midpoints of consecutive bins
    assert at.decode([31999])[0] == pytest.approx((-1 + (-1 + 2 / 255)) / 2)
    assert at.decode([31744])[0] == pytest.approx(1 - 1 / 255)  # idx 255 clipped to 254
    assert at.decode([31872])[0] == pytest.approx(0.0, abs=1e-7)  # bin 127..128 center


def test_action_roundtrip_within_half_bin_and_tf_matches_numpy():
    at = ActionTokenizer()
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (500, 7)).astype(np.float32)
    edges = at.bins.astype(np.float32)  # values exactly at (float32) bin edges: the hard cases
    a = np.concatenate([a, np.resize(edges, (len(edges) // 7 + 1) * 7).reshape(-1, 7)])
    ids = at.encode(a)
    assert ids.min() >= 31744 and ids.max() <= 31999
    np.testing.assert_array_equal(at.encode_tf(a).numpy(), ids)
    assert np.abs(at.decode(ids) - a).max() <= at.bin_width / 2 + 1e-6


def test_small_vocab_action_ids():
    at = ActionTokenizer(vocab_size=400)
    assert at.encode([-1.0, 1.0]).tolist() == [399, 144]


def test_text_tokenizer_special_ids(tok):
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.pad_id == tok.sp_vocab_size and tok.vocab_size == tok.sp_vocab_size + 1
    ids = tok.encode("open the drawer")
    assert ids[0] == 1 and ids[-1] != 2
    assert tok.decode(ids + [tok.pad_id, tok.eos_id]) == "open the drawer"


def test_prompt_prefix_matches_tokenizing_the_original_training_string(tok):
    """The original tokenises "In: ...?\\nOut: " + actions + "</s>" with BOS: its prompt part must be
    BOS + sp(prompt up to "Out:") + [▁]. Check with sentencepiece on the text with the trailing space."""
    for inst in ["Put the spoon in the pot", "open the drawer", "move the cup to the left"]:
        text = f"In: What action should the robot take to {inst.lower()}?\nOut: "
        want = [tok.bos_id] + tok.sp.encode(text)
        assert prompt_prefix_ids(tok, inst) == want
        assert want[-1] == tok.space_id
        assert inference_prompt_ids(tok, inst) == want  # the "▁" rule gives the same prefix


def test_training_example_labels(tok):
    at = ActionTokenizer(vocab_size=tok.sp_vocab_size)
    action = np.array([0.1, -0.5, 0.99, -1.0, 0.0, 0.3, 1.0], np.float32)
    ids, labels = training_example(tok, at, "Pick up the red block", action)
    prefix = prompt_prefix_ids(tok, "pick up the red block")
    assert ids.tolist() == prefix + at.encode(action).tolist() + [tok.eos_id]
    sup = labels != IGNORE_INDEX
    assert sup.sum() == 8 and sup[-8:].all()
    assert np.abs(at.decode(labels[sup][:7]) - action).max() <= at.bin_width / 2 + 1e-6
