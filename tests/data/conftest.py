"""Shared tiny RLDS datasets (written once per session) and pipeline config helper."""

import types

import pytest

from tests.support.rlds_fixtures import train_tiny_sentencepiece, write_bridge, write_fractal, write_libero


@pytest.fixture(scope="session")
def rlds(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("rlds"))
    raw = {
        "bridge_orig": write_bridge(d),
        "fractal20220817_data": write_fractal(d),
        "libero_spatial_no_noops": write_libero(d),
        "libero_goal_no_noops": write_libero(d, name="libero_goal_no_noops", n_episodes=24, T=(3, 4), seed=5),
    }
    from openvla_jax.tokenizer.text import TextTokenizer

    tok = TextTokenizer(train_tiny_sentencepiece(f"{d}/tok"))
    return types.SimpleNamespace(dir=d, raw=raw, tok=tok, stats_dir=f"{d}/stats")
