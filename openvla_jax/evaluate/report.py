"""Write offline-evaluation results as `results.json` and a one-page `report.png`.

report.png, top: per action dimension, L1 of normalised actions per dataset (bars) with the standard
deviation of the per-frame |error| as error bars (sqrt(mse - l1^2), from the same sums). Below:
one row per plotted episode, predicted (dashed) vs ground-truth (solid) un-normalised action traces,
one panel per dimension.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from openvla_jax.utils.files import write_json

DIM_NAMES = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None  # strict JSON has no NaN/inf
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_report(results: dict, out_dir: os.PathLike) -> dict:
    """results (from `evaluate_offline`, optionally with a "closed_loop" entry) -> files.

    Returns {"json": path, "png": path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    write_json(json_path, _jsonable(results), indent=1)  # readers never see a half-written file
    png_path = out / "report.png"
    plot_report(results, png_path)
    return {"json": str(json_path), "png": str(png_path)}


def _names(a_dim: int) -> list[str]:
    return list(DIM_NAMES[:a_dim]) + [f"a{i}" for i in range(len(DIM_NAMES), a_dim)]


def plot_report(results: dict, path: os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    per_dataset = results["metrics"]["per_dataset"]
    episodes = results.get("episodes", [])
    a_dim = len(results["metrics"]["overall"]["per_dim"]["l1"])
    names = _names(a_dim)
    fig = plt.figure(figsize=(2.2 * a_dim, 3.2 + 2.0 * len(episodes)), dpi=80)
    grid = fig.add_gridspec(1 + len(episodes), a_dim, height_ratios=[1.6] + [1.0] * len(episodes))

    ax = fig.add_subplot(grid[0, :])
    width = 0.8 / max(len(per_dataset), 1)
    x = np.arange(a_dim)
    for k, (name, m) in enumerate(per_dataset.items()):
        l1 = np.asarray(m["per_dim"]["l1"])
        spread = np.sqrt(np.maximum(np.asarray(m["per_dim"]["mse"]) - l1**2, 0.0))
        ax.bar(
            x + (k - (len(per_dataset) - 1) / 2) * width,
            l1,
            width,
            yerr=spread,
            capsize=2,
            label=f"{name} (acc {m['action_accuracy']:.3f}, {m['frames']} frames)",
        )
    ax.set_xticks(x, names)
    ax.set_ylabel("L1, normalised action")
    overall = results["metrics"]["overall"]
    ax.set_title(
        f"offline eval: token accuracy {overall['action_accuracy']:.3f}, L1 {overall['l1']:.4f}, "
        f"{overall['frames']} frames" + _closed_loop_text(results)
    )
    ax.legend(fontsize=7, loc="upper left")

    for r, ep in enumerate(episodes, start=1):
        pred, gt = np.asarray(ep["pred"]), np.asarray(ep["gt"])
        t = np.arange(len(gt))
        for d in range(a_dim):
            a = fig.add_subplot(grid[r, d])
            a.plot(t, gt[:, d], "-", color="k", lw=1.2, label="ground truth")
            a.plot(t, pred[:, d], "--", color="tab:red", lw=1.2, label="predicted")
            a.tick_params(labelsize=6)
            if d == 0:
                a.set_title(f"{ep['dataset']}: {ep['instruction'][:40]}", fontsize=7, loc="left")
                a.set_ylabel(f"episode {r}", fontsize=7)
            if r == 1 and d == a_dim - 1:
                a.legend(fontsize=6)
            if r == len(episodes):
                a.set_xlabel(f"{names[d]} / step", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _closed_loop_text(results: dict) -> str:
    cl = results.get("closed_loop")
    if not cl:
        return ""
    return f"; closed loop {100 * cl['success_rate']:.0f}% of {cl['episodes']}"
