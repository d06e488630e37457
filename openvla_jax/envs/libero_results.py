"""LIBERO results as they come: one JSON line per finished episode, a summary with 95% intervals,
a bar chart, and per-episode GIFs.

    out/episodes.jsonl   {"suite", "task_id", "task", "trial", "success", "steps", "seconds", "restarts"}
    out/summary.json     overall, per suite and per task: episodes, successes, success_rate, ci95
    out/success.png      per-task success with Wilson 95% intervals, one panel per suite
    out/videos/<suite>--task03--trial07--success.gif   (on request)

A line is appended (and flushed) the moment its episode ends, so a run that is stopped loses at most
the episodes in flight, and a rerun with the same settings skips every episode already written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from openvla_jax.evaluate.closed_loop import wilson_interval
from openvla_jax.utils.files import write_json

EPISODES_FILE = "episodes.jsonl"
SETTINGS_FILE = "settings.json"
SUMMARY_FILE = "summary.json"
CHART_FILE = "success.png"


def episode_key(rec: dict) -> tuple:
    return (rec["suite"], int(rec["task_id"]), int(rec["trial"]))


class EpisodeLog:
    """The append-only `episodes.jsonl` of one evaluation directory."""

    def __init__(self, out_dir: os.PathLike, settings: Optional[dict] = None):
        """`settings` (what makes two runs comparable: suite, step limits, model...) are written on the
        first run and must match on a resumed one: results of different runs never mix."""
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / EPISODES_FILE
        if settings is not None:
            path = self.dir / SETTINGS_FILE
            want: dict = json.loads(json.dumps(settings))  # as it reads back (tuples become lists)
            if path.exists():
                have = json.loads(path.read_text())
                if have != want:
                    diff = {k: (have.get(k), want.get(k)) for k in set(have) | set(want)}
                    diff = {k: v for k, v in diff.items() if v[0] != v[1]}
                    raise ValueError(
                        f"{self.dir} holds results of a run with other settings {diff} (was, now); "
                        "use another output directory"
                    )
            else:
                write_json(path, want, indent=1)
        self.records = self.read()

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill: that episode runs again
                continue
        return out

    def done(self) -> set:
        return {episode_key(r) for r in self.records}

    def append(self, rec: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(rec)


def _rate(records: list[dict]) -> dict:
    n, k = len(records), sum(bool(r["success"]) for r in records)
    return {
        "episodes": n,
        "successes": k,
        "success_rate": k / n if n else 0.0,
        "ci95": list(wilson_interval(k, n)),
        "mean_steps": float(np.mean([r["steps"] for r in records])) if n else 0.0,
    }


def summarize(records: Iterable[dict]) -> dict:
    """Episode records -> {"overall", "suites": {suite: {..., "tasks": {task_id: {..., "task"}}}},
    "restarts"}. Success rates carry Wilson 95% intervals; `overall` averages episodes, and
    `mean_of_suites` averages suite rates, as papers report "average" over suites."""
    records = list(records)
    suites = {}
    for suite in sorted({r["suite"] for r in records}):
        rs = [r for r in records if r["suite"] == suite]
        tasks = {}
        for tid in sorted({int(r["task_id"]) for r in rs}):
            rt = [r for r in rs if int(r["task_id"]) == tid]
            tasks[str(tid)] = dict(_rate(rt), task=rt[0].get("task", ""))
        suites[suite] = dict(_rate(rs), tasks=tasks)
    return {
        "overall": _rate(records),
        "mean_of_suites": float(np.mean([s["success_rate"] for s in suites.values()])) if suites else 0.0,
        "suites": suites,
        "restarts": int(sum(r.get("restarts", 0) for r in records)),
        "seconds": float(sum(r.get("seconds", 0.0) for r in records)),
    }


def write_summary(out_dir: os.PathLike, records: Iterable[dict], extra: Optional[dict] = None) -> dict:
    """summary.json and success.png in `out_dir`; returns the summary."""
    out = Path(out_dir)
    summary = dict(summarize(records), **(extra or {}))
    write_json(out / SUMMARY_FILE, summary, indent=1)
    if summary["overall"]["episodes"]:
        plot_success(summary, out / CHART_FILE)
    return summary


def plot_success(summary: dict, path: os.PathLike) -> None:
    """One panel per suite: a bar per task (its success rate) with the Wilson 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = summary["suites"]
    widest = max(len(s["tasks"]) for s in suites.values())
    fig, axes = plt.subplots(
        len(suites), 1, figsize=(max(6.0, 0.55 * widest + 2), 3.2 * len(suites)), squeeze=False, dpi=80
    )
    for ax, (name, s) in zip(axes[:, 0], suites.items()):
        ids = list(s["tasks"])
        rates = np.array([s["tasks"][t]["success_rate"] for t in ids])
        lo = np.array([s["tasks"][t]["ci95"][0] for t in ids])
        hi = np.array([s["tasks"][t]["ci95"][1] for t in ids])
        ax.bar(range(len(ids)), rates, yerr=[rates - lo, hi - rates], capsize=3, color="tab:blue")
        ax.set_xticks(range(len(ids)), ids)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("task id")
        ax.set_ylabel("success")
        lo_s, hi_s = s["ci95"]
        ax.set_title(f"{name}: {s['success_rate']:.1%} of {s['episodes']} episodes (95% CI {lo_s:.1%}-{hi_s:.1%})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def video_path(out_dir: os.PathLike, rec: dict) -> Path:
    tag = "success" if rec["success"] else "failure"
    return (
        Path(out_dir)
        / "videos"
        / f"{rec['suite']}--task{int(rec['task_id']):02d}--trial{int(rec['trial']):02d}--{tag}.gif"
    )


def save_gif(frames, path: os.PathLike, fps: int = 10, size: int = 128) -> Path:
    """uint8 frames `[H, W, 3]` -> an animated GIF (Pillow, no video codec needed), shrunk to
    `size` pixels on a side to stay small (one LIBERO episode: up to 530 frames)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [
        Image.fromarray(np.asarray(f)).resize((size, size), Image.BILINEAR)  # pyright: ignore[reportAttributeAccessIssue]
        for f in frames
    ]
    if not images:
        raise ValueError("no frames to write")
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path
