"""Writing so that a crash never leaves a file or directory that looks complete, and reading JSON
with errors that name the file.

    with atomic_output(out_dir) as tmp:   # write everything into tmp; renamed to out_dir at the end
        ...
    atomic_write_text(path, text)          # temp file in the same directory + rename
    write_json(path, obj) / read_json(path)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, os.PathLike]


def atomic_dir(out_dir: PathLike) -> Path:
    """A fresh temp directory beside `out_dir` (same filesystem, so the final rename is atomic)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"output directory {out_dir} exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))


def commit_dir(tmp: Path, out_dir: PathLike) -> None:
    """Rename the finished temp directory `tmp` to `out_dir` (which may exist, empty)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        out_dir.rmdir()  # empty (checked in atomic_dir)
    os.replace(tmp, out_dir)


@contextlib.contextmanager
def atomic_output(out_dir: PathLike) -> Iterator[Path]:
    """`with atomic_output(out) as tmp:` write into `tmp`; renamed to `out` only if the block
    completes, removed on any error or interrupt (a partial output never looks complete)."""
    tmp = atomic_dir(out_dir)
    try:
        yield tmp
        commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write `text` to `path` via a temp file in the same dir + rename (readers never see a part)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path: PathLike, obj: Any, indent: int = 2) -> Path:
    """`obj` as JSON at `path`, atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def read_json(path: PathLike, what: str = "JSON file") -> Any:
    """The JSON value in `path`; a missing or malformed file raises an error naming the path."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None
