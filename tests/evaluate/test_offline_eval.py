"""Offline evaluation: metrics equal an independent NumPy computation (OpenVLA's action tokenizer and
normalisation formulas) on a two-dataset mixture with known predictions; end to end with a random tiny model and the
evaluate script (results.json consistent, report.png a real PNG)."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import model as model_configs
from openvla_jax.data.rlds import DataConfig
from openvla_jax.evaluate import offline
from openvla_jax.evaluate.report import write_report
from openvla_jax.models.preprocess import tf_resize_uint8
from openvla_jax.tokenizer.actions import ActionTokenizer
from openvla_jax.tokenizer.prompt import prompt_prefix_ids
from openvla_jax.tokenizer.text import TextTokenizer
from tests.support.rlds_fixtures import load_script, write_libero

ROOT = Path(__file__).resolve().parents[2]
DEMO, LIBERO = "demo_tabletop", "libero_spatial_no_noops"
MASK = [True] * 6 + [False]  # both datasets: EEF deltas + an absolute gripper


def _stats(q01, q99, lo, hi):
    a = {"q01": q01, "q99": q99, "min": lo, "max": hi, "mean": [0.0] * 7, "std": [1.0] * 7, "mask": MASK}
    zeros = {k: [0.0] * 7 for k in ("mean", "std", "max", "min", "q01", "q99")}
    # The released checkpoints' layout: a 7-dim all-zero proprio block (LIBERO's state has 8 dims).
    return {"action": a, "proprio": zeros, "num_transitions": 10, "num_trajectories": 2}


# Chosen by hand: demo x is clipped at q01 (-0.05 < -0.04); rotations constant (min == max -> 0).
STATS = {
    DEMO: _stats(
        [-0.04, -0.06, -0.05, 0, 0, 0, 0],
        [0.05, 0.04, 0.05, 0, 0, 0, 1],
        [-0.05] * 3 + [0] * 3 + [0],
        [0.05] * 3 + [0] * 3 + [1],
    ),
    LIBERO: _stats(
        [-0.7, -0.8, -0.6, -0.7, -0.75, -0.7, 0], [0.8, 0.7, 0.8, 0.65, 0.7, 0.9, 1], [-0.9] * 6 + [0], [0.9] * 6 + [1]
    ),
}


# --- independent NumPy reference (the tokenizer and normalisation formulas, written out here) ------------

BINS = np.linspace(-1, 1, 256)
CENTERS = (BINS[:-1] + BINS[1:]) / 2


def ref_normalize(x, st):
    x = np.asarray(x, np.float32)
    lo, hi = np.float32(st["q01"]), np.float32(st["q99"])
    y = np.where(MASK, np.clip(2 * (x - lo) / (hi - lo + 1e-8) - 1, -1, 1), x)
    return np.where(np.array(st["min"]) == np.array(st["max"]), 0.0, y).astype(np.float32)


def ref_encode(a):
    return 32000 - np.digitize(np.clip(a.astype(np.float64), -1, 1), BINS)


def ref_decode(ids):
    return CENTERS[np.clip(32000 - ids - 1, 0, 254)]


def ref_unnormalize(a, st):
    lo, hi = np.array(st["q01"], np.float64), np.array(st["q99"], np.float64)
    return np.where(MASK, 0.5 * (a + 1) * (hi - lo) + lo, a)


def ref_metrics(pred_ids, label_ids, gt_norm, st):
    pred = ref_decode(pred_ids)
    du = ref_unnormalize(pred, st) - ref_unnormalize(gt_norm.astype(np.float64), st)
    d = pred - gt_norm
    return {
        "action_accuracy": (pred_ids == label_ids).mean(0),
        "l1": np.abs(d).mean(0),
        "mse": (d**2).mean(0),
        "l1_unnorm": np.abs(du).mean(0),
        "mse_unnorm": (du**2).mean(0),
    }


def raw_val(data_dir, name, split, images=False):
    """(instruction, standardized action [T, 7][, images]) of each validation episode, read with tfds alone."""
    out = []
    for ep in tfds.as_numpy(tfds.builder_from_directory(str(Path(data_dir) / name / "1.0.0")).as_dataset(split=split)):
        steps = list(ep["steps"])
        a = np.stack([s["action"] for s in steps]).astype(np.float32)
        if name == LIBERO:  # its standardize: gripper -1 open / +1 close -> 1 - clip(g, 0, 1)
            a[:, 6] = 1 - np.clip(a[:, 6], 0, 1)
        out.append((steps[0]["language_instruction"].decode(), a))
        if images:
            out[-1] += (np.stack([s["observation"]["image"] for s in steps]),)
    return out


# --- fixtures -------------------------------------------------------------------------------------


def _make_demo(out_dir, episodes, val_fraction, seed):
    mod = load_script("make_demo_data")
    return mod.make_demo_data(str(out_dir), episodes=episodes, val_fraction=val_fraction, seed=seed)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "demo"
    _make_demo(d, episodes=6, val_fraction=0.34, seed=4)  # 4 train + 2 val episodes
    write_libero(str(d), n_episodes=40, T=(3, 5), hw=(16, 16))  # no val split: train[95%:] = 2 episodes
    return str(d)


def _stand_in(tok_dir):
    """What evaluate_offline reads of an OpenVLA when predict_fn replaces the model."""
    cfg = model_configs.get_config("tiny")
    cfg.vision.image_size = 32
    return SimpleNamespace(
        config=cfg,
        tokenizer=TextTokenizer(tok_dir),
        norm_stats={},
        action_tokenizer=ActionTokenizer.for_model(cfg),
        action_dim=7,
    )


# --- tests ----------------------------------------------------------------------------------------


def test_action_metrics_equal_numpy_per_dim_and_dataset():
    rng = np.random.default_rng(0)
    n = 50
    label_ids = rng.integers(31744, 32000, (n, 7))
    pred_ids = np.where(rng.random((n, 7)) < 0.4, label_ids, rng.integers(31700, 32000, (n, 7)))  # some off-range
    gt = rng.uniform(-1, 1, (n, 7)).astype(np.float32)
    names = np.array([DEMO, LIBERO])[rng.integers(0, 2, n)]
    stats = {k: dict(v["action"], mask=MASK) for k, v in STATS.items()}
    got = offline.action_metrics(pred_ids, label_ids, ref_decode(pred_ids), gt, stats, names)
    for name in (DEMO, LIBERO):
        m = names == name
        ref = ref_metrics(pred_ids[m], label_ids[m], gt[m], stats[name])
        g = got["per_dataset"][name]
        assert g["frames"] == m.sum() and g["tokens"] == 7 * m.sum()
        for k, v in ref.items():
            np.testing.assert_allclose(g["per_dim"][k], v, rtol=1e-9, atol=1e-12, err_msg=f"{name} {k}")
            np.testing.assert_allclose(g[k], v.mean(), rtol=1e-9)
    # overall pools frames: a frame-weighted mean of the datasets
    w = np.array([(names == k).sum() for k in (DEMO, LIBERO)]) / n
    for k in ref:
        pooled = sum(wi * got["per_dataset"][d][k] for wi, d in zip(w, (DEMO, LIBERO)))
        assert got["overall"][k] == pytest.approx(pooled, rel=1e-9)
    assert 0.3 < got["overall"]["action_accuracy"] < 0.6


def test_split_batch_takes_the_prompt_before_the_first_label_and_names_bad_rows():
    ids = np.array([[1, 5, 6, 9, 31800, 31801, 2, 0], [1, 7, 9, 31744, 31745, 2, 0, 0]])
    labels = np.full_like(ids, -100)
    labels[0, 4:7] = ids[0, 4:7]
    labels[1, 3:6] = ids[1, 3:6]
    rows, label_ids = offline.split_batch(ids, labels, 2)
    assert rows == [[1, 5, 6, 9], [1, 7, 9]]
    np.testing.assert_array_equal(label_ids, [[31800, 31801], [31744, 31745]])
    labels[1] = -100
    with pytest.raises(ValueError, match=r"rows \[1\] have no supervised label"):
        offline.split_batch(ids, labels, 2)


def test_evaluate_offline_with_known_predictions_equals_numpy(data_dir):
    vla = _stand_in(data_dir)
    tok = vla.tokenizer
    raw = {DEMO: raw_val(data_dir, DEMO, "val"), LIBERO: raw_val(data_dir, LIBERO, "train[95%:]")}
    assert [len(raw[DEMO]), len(raw[LIBERO])] == [2, 2]
    # Known predictions: one fixed id row per prompt = the labels of that episode's first frame, so
    # accuracy is exact on frames that repeat it and wrong elsewhere.
    table, expected = {}, {}
    for name, eps in raw.items():
        st = STATS[name]["action"]
        pred, lab, gt = [], [], []
        for inst, a in eps:
            g = ref_normalize(a, st)
            ids = ref_encode(g)
            key = tuple(prompt_prefix_ids(tok, inst))
            table.setdefault(key, ids[0])
            pred.append(np.repeat(table[key][None], len(a), 0))
            lab.append(ids)
            gt.append(g)
        expected[name] = ref_metrics(np.concatenate(pred), np.concatenate(lab), np.concatenate(gt), st)
        expected[name]["frames"] = sum(len(a) for _, a in eps)
    calls = []

    def predict(pixel_values, rows):
        assert pixel_values.shape[1:] == (32, 32, 6) and pixel_values.dtype == np.float32
        calls.append(len(rows))
        return np.stack([table[tuple(r)] for r in rows])

    cfg = DataConfig(
        data_dir=data_dir,
        mixture=[(DEMO, 1.0), (LIBERO, 1.0)],
        batch_size=4,
        dataset_statistics=STATS,
        progress=False,
        shuffle_buffer=10,
    )
    res = offline.evaluate_offline(vla, cfg, episodes_to_plot=3, predict_fn=predict)
    n_total = sum(e["frames"] for e in expected.values())
    assert res["frames"] == n_total and res["batches"] == -(-n_total // 4)
    for name, ref in expected.items():
        got = res["metrics"]["per_dataset"][name]
        assert got["frames"] == ref["frames"] and got["tokens"] == 7 * ref["frames"]
        for k in ("action_accuracy", "l1", "mse", "l1_unnorm", "mse_unnorm"):
            np.testing.assert_allclose(got["per_dim"][k], ref[k], rtol=1e-6, atol=1e-7, err_msg=f"{name} {k}")
    acc = {k: res["metrics"]["per_dataset"][k]["action_accuracy"] for k in expected}
    assert 0.2 < acc[DEMO] < 1 and 0 < acc[LIBERO] < 0.5, acc  # the case is not trivial
    # plotted episodes: round robin over the datasets, whole episodes in step order
    eps = res["episodes"]
    assert [e["dataset"] for e in eps] == [DEMO, LIBERO, DEMO]
    for e in eps:
        match = [a for inst, a in raw[e["dataset"]] if inst == e["instruction"] and len(a) == len(e["gt_norm"])]
        st = STATS[e["dataset"]]["action"]
        assert any(np.allclose(e["gt_norm"], ref_normalize(a, st), atol=1e-6) for a in match)
        key = tuple(prompt_prefix_ids(tok, e["instruction"]))
        np.testing.assert_allclose(
            e["pred_norm"], np.repeat(ref_decode(table[key])[None], len(e["gt_norm"]), 0), atol=1e-7
        )
        np.testing.assert_allclose(e["pred"], ref_unnormalize(np.asarray(e["pred_norm"]), st), atol=1e-9)


@pytest.fixture(scope="module")
def tiny_ckpt(data_dir, tmp_path_factory):
    """A random tiny OpenVLA (image 56) saved as a converted checkpoint with the demo tokenizer."""
    import jax.numpy as jnp

    from openvla_jax.checkpoints.converted import save_converted
    from openvla_jax.models import vla as vla_lib
    from openvla_jax.train.step import abstract_params

    cfg = model_configs.get_config("tiny")
    cfg.vision.image_size = 56
    module = vla_lib.from_config(cfg, dtype=jnp.float32)
    shapes = abstract_params(module)  # the model's param shapes, no memory used
    from flax import linen as nn

    rng = np.random.default_rng(0)

    def random_param(path, s):  # norm scales 1, the rest N(0, 0.3): outputs then depend on the inputs
        name = jax.tree_util.keystr(path).lower()
        if "norm" in name and ("scale" in name or "weight" in name):
            return np.ones(s.shape, np.float32)
        return (0.3 * rng.standard_normal(s.shape)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(random_param, nn.meta.unbox(shapes))
    # Random weights favour non-action tokens (decoded to an edge bin); scaled action logits compete.
    params["language_model"]["lm_head"]["kernel"][:, 31744:32000] *= 40.0
    return save_converted(
        tmp_path_factory.mktemp("ckpt") / "tiny", cfg, params, {DEMO: STATS[DEMO]}, tokenizer_dir=data_dir
    )


def test_end_to_end_random_tiny_model_and_script(data_dir, tiny_ckpt, tmp_path):
    from openvla_jax import OpenVLA

    vla = OpenVLA.load(tiny_ckpt, dtype="float32")
    cfg = DataConfig(data_dir=data_dir, mixture=DEMO, batch_size=8, progress=False)
    res = offline.evaluate_offline(vla, cfg, episodes_to_plot=2)
    n_frames = sum(len(a) for _, a in raw_val(data_dir, DEMO, "val"))
    m = res["metrics"]["overall"]
    assert res["frames"] == m["frames"] == n_frames and m["tokens"] == 7 * n_frames
    assert 0 <= m["action_accuracy"] <= 1 and len(res["episodes"]) == 2
    # The traced predictions are what the public predict_action gives on the raw frames resized as
    # the training data was (TF lanczos3; predict_action's own PIL-bicubic resize is then a no-op):
    # the evaluation's prompt extraction, pixel path and unnormalisation agree with deployment.
    raw = raw_val(data_dir, DEMO, "val", images=True)
    for e in res["episodes"]:
        (images,) = [im for inst, a, im in raw if inst == e["instruction"] and len(a) == len(e["pred"])]
        images = tf_resize_uint8(images, (56, 56)).numpy()
        direct = vla.predict_action(images, [e["instruction"]] * len(images), unnorm_key=DEMO)
        np.testing.assert_allclose(e["pred"], direct, rtol=0, atol=1e-9)
    assert len({tuple(r) for e in res["episodes"] for r in np.round(e["pred_norm"], 6)}) > 1  # ids vary
    paths = write_report(res, tmp_path / "eval")
    on_disk = json.loads(Path(paths["json"]).read_text())
    assert on_disk["metrics"]["overall"]["tokens"] == 7 * n_frames
    for k in ("l1", "mse", "l1_unnorm", "mse_unnorm"):
        assert m[k] >= 0 and m[k] == pytest.approx(np.mean(on_disk["metrics"]["per_dataset"][DEMO]["per_dim"][k]))
    assert m["mse"] >= m["l1"] ** 2 - 1e-12  # Jensen: a cheap consistency check of the sums
    png = Path(paths["png"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(paths["png"])
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400 and img.std() > 0.01

    # The script: load the checkpoint, evaluate, 2 closed-loop episodes, JSON + PNG, one summary line.
    out = tmp_path / "script"
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "evaluate.py"),
            f"--checkpoint={tiny_ckpt}",
            f"--data_dir={data_dir}",
            f"--mixture={DEMO}",
            f"--out={out}",
            "--batch_size=8",
            "--closed_loop_episodes=2",
            "--episodes_to_plot=1",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("evaluate:")]
    assert line and f"{n_frames} frames" in line[0] and "closed_loop_success=" in line[0], p.stdout
    script = json.loads((out / "results.json").read_text())
    a, b = script["metrics"]["overall"], on_disk["metrics"]["overall"]  # same checkpoint and data
    assert a["frames"] == b["frames"] and a["action_accuracy"] == pytest.approx(b["action_accuracy"], abs=1e-12)
    np.testing.assert_allclose(
        [a[k] for k in ("l1", "mse", "l1_unnorm")], [b[k] for k in ("l1", "mse", "l1_unnorm")], rtol=1e-9
    )
    assert script["closed_loop"]["episodes"] == 2 and 0 <= script["closed_loop"]["success_rate"] <= 1
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
