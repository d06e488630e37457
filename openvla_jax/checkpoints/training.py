"""Training checkpoints: orbax `CheckpointManager` + a per-step integrity manifest + side files.

Layout of a work dir:
  checkpoints/<step>/params/        orbax item: the params (restorable alone, e.g. for export)
  checkpoints/<step>/opt_state/     orbax item: the optimizer state
  checkpoints/<step>/meta/          orbax JSON item: step, rng key data, data position, ...
  checkpoints/<step>/manifest.json  ours: relative path -> size, crc32 of every item file
  data_state/<step>/process_<i>/    the data iterator position of host i (`data/iterator.py`)
  config.json, dataset_statistics.json   beside them, written atomically by process 0

Saves are async: the arrays are copied off the devices in `save` and written in a background
thread; orbax writes into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` when every host
is done. We write the manifest inside the temp dir just before that rename (orbax's
`post_finalization_callback`, primary host only), so a visible step dir carries its manifest and a
crash anywhere before the rename leaves only a temp dir, which orbax 0.12.8 neither lists as a step
nor resumes (and `cleanup_tmp_directories` deletes on the next start). A step dir without a
manifest (a checkpoint written by something else, or a copy) is skipped for resume with a warning;
a manifest that disagrees with the files fails `restore` with `CheckpointError` (never a silent
fresh start). A background save that fails is found by `poll()` (non-blocking, meant for every
training step), not only by the next `save`: at 7B the next save is hours away.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn

from openvla_jax.utils.files import atomic_write_text

log = logging.getLogger(__name__)

ITEMS = ("params", "opt_state", "meta")
MANIFEST = "manifest.json"
COMMITTED = "commit_success.txt"  # orbax writes it in every finalized step dir (local and GCS)
TMP_SUFFIX = ".orbax-checkpoint-tmp"
_CHUNK = 16 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted: missing/truncated/corrupt file, failed or absent save."""


# --- side files and manifests ----------------------------------------------------------------------


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def build_manifest(step_dir, checksum: bool = True) -> dict:
    """{relative path: {"size": bytes[, "crc32": hex]}} of every file under the item dirs.

    Only the item dirs: orbax rewrites `_CHECKPOINT_METADATA` and adds `commit_success.txt` at the
    step root after our callback runs."""
    step_dir = Path(step_dir)
    files = {}
    for item in ITEMS:
        for p in sorted((step_dir / item).rglob("*")):
            if p.is_file():
                entry: dict[str, Any] = {"size": p.stat().st_size}
                if checksum:
                    entry["crc32"] = _crc32(p)
                files[str(p.relative_to(step_dir))] = entry
    return {"format": 1, "files": files}


def verify_manifest(step_dir, step: int, checksum: bool = True) -> dict:
    """Raise `CheckpointError` naming the step and file unless every manifest entry matches."""
    step_dir = Path(step_dir)
    path = step_dir / MANIFEST
    if not path.exists():
        raise CheckpointError(
            f"checkpoint step {step} at {step_dir} has no {MANIFEST}: the save did "
            "not finish (or was not written by TrainCheckpointer)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint step {step}: {path} is not valid JSON ({e})") from None
    for rel, want in manifest["files"].items():
        f = step_dir / rel
        if not f.is_file():
            raise CheckpointError(
                f"checkpoint step {step}: file {rel} is missing from {step_dir} (expected {want['size']} bytes)"
            )
        size = f.stat().st_size
        if size != want["size"]:
            raise CheckpointError(
                f"checkpoint step {step}: file {rel} is {size} bytes, expected "
                f"{want['size']} (truncated or overwritten)"
            )
        if checksum and "crc32" in want and _crc32(f) != want["crc32"]:
            raise CheckpointError(
                f"checkpoint step {step}: file {rel} has crc32 {_crc32(f)}, expected {want['crc32']} (corrupt)"
            )
    return manifest


def params_to_numpy(params):
    """Device arrays -> host NumPy arrays, one leaf at a time, each in its own dtype."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, nn.meta.unbox(params))


# --- the checkpointer ----------------------------------------------------------------------------


class TrainCheckpointer:
    """Async orbax checkpoints of (params, opt_state, meta) under `workdir/checkpoints`.

    save_every: steps between regular saves (`save(..., force=True)` saves off-schedule, e.g. at
    preemption). keep_last: the newest K checkpoints are kept; keep_every: plus every step that is a
    multiple of M. checksum: crc32 of every file in the manifest and on restore (reads the whole
    checkpoint once more each way; sizes alone, always checked, already catch truncation).
    """

    def __init__(
        self,
        workdir,
        *,
        save_every: int,
        keep_last: int,
        keep_every: Optional[int] = None,
        async_save: bool = True,
        checksum: bool = True,
    ):
        if save_every < 1 or keep_last < 1:
            raise ValueError(f"save_every and keep_last must be >= 1, got {save_every}, {keep_last}")
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / "checkpoints"
        self.async_save, self.checksum = async_save, checksum
        self._pending: Optional[int] = None
        self._callback_error: Optional[BaseException] = None
        self._failure: Optional[CheckpointError] = None  # a failed save, kept: raised again by every call
        self._quarantine_incomplete()
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            # Multiples of save_every only (orbax's default also saves the first step it sees).
            save_decision_policy=policies.AnySavePolicy(
                [policies.FixedIntervalPolicy(save_every), policies.PreemptionCheckpointingPolicy()]
            ),
            max_to_keep=keep_last,
            keep_period=keep_every,
            cleanup_tmp_directories=True,  # leftovers of a crashed save are never resumed anyway
            enable_async_checkpointing=True,  # always: the manifest hook exists only on this path
            async_options=ocp.AsyncOptions(post_finalization_callback=lambda: self._write_manifest()),
        )
        self._mngr = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    # ------------------------------------------------------------------------------------ saving
    def should_save(self, step: int) -> bool:
        return self._mngr.should_save(step)

    def save(self, step: int, params, opt_state, meta: dict, force: bool = False, data_iterator=None) -> bool:
        """Save if `step` is on schedule (or `force`) and not saved already; True if it saves.

        Call on every host. `meta` must be JSON-serialisable (step and rng key data as lists);
        `step` is added. With `data_iterator` (a `CheckpointableIterator`), its position is written
        to `data_state/<step>` first and recorded in meta as `data_state` / `data_position`."""
        # A failure poll() found stops here; not poll() itself: multi-process, a host that found one
        # alone would stop here while the others wait in the save's barrier (the loop stops them together).
        self._raise_failure()
        if step in self._mngr.all_steps() or (not force and not self._mngr.should_save(step)):
            return False
        self.wait()  # the previous save is finalized and checked; old data states pruned
        meta = dict(meta, step=int(step))
        if data_iterator is not None:
            data_iterator.save(self.data_state_dir(step))
            meta["data_state"] = str(self.data_state_dir(step).relative_to(self.workdir))
            meta["data_position"] = int(data_iterator.position)
        self._pending = int(step)
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(nn.meta.unbox(params)),
            opt_state=ocp.args.StandardSave(nn.meta.unbox(opt_state)),
            meta=ocp.args.JsonSave(_jsonable(meta)),
        )
        self._mngr.save(step, args=args, force=True)
        if not self.async_save:
            self.wait()
        return True

    def _write_manifest(self) -> None:
        """Orbax's post-finalization hook (primary host, background thread): all hosts have written
        the items into the temp dir, which is renamed to the step dir right after this returns."""
        step = self._pending
        try:
            tmp = sorted(self.directory.glob(f"{step}{TMP_SUFFIX}*"))
            step_dir = tmp[0] if tmp else self.directory / str(step)  # commit-file mode: no temp dir
            manifest = build_manifest(step_dir, self.checksum)
            manifest["step"] = step
            atomic_write_text(step_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        except BaseException as e:  # orbax only logs callback errors: keep it for wait() to raise
            self._callback_error = e
            raise

    def wait(self) -> None:
        """Block until the pending async save is on disk; raise `CheckpointError` if it failed."""
        self._raise_failure()
        step = self._pending
        try:
            self._mngr.wait_until_finished()
        except Exception as e:  # orbax re-raises what failed in its background thread, without the step
            self._fail(step, e)
        if self._callback_error is not None:
            self._fail(step, self._callback_error)
        self._pending = None
        if step is not None and jax.process_index() == 0 and not self._is_complete(step):
            self._failure = CheckpointError(
                f"checkpoint step {step} was not finalized in {self.directory} (see the orbax error logged above)"
            )
            raise self._failure
        self._prune_data_states()

    def poll(self) -> Optional[CheckpointError]:
        """The `CheckpointError` of a failed async save once its background work has ended, else None.

        Non-blocking (a flag read while a save is in flight): call it every step, so that a failed
        save stops the run at the next step rather than at the next save. A save found finished is
        checked here (and old data states pruned), as `wait` does. The error is kept: later calls
        of `poll` return it and `save` / `wait` raise it."""
        if self._failure is None and self._pending is not None:
            if self._callback_error is not None or not self._mngr.is_saving_in_progress():
                try:
                    self.wait()  # the background work has ended: this joins at once
                except CheckpointError:
                    pass  # kept in self._failure
        return self._failure

    def _fail(self, step, e: BaseException):
        what = "writing its manifest" if self._callback_error is not None else "writing it"
        self._callback_error, self._pending = None, None
        self._failure = CheckpointError(
            f"checkpoint step {step} failed in the background ({what} in {self.directory}): {_cause(e)}"
        )
        raise self._failure from e

    def _raise_failure(self):
        if self._failure is not None:
            raise self._failure

    def close(self) -> None:
        """Wait for the pending save, then stop orbax's threads. After a failed save, raised already,
        close quietly: the same failure again, or orbax's own re-raise of it, would only bury it."""
        try:
            if self._failure is None:
                self.wait()
        finally:
            try:
                self._mngr.close()
            except Exception as e:
                if self._failure is None:
                    raise
                log.debug("closing the checkpoint manager after a failed save: %r", e)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------------ reading
    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def data_state_dir(self, step: int) -> Path:
        return self.workdir / "data_state" / str(step)

    def _quarantine_incomplete(self) -> None:
        """Rename step dirs without a manifest to `<step>.incomplete-<time>` (process 0), so that
        orbax neither counts them nor refuses to save that step again; they are kept for inspection."""
        if jax.process_index() == 0 and self.directory.exists():
            for d in self.directory.iterdir():
                if d.is_dir() and d.name.isdigit() and not self._is_complete(int(d.name)):
                    aside = d.with_name(f"{d.name}.incomplete-{int(time.time())}")
                    log.warning(
                        "checkpoint step dir %s has no %s or %s: an interrupted save; moved to %s and not resumed",
                        d,
                        MANIFEST,
                        COMMITTED,
                        aside.name,
                    )
                    os.replace(d, aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("TrainCheckpointer:quarantine")

    def _is_complete(self, step: int) -> bool:
        d = self.step_dir(step)
        return (d / MANIFEST).exists() and (d / COMMITTED).exists()

    def all_steps(self) -> list[int]:
        """Complete steps on disk (finalized, with a manifest), ascending. Others are warned about."""
        if not self.directory.exists():
            return []
        steps = []
        for d in self.directory.iterdir():
            if not (d.is_dir() and d.name.isdigit()):
                continue
            if self._is_complete(int(d.name)):
                steps.append(int(d.name))
            else:
                log.warning(
                    "checkpoint step dir %s has no %s or %s: an interrupted save, skipped", d, MANIFEST, COMMITTED
                )
        return sorted(steps)

    def incomplete_step_dirs(self) -> list[str]:
        """Names of the step dirs that cannot be resumed: without a manifest or orbax's commit file,
        or moved aside as `<step>.incomplete-<time>` by an earlier start. (Orbax's temp dirs of a
        save that never finished are not counted: such a run had nothing complete to lose.)"""
        if not self.directory.exists():
            return []
        names = []
        for d in self.directory.iterdir():
            step = d.name.split(".incomplete-")[0]
            if d.is_dir() and step.isdigit() and (d.name != step or not self._is_complete(int(step))):
                names.append(d.name)
        return sorted(names, key=lambda n: (int(n.split(".")[0]), n))

    def latest_step(self) -> Optional[int]:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _resolve(self, step: Optional[int]) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no complete checkpoint in {self.directory}")
        elif not self.step_dir(step).exists():
            raise CheckpointError(f"no checkpoint step {step} in {self.directory}; complete steps: {self.all_steps()}")
        verify_manifest(self.step_dir(step), step, self.checksum)
        return int(step)

    def restore(self, step: Optional[int] = None, *, abstract_params, abstract_opt_state):
        """-> (params, opt_state, meta) of `step` (default: the latest complete one).

        `abstract_*`: trees of `jax.ShapeDtypeStruct` with `.sharding` (e.g. from
        `jax.eval_shape` + the sharding rules): each host reads only its shards, placed directly
        with those shardings, so a sharded 7B state is never gathered on one host."""
        step = self._resolve(step)
        out = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(nn.meta.unbox(abstract_params)),
                opt_state=ocp.args.StandardRestore(nn.meta.unbox(abstract_opt_state)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out["params"], out["opt_state"], out["meta"]

    def restore_params(self, step: Optional[int] = None, abstract_params=None):
        """The params item alone. Without `abstract_params`: the whole tree on one device (the
        first local one), in the saved dtypes -- for export and inference on one host."""
        step = self._resolve(step)
        if abstract_params is None:
            meta = self._mngr.item_metadata(step)["params"]
            dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract_params = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), meta)
        out = self._mngr.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(nn.meta.unbox(abstract_params)))
        )
        return out["params"]

    def restore_meta(self, step: Optional[int] = None) -> dict:
        step = self._resolve(step)
        return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_data_iterator(self, step: int, iterator) -> None:
        """Put `iterator` (a `CheckpointableIterator`) at the position saved with `step`."""
        try:
            iterator.restore(self.data_state_dir(step))
        except Exception as e:
            raise CheckpointError(
                f"checkpoint step {step}: data iterator state in {self.data_state_dir(step)} cannot be restored: {e}"
            ) from e

    def _prune_data_states(self) -> None:
        """Drop this host's data states of steps orbax no longer keeps (after its deletions ran)."""
        root = self.workdir / "data_state"
        if not root.exists():
            return
        keep = set(self._mngr.all_steps()) | ({self._pending} if self._pending is not None else set())
        for d in root.iterdir():
            if d.name.isdigit() and int(d.name) not in keep and not self.step_dir(int(d.name)).exists():
                shutil.rmtree(d / f"process_{jax.process_index()}", ignore_errors=True)
                try:
                    d.rmdir()
                except OSError:
                    pass  # other hosts' states still in it

    # --------------------------------------------------------------------------------- side files
    def write_config(self, config) -> Optional[Path]:
        """`workdir/config.json` (a ConfigDict, dict or JSON string); process 0 only."""
        text = (
            config
            if isinstance(config, str)
            else (
                config.to_json(indent=2, sort_keys=True)
                if hasattr(config, "to_json")
                else json.dumps(_jsonable(config), indent=2, sort_keys=True)
            )
        )
        return self._write_side("config.json", text)

    def write_dataset_statistics(self, stats: dict) -> Optional[Path]:
        return self._write_side("dataset_statistics.json", json.dumps(_jsonable(stats), indent=2))

    def read_dataset_statistics(self) -> Optional[dict]:
        path = self.workdir / "dataset_statistics.json"
        return json.loads(path.read_text()) if path.exists() else None

    def _write_side(self, name: str, text: str) -> Optional[Path]:
        if jax.process_index() != 0:
            return None
        return atomic_write_text(self.workdir / name, text.rstrip("\n") + "\n")

    def export_for_inference(
        self, step: Optional[int], out_dir, model_config, norm_stats=None, tokenizer_dir=None, params=None
    ) -> Path:
        """Write the converted layout `OpenVLA.load` reads (`checkpoints.converted.save_converted`):
        params of `step` (or the given `params`) as NumPy in their dtype, model config, norm stats
        (default: `workdir/dataset_statistics.json`) and the tokenizer files of `tokenizer_dir`.
        Single process only: the converted format is written by one orbax PyTreeCheckpointer."""
        from openvla_jax.checkpoints.converted import save_converted

        if jax.process_count() > 1:
            raise NotImplementedError(
                "export_for_inference runs in one process; export from a "
                "single-host job that calls restore_params(step) on one device"
            )
        if params is None:
            params = self.restore_params(step)
        if norm_stats is None:
            norm_stats = self.read_dataset_statistics()
        return save_converted(out_dir, model_config, params_to_numpy(params), norm_stats, tokenizer_dir)


def _cause(e: BaseException) -> str:
    """`OSError: [Errno 28] No space left on device: 'path'`: the type and message of the root cause."""
    while e.__cause__ is not None and e.__cause__ is not e:
        e = e.__cause__
    return f"{type(e).__name__}: {e}"


def _jsonable(x: Any) -> Any:
    """NumPy/JAX scalars and arrays -> Python numbers and lists (json.dumps-able)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)  # typed keys -> their uint32 data
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x
