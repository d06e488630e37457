"""The training loop: config -> sharded state -> steps -> metrics and checkpoints, resumable.

    summary = train(get_config("demo"), workdir="runs/demo")

What happens, in order:
  1. multi-process set-up (`parallel.distributed.maybe_initialize`), the mesh from `config.mesh`;
  2. the data pipeline (this host's slice of the global batch) wrapped in a `CheckpointableIterator`;
  3. the state: resumed from the work dir's latest complete checkpoint (params, optimizer state,
     step, RNG and the data iterator position: a resumed run sees the same batches), else loaded
     from `config.init_from` (a converted checkpoint), else initialised; always created sharded;
  4. steps: jitted, state donated; metrics every `log_every` steps to `metrics.jsonl` and TensorBoard
     (`workdir/tb`); periodic evaluation on the validation split; async checkpoints every
     `save_every`; SIGTERM -> a final save at the end of the current step, then a clean exit;
  5. a non-finite loss or gradient stops the run with `TrainingDiverged` (the step left the state
     untouched, and the last good checkpoint is kept: nothing after it is saved); an async save
     that failed stops it at the next step with `CheckpointError` naming the cause;
  6. at the end: a final checkpoint and an export `OpenVLA.load` reads (`workdir/export`).

A work dir holds one run: a second trainer on it stops with `WorkdirLocked` (`train/lock.py`); a
work dir whose checkpoint dirs are all incomplete is not silently trained over from step 0 (set
`train.allow_fresh_start`); a resumed run first drops the `metrics.jsonl` rows after the step it
resumes from, so every step has one row. Episodes the data pipeline skips are counted once each,
per dataset and reason, in the metrics (`data/skipped/<dataset>/<reason>`) and the summary (since
this process started: the counts are not checkpointed, `data/iterator.py`).

What is trained is a `train.trainable` object: every parameter (pretraining, full fine-tuning), or,
when the config has a `lora` section (`configs/finetune.py:lora`), LoRA adapters on the frozen base
of `config.init_from` (which then also writes `workdir/adapters` at every checkpoint, and exports
the base with the adapters merged unless `config.export_merged` is False). Same mesh, steps,
checkpoints, resume, evaluation, metrics and NaN guard either way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from openvla_jax.models.config import as_config

log = logging.getLogger(__name__)

TrainConfig = Any  # ml_collections.ConfigDict from configs/train.py / configs/finetune.py (fields are dynamic)


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the message names the step and the last checkpoint."""


# ----------------------------------------------------------------------------------- data + model
def data_config(config: TrainConfig, train: bool, dataset_statistics=None):
    from openvla_jax.data.rlds import DataConfig

    d = config.data
    auto = lambda n: -1 if n is None else n  # noqa: E731  (tf.data.AUTOTUNE is -1)
    opts = as_config(config.model).actions
    chunk, cams = opts.action_chunk, opts.num_images
    if chunk > 1 and (d.window_size, d.future_action_window_size) != (1, chunk - 1):
        raise ValueError(
            f"model.action_chunk={chunk} needs data.window_size=1 and "
            f"data.future_action_window_size={chunk - 1}; got {d.window_size} and "
            f"{d.future_action_window_size}"
        )
    extra = {}  # the OFT inputs: several cameras, proprio
    views = tuple(d.get("image_views", None) or ())
    if (views and len(views) != cams) or (not views and cams > 1):
        raise ValueError(f"model.num_images={cams} but data.image_views={views}: name one image view per camera")
    if views:
        extra["image_views"] = views
        extra["pad_missing_views"] = bool(d.get("pad_missing_views", False))
    if opts.proprio_dim:
        extra["proprio"] = True
    return DataConfig(
        **extra,
        data_dir=d.data_dir,
        mixture=d.mixture,
        train=train,
        batch_size=d.batch_size,
        image_size=config.model.vision.image_size,
        image_view=d.image_view,
        window_size=d.window_size,
        future_action_window_size=d.future_action_window_size,
        normalization=d.normalization,
        augment=d.augment,
        shuffle_buffer=d.shuffle_buffer,
        seed=config.seed,
        deterministic=d.deterministic,
        ram_budget_gb=d.ram_budget_gb,
        num_parallel_calls=auto(d.num_parallel_calls),
        num_parallel_reads=auto(d.num_parallel_reads),
        dataset_statistics=dataset_statistics,
        progress=jax.process_index() == 0,
    )


def trained_preprocessing(config: TrainConfig, pipeline) -> dict:
    """The image preprocessing an export records (`OpenVLA.image_resize` / `center_crop`): frames are
    resized as the training pipeline resized them, and center-cropped (area 0.9, as OpenVLA's
    evaluation) when training used random crops, so `predict_action` sees what training saw."""
    from openvla_jax.data.transforms import AUGMENT_DEFAULTS

    crop: Any = AUGMENT_DEFAULTS["crop_scale"] if config.data.augment else 0.0  # a float (crop_scale=0.9)
    return {"image_resize": pipeline.inference_resize, "center_crop": float(crop)}


def tokenizer_dir(config: TrainConfig) -> str:
    path = config.data.tokenizer_dir or config.init_from
    if not path or not (Path(path) / "tokenizer.model").exists():
        raise FileNotFoundError(
            f"no tokenizer.model in {path!r}: set --config.data.tokenizer_dir to a directory holding the "
            "Llama 2 tokenizer.model (an HF or converted openvla checkpoint has one), or init_from"
        )
    return str(path)


def supervised_tokens(config: TrainConfig) -> int | None:
    """Logits are computed only at this many supervised positions per row (see `train.step`):
    `train.supervised_tokens` if set (0 = every position), else the action tokens of one example
    (action_dim x (1 + future window)) + EOS."""
    k = config.train.get("supervised_tokens", None)
    if k is not None:
        return int(k) or None
    return as_config(config.model).action_dim * (1 + config.data.future_action_window_size) + 1


def build_module(config: TrainConfig):
    from openvla_jax.models import vla

    return vla.from_config(config.model, param_dtype="float32")


# ------------------------------------------------------------------------------------- metrics
class MetricsWriter:
    """`metrics.jsonl` (one JSON object per logged step) and TensorBoard scalars; main process only.

    resume_step: the step the run starts from. Rows after it were logged by a run that went on past
    its last checkpoint and was killed; the resumed run logs those steps again, so they are dropped
    first (0: a fresh run, every row goes)."""

    def __init__(self, workdir: Path, dataset_names, enabled: bool, resume_step: int = 0):
        self.enabled, self.names = enabled, list(dataset_names)
        self._tb = None
        if enabled:
            truncate_metrics(workdir / "metrics.jsonl", resume_step)
            self._jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)
            try:
                import tensorflow as tf

                self._tb = tf.summary.create_file_writer(str(workdir / "tb"))
            except Exception as e:  # TensorBoard is optional; the JSONL log is the record
                log.warning("no TensorBoard writer: %s", e)

    def write(self, step: int, metrics: dict, prefix: str = "train", extra: Optional[dict] = None) -> dict:
        """extra: already-named scalars written in the same row (e.g. `data/skipped_episodes`)."""
        flat = flatten_metrics(metrics, self.names, prefix)
        flat.update(extra or {})
        if self.enabled:
            self._jsonl.write(json.dumps(dict(step=step, **flat)) + "\n")
            if self._tb is not None:
                import tensorflow as tf

                with self._tb.as_default(step=step):
                    for k, v in flat.items():
                        if isinstance(v, (int, float)) and math.isfinite(v):
                            tf.summary.scalar(k, v)
                self._tb.flush()
        return flat

    def close(self):
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


def truncate_metrics(path: Path, last_step: int) -> int:
    """Drop the rows of `path` (metrics.jsonl) whose step is after `last_step`, and a torn last line
    (a run killed while writing it); rewritten atomically. -> how many rows were dropped."""
    from openvla_jax.utils.files import atomic_write_text

    if not path.exists():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            row_step = None
        if isinstance(row_step, int) and row_step <= last_step:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        log.warning("%s: dropped %d rows after step %d (logged past the checkpoint resumed)", path, dropped, last_step)
        atomic_write_text(path, "".join(line + "\n" for line in keep))
    return dropped


def skipped_episodes(pipeline) -> dict[str, dict[str, int]]:
    """{dataset: {reason: episodes}} the pipeline skipped so far, summed over hosts (a collective
    when multi-process: call it on every host at the same steps). Reasons: `prepare.SKIP_REASONS`."""
    from openvla_jax.data.prepare import SKIP_REASONS

    names = [name for name, _ in pipeline.mixture]
    local = pipeline.skipped.by_reason()
    counts = np.array([[local.get(d, {}).get(r, 0) for r in SKIP_REASONS] for d in names], np.int64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
    return {d: {r: int(n) for r, n in zip(SKIP_REASONS, row) if n} for d, row in zip(names, counts) if row.any()}


def skipped_metrics(skipped: dict[str, dict[str, int]]) -> dict:
    """-> `{"data/skipped_episodes": total, "data/skipped/<dataset>/<reason>": n, ...}`."""
    out: dict = {"data/skipped_episodes": sum(n for per in skipped.values() for n in per.values())}
    for d, per in skipped.items():
        out.update({f"data/skipped/{d}/{r}": n for r, n in per.items()})
    return out


def flatten_metrics(metrics: dict, dataset_names, prefix: str) -> dict:
    """`{"loss": x, "dataset_loss": [D]}` -> `{"train/loss": x, "train/<name>/loss": ...}` (floats)."""
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v)
        if k.startswith("dataset_"):
            if len(dataset_names) > 1:
                for name, x in zip(dataset_names, v.reshape(-1)):
                    out[f"{prefix}/{name}/{k[len('dataset_') :]}"] = float(x)
        else:
            out[f"{prefix}/{k}"] = float(v) if v.dtype != bool else bool(v)
    return out


# ----------------------------------------------------------------------------------------- train
def train(config: TrainConfig, workdir, *, on_step: Optional[Callable] = None) -> dict:
    """Run (or resume) training; returns a summary dict (final metrics, steps, export dir)."""
    from openvla_jax.parallel import distributed
    from openvla_jax.utils.compile_cache import enable_compilation_cache

    distributed.maybe_initialize()
    enable_compilation_cache(config.get("compilation_cache_dir"))  # or $OPENVLA_JAX_COMPILATION_CACHE
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    with _workdir_lock(workdir):  # before anything touches the work dir's checkpoints or metrics
        return _train(config, workdir, on_step)


@contextlib.contextmanager
def _workdir_lock(workdir: Path):
    """Process 0 holds `train/lock.py`'s lock for the run (the hosts share the work dir); every host
    raises `WorkdirLocked` when it is taken."""
    from openvla_jax.train.lock import WorkdirLock, WorkdirLocked

    lock, error = WorkdirLock(workdir), None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirLocked as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if not int(multihost_utils.broadcast_one_to_all(np.int32(error is None))) and error is None:
            error = WorkdirLocked(f"{workdir} is in use by another trainer (process 0's error names it)")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        lock.release()


def _train(config: TrainConfig, workdir: Path, on_step: Optional[Callable]) -> dict:
    from openvla_jax.checkpoints import training as ckpt_lib
    from openvla_jax.data.iterator import CheckpointableIterator
    from openvla_jax.data.rlds import RLDSPipeline
    from openvla_jax.parallel import rules as R
    from openvla_jax.parallel.batch import global_batch
    from openvla_jax.parallel.mesh import make_mesh
    from openvla_jax.tokenizer.actions import ActionTokenizer
    from openvla_jax.tokenizer.text import TextTokenizer
    from openvla_jax.train.preemption import PreemptionWatcher
    from openvla_jax.train.trainable import make_trainable

    main = jax.process_index() == 0
    tc = config.train
    mesh = make_mesh(config.mesh)
    rules = R.RULES
    tok_dir = tokenizer_dir(config)
    tokenizer = TextTokenizer(tok_dir)

    ckpt = ckpt_lib.TrainCheckpointer(
        workdir,
        save_every=tc.save_every,
        keep_last=tc.keep_last,
        keep_every=tc.keep_every or None,
        async_save=tc.async_save,
        checksum=tc.checksum,
    )
    latest = ckpt.latest_step()
    if latest is None and not tc.get("allow_fresh_start", False):
        leftovers = ckpt.incomplete_step_dirs()
        if leftovers:
            ckpt.close()
            raise ckpt_lib.CheckpointError(
                f"{ckpt.directory} holds checkpoint dirs {leftovers} but none is complete (a {ckpt_lib.MANIFEST} "
                f"and orbax's {ckpt_lib.COMMITTED}): this run would start over from step 0. Restore the "
                "missing files to resume, train into another --workdir, or set "
                "--config.train.allow_fresh_start=True to start over here (the dirs are kept)"
            )
    stats = ckpt.read_dataset_statistics() if latest is not None else None
    action_tokenizer = ActionTokenizer.for_model(config.model)
    pipeline = RLDSPipeline(data_config(config, train=True, dataset_statistics=stats), tokenizer, action_tokenizer)
    dataset_names = [name for name, _ in pipeline.mixture]
    if latest is None:
        ckpt.write_config(config)
        ckpt.write_dataset_statistics(pipeline.statistics)
    data = CheckpointableIterator(pipeline)

    module = build_module(config)
    k = supervised_tokens(config)
    # the whole model, or LoRA adapters on a frozen base (`config.lora`): its state, step and export
    trainable = make_trainable(config, module, mesh, rules, num_datasets=len(dataset_names), supervised_tokens=k)
    if latest is not None:
        state = _restore(ckpt, latest, trainable, data)
        log.info("resumed from step %d of %s", latest, workdir)
    else:
        state = trainable.init_state()
    state = trainable.prepare(state)  # e.g. frozen params cast to optimizer.frozen_dtype
    start = int(jax.device_get(state.step))
    log.info("training %s from step %d", trainable.describe(), start)
    # The run's RNG key data never changes (per-step keys are fold_in(rng, step)): read it once for
    # every checkpoint's meta instead of a device->host copy each step.
    meta = dict(rng=np.asarray(jax.device_get(state.rng)).tolist(), **trainable.meta())

    eval_fn = None
    if tc.eval_every and tc.eval_batches:
        eval_fn = _make_evaluator(
            config,
            module,
            mesh,
            rules,
            tokenizer,
            action_tokenizer,
            pipeline.statistics,
            dataset_names,
            trainable.params_shardings,
        )

    writer = MetricsWriter(workdir, dataset_names, main, resume_step=start)
    bar = None
    if main and tc.progress:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    last: dict = {}
    seq_tokens = 0
    t_last, steps_since = time.perf_counter(), 0
    stopped_by = None
    step = start
    pending: list = []  # (step, device metrics) since the last check: read only at checks

    def check(step_now: int) -> dict:
        """Host-side checks of the steps since the last one (one device->host copy): a step whose
        rows were dropped raises ValueError; a non-finite step raises TrainingDiverged (its update
        and, being sticky, every later one were skipped: the state is that of the step before).
        -> the latest step's metrics as host values."""
        got = jax.device_get(pending)
        pending.clear()
        for s, m in got:
            if float(m.get("dropped", 0)) and getattr(module, "parallel", False):
                raise ValueError(
                    f"step {s}: {int(m['dropped'])} rows do not hold exactly "
                    f"{module.num_action_positions} action tokens + EOS (model.action_chunk x action_dim): "
                    "set data.future_action_window_size = model.action_chunk - 1"
                )
            if float(m.get("dropped", 0)):
                raise ValueError(
                    f"step {s}: {int(m['dropped'])} supervised label tokens lie beyond the "
                    f"{k} per row the loss computes logits for (train.supervised_tokens); raise it, or set "
                    "it to 0 to compute logits at every position"
                )
            if not bool(m["finite"]):
                good = ckpt.latest_step()
                raise TrainingDiverged(
                    f"step {s}: loss {float(m['loss'])} / grad norm {float(m['grad_norm'])} "
                    f"is not finite; the update was skipped and training stopped. The last good checkpoint "
                    f"is step {good} in {ckpt.directory} (nothing after it was saved). Lower the learning "
                    "rate or check the data, then resume."
                )
        applied = int(jax.device_get(state.step))
        if applied != step_now:  # cannot happen without a non-finite step above; never save a wrong step
            raise TrainingDiverged(f"the state holds {applied} updates after {step_now} steps")
        return got[-1][1] if got else {}

    try:
        with PreemptionWatcher() as watcher:
            while step < tc.steps:
                host = next(data)
                batch = global_batch(host, mesh, dataset_names)
                seq_tokens = batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] + module.num_patches)
                state, metrics = trainable.step(state, batch, expected_step=step)
                step += 1
                steps_since += 1
                pending.append((step, metrics))
                logging_now = step % tc.log_every == 0 or step == tc.steps
                if logging_now or ckpt.should_save(step) or on_step is not None:
                    metrics = check(step)
                if bar is not None:
                    bar.update(1)
                    if logging_now:
                        bar.set_postfix(
                            loss=f"{float(metrics['loss']):.3f}",
                            acc=f"{float(metrics['action_accuracy']):.3f}",
                            refresh=False,
                        )
                if logging_now:
                    now = time.perf_counter()
                    dt = (now - t_last) / max(steps_since, 1)
                    metrics = dict(metrics, step_time=dt, tokens_per_s=seq_tokens / dt)
                    t_last, steps_since = now, 0
                    last = writer.write(step, metrics, extra=skipped_metrics(skipped_episodes(pipeline)))
                if eval_fn is not None and (step % tc.eval_every == 0 or step == tc.steps):
                    last.update(writer.write(step, eval_fn(trainable.model_params(state)), prefix="eval"))
                if tc.get("offline_eval_every") and (step % tc.offline_eval_every == 0 or step == tc.steps):
                    last.update(
                        writer.write(
                            step,
                            offline_eval(config, trainable.model_params(state), pipeline.statistics, tok_dir),
                            prefix="offline",
                        )
                    )
                if ckpt.save(step, state.params, state.opt_state, meta, data_iterator=data):
                    trainable.on_save(state, workdir)
                if on_step is not None:
                    on_step(step, metrics)
                # An async save that failed stops the run now, not at the next save (hours later at 7B).
                failure = ckpt.poll()
                if watcher.should_stop(step, failed=failure is not None):
                    if watcher.failed:
                        raise failure or ckpt_lib.CheckpointError(
                            f"step {step}: a checkpoint save failed on another host (its log names the cause)"
                        )
                    stopped_by = "preemption"
                    check(step)
                    if ckpt.save(step, state.params, state.opt_state, meta, force=True, data_iterator=data):
                        trainable.on_save(state, workdir)
                    log.warning("preemption signal: saved step %d, exiting", step)
                    break
            else:
                check(step)
                if ckpt.save(step, state.params, state.opt_state, meta, force=True, data_iterator=data):
                    trainable.on_save(state, workdir)
        ckpt.wait()
        skipped = skipped_episodes(pipeline)
        if skipped:
            log.warning("episodes skipped by the data pipeline since this run started: %s", skipped)
        summary: dict[str, Any] = dict(step=step, stopped_by=stopped_by or "done", workdir=str(workdir), **last)
        summary.update(trainable.summary(workdir), resumed_from=latest, skipped_episodes=skipped)
        if stopped_by is None and jax.process_count() == 1 and config.get("export_merged", True):
            export = Path(tc.export_dir) if tc.export_dir else workdir / "export"
            if export.exists():
                import shutil

                shutil.rmtree(export)
            model_config = as_config(config.model).replace(**trained_preprocessing(config, pipeline))
            trainable.export(state, ckpt, export, model_config, pipeline.statistics, tok_dir)
            summary["export"] = str(export)
    finally:
        if bar is not None:
            bar.close()
        writer.close()
        ckpt.close()
    return summary


def offline_eval(config: TrainConfig, params, statistics, tok_dir) -> dict:
    """`evaluate/offline.py` on the current params, where they are (sharded on the training mesh: the
    jitted greedy decoder runs partitioned like them), over `train.eval_batches` validation batches.
    Single process (the offline metrics are summed on one host)."""
    from openvla_jax.evaluate.offline import evaluate_offline
    from openvla_jax.policy import OpenVLA

    if jax.process_count() > 1:
        log.warning("offline evaluation runs single-process only; skipped")
        return {}
    vla = OpenVLA(config.model, params, statistics, tok_dir, dtype=config.model.dtype)
    cfg = data_config(config, train=False, dataset_statistics=statistics)
    cfg.progress = False
    overall = evaluate_offline(vla, cfg, max_batches=config.train.eval_batches, episodes_to_plot=0)["metrics"][
        "overall"
    ]
    return {k: v for k, v in overall.items() if isinstance(v, (int, float))}


def _restore(ckpt, step: int, trainable, data):
    """The state and data position of checkpoint `step`, placed with the trainable's shardings."""
    from openvla_jax.train.state import TrainState

    def check(saved: dict):
        want = trainable.meta().get("lora")
        if saved.get("lora") != want:
            raise ValueError(
                f"{ckpt.directory}/{step} was trained with LoRA {saved.get('lora')}, this run asks for {want}: "
                "use another --workdir or the same config.lora"
            )

    if trainable.lora is not None:  # before the arrays: another rank would fail on shapes first
        check(ckpt.restore_meta(step))  # (a LoRA checkpoint is small: verifying it twice is cheap)
    shardings = trainable.shardings
    abs_params = trainable.abstract_params()
    abs_opt = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(trainable.optimizer.init, abs_params),
        shardings.opt_state,
    )
    params, opt_state, meta = ckpt.restore(step, abstract_params=abs_params, abstract_opt_state=abs_opt)
    check(meta)
    ckpt.restore_data_iterator(step, data)
    rep = shardings.step
    rng = jax.device_put(np.asarray(meta["rng"], np.uint32), rep)
    return TrainState(
        step=jax.device_put(jnp.asarray(step, jnp.int32), rep), params=params, opt_state=opt_state, rng=rng
    )


def _make_evaluator(
    config: TrainConfig, module, mesh, rules, tokenizer, action_tokenizer, statistics, dataset_names, params_shardings
):
    """-> fn(params) -> metrics over `eval_batches` batches of the validation split (a fresh,
    deterministic pass each time, so numbers are comparable across steps)."""
    from openvla_jax.data.rlds import RLDSPipeline
    from openvla_jax.parallel.batch import global_batch
    from openvla_jax.train.loss import summarize
    from openvla_jax.train.step import make_eval_step

    eval_step = make_eval_step(
        module,
        mesh,
        rules,
        num_datasets=len(dataset_names),
        params_shardings=params_shardings,
        supervised_tokens=supervised_tokens(config),
    )
    cfg = data_config(config, train=not config.data.eval_split, dataset_statistics=statistics)

    def evaluate(params):
        pipeline = RLDSPipeline(cfg, tokenizer, action_tokenizer)
        total = None
        for i, host in enumerate(pipeline):
            if i >= config.train.eval_batches:
                break
            sums = jax.device_get(eval_step(params, global_batch(host, mesh, dataset_names)))
            total = sums if total is None else jax.tree.map(np.add, total, sums)
        if total is None:
            return {}
        return jax.device_get(summarize(jax.tree.map(jnp.asarray, total)))

    return evaluate
