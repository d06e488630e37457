"""A filmstrip of closed-loop episodes (PNG): what the policy saw, what it did, what the expert would
have done, and how the episode ended, readable at a glance.

    r = closed_loop(vla, n_episodes=128, record=6)
    write_filmstrip(r["recorded"], "runs/demo/eval/filmstrip.png", title="demo policy")

One row per episode (instruction, success or failure, steps), one column per shown frame (evenly
spaced, always the first and the final one). Under each frame: the policy's action and the expert's
for that state, as move directions (x: left/right, y: up/down in the image, z: up/down) and the
gripper command; the policy's line is green where it agrees with the expert and red where not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from openvla_jax.evaluate.closed_loop import action_signs

_ARROWS = {("x", 1): "→", ("x", -1): "←", ("y", 1): "↓", ("y", -1): "↑", ("z", 1): "up", ("z", -1): "down"}


def describe(action) -> str:
    """float [7] -> a short text: 'x→ y↑ z:down open' (a dimension that does not move is left out)."""
    s = action_signs(action)
    parts = [
        f"{d}{_ARROWS[(d, int(v))]}" if d != "z" else f"z:{_ARROWS[(d, int(v))]}" for d, v in zip("xyz", s[:3]) if v
    ]
    return " ".join(parts + ["open" if s[3] else "close"]) if parts else ("stay " + ("open" if s[3] else "close"))


def pick_episodes(recorded: Sequence[dict], n: int) -> list[dict]:
    """Up to `n` finished episodes, failures and successes both shown when there are both."""
    done = [r for r in recorded if "success" in r]
    fails = [r for r in done if not r["success"]]
    wins = [r for r in done if r["success"]]
    k = min(len(fails), max(n // 2, n - len(wins)))
    return (wins[: n - k] + fails[:k])[:n]


def write_filmstrip(
    recorded: Sequence[dict], path, frames_per_episode: int = 6, max_episodes: int = 6, title: str = ""
) -> Path:
    """Draw the episodes of `closed_loop(..., record=N)["recorded"]` into a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    episodes = pick_episodes(recorded, max_episodes)
    if not episodes:
        raise ValueError("no finished episodes to draw: run closed_loop(..., record=N) with N >= 1")
    cols = frames_per_episode
    fig, axes = plt.subplots(len(episodes), cols, figsize=(2.1 * cols, 2.75 * len(episodes)), squeeze=False)
    for row, ep in zip(axes, episodes):
        n = len(ep["frames"])
        shown = sorted(set(np.linspace(0, n, cols).round().astype(int).tolist()))[:cols]  # n: the final frame
        for ax in row:
            ax.axis("off")
        for ax, t in zip(row, shown):
            ax.imshow(ep["final"] if t >= n else ep["frames"][t], interpolation="nearest")
            if t >= n:
                ax.set_title(
                    "end: success" if ep["success"] else "end: FAILED",
                    fontsize=8,
                    color="green" if ep["success"] else "red",
                )
                continue
            ax.set_title(f"step {t}", fontsize=8)
            pol, exp = ep["policy"][t], ep["expert"][t]
            ok = bool((action_signs(pol) == action_signs(exp)).all())
            ax.text(
                0.5,
                -0.06,
                "policy: " + describe(pol),
                transform=ax.transAxes,
                ha="center",
                va="top",
                fontsize=7,
                color="green" if ok else "red",
            )
            ax.text(
                0.5,
                -0.17,
                "expert: " + describe(exp),
                transform=ax.transAxes,
                ha="center",
                va="top",
                fontsize=7,
                color="black",
            )
        verdict = f"success in {ep['steps']} steps" if ep["success"] else f"failed ({ep['steps']} steps)"
        row[0].text(
            0.0,
            1.2,
            f'"{ep["instruction"]}": {verdict}',
            transform=row[0].transAxes,
            fontsize=9,
            fontweight="bold",
            color="green" if ep["success"] else "red",
        )
    height = fig.get_size_inches()[1]
    if title:  # above the first episode's heading, not over it
        fig.suptitle(title, fontsize=11, y=1 - 0.15 / height, va="top")
    fig.subplots_adjust(
        left=0.02, right=0.98, bottom=0.55 / height, top=1 - 1.05 / height, wspace=0.08, hspace=0.9 / 2.75 * 2.2
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
