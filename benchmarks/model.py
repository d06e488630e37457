"""Model benchmark cases: JAX against the PyTorch reference of the same config, in one process.

Every case returns rows (dicts) with the same core fields (see `pair_row`): `jax_s` / `torch_s`
(median seconds of one unit: each function in its own block, or with `opts.interleave` in rounds
of one call each; see `utils.timing.interleaved_medians`), `jax_per_s` / `torch_per_s` (units per
second), `ratio` = jax_per_s / torch_per_s (> 1: JAX faster), `torch_setting` (the faster of fp32
and bf16 autocast, both timed and kept as `torch_fp32_s` / `torch_bf16_s`), `flops` per unit,
`jax_flops_per_s` and `mfu` ("n/a" without a known or given peak). PyTorch always runs with sdpa
attention ("at its best settings").
Same random weights on both sides. JAX is timed likewise in each of `opts.jax_dtypes` (fp32: results
identical to the fp32 reference; bf16 compute) and its faster one is `jax_s` / `jax_setting`.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable

import numpy as np

from benchmarks.suite import Options, pair_row
from openvla_jax.utils.profiling import trace
from openvla_jax.utils.timing import interleaved_medians

INSTRUCTIONS = [
    "pick up the red block",
    "open the top drawer",
    "put the green cup to the left of the big bowl",
    "push the blue button",
]


def _torch():
    from openvla_jax.testing.torch_compat import import_torch

    return import_torch(os.cpu_count() or 1)


def profile_once(opts: Options, name: str, fn: Callable[[], object]) -> None:
    """With --profile: one more (warm) call of a JAX function under a trace, after the timing, so the
    trace holds only JAX work and the timings carry no profiler overhead."""
    if opts.profile_dir:
        with trace(opts.profile_dir, name):
            fn()


def torch_settings(fn: Callable[[], object]) -> dict:
    """PyTorch's two candidate settings for the same work: fp32, and under CPU bf16 autocast."""
    torch = _torch()

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn()

    return dict(torch_fp32=fn, torch_bf16=bf16)


def torch_best(times: dict, scale: float = 1.0) -> dict:
    """The faster of the two timed settings is PyTorch's best. `scale` multiplies every time (e.g. b
    single calls). -> torch_s, torch_setting, torch_fp32_s, torch_bf16_s."""
    fp32, bf16 = times["torch_fp32"] * scale, times["torch_bf16"] * scale
    best = "bf16 autocast + sdpa" if bf16 < fp32 else "fp32 + sdpa"
    return dict(torch_s=min(fp32, bf16), torch_setting=best, torch_fp32_s=fp32, torch_bf16_s=bf16)


def random_params(model_config, seed: int = 0) -> dict:
    """NumPy fp32 params of the VLA from its abstract shapes (norm scales ~1, the rest ~N(0, 0.02)):
    weights for timing without building the PyTorch reference."""
    import flax.linen as nn
    import jax

    from openvla_jax.models import vla
    from openvla_jax.train.optimizer import param_paths
    from openvla_jax.train.step import abstract_params

    rng = np.random.default_rng(seed)
    shapes = nn.meta.unbox(abstract_params(vla.from_config(model_config)))
    return jax.tree.map(
        lambda x, path: (
            np.ones(x.shape, np.float32)
            if path.endswith("scale")
            else (0.02 * rng.standard_normal(x.shape, np.float32))
        ),
        shapes,
        param_paths(shapes),
    )


def jax_best(times: dict, key: Callable[[str], str], dtypes) -> dict:
    """The faster of the JAX compute dtypes timed (`times[key(dtype)]`). -> jax_s, jax_setting, jax_<dtype>_s."""
    per = {d: times[key(d)] for d in dtypes}
    best = min(per, key=per.get)
    return dict(jax_s=per[best], jax_setting=f"{best} compute", **{f"jax_{d}_s": t for d, t in per.items()})


def case_llama(variant: str, opts: Options) -> list[dict]:
    """Forward tokens/s of the Llama decoder: jitted Flax vs transformers LlamaForCausalLM (sdpa)."""
    import jax

    from configs import model as model_configs
    from openvla_jax.convert.llama import llama_specs
    from openvla_jax.convert.mapping import hf_to_flax
    from openvla_jax.models import llama
    from openvla_jax.testing.torch_compat import transformers_llama

    torch = _torch()
    config = llama.LlamaConfig.from_dict(model_configs.get_config(variant).llm)
    b, t = opts.batch, opts.seq_len
    hf = transformers_llama(config, attn_implementation="sdpa")
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    params = jax.device_put(hf_to_flax(llama_specs(config, scanned=False), sd))
    tokens = np.random.default_rng(0).integers(1, config.vocab_size, (b, t)).astype(np.int32)
    module = llama.Llama(config)
    fwd = jax.jit(lambda p, x: module.apply({"params": p}, x)[0])
    tt = torch.tensor(tokens, dtype=torch.long)
    run = lambda: jax.block_until_ready(fwd(params, tokens))  # noqa: E731
    with torch.inference_mode():
        times = interleaved_medians(
            dict(jax=run, **torch_settings(lambda: hf(input_ids=tt).logits)),
            repeats=opts.repeats,
            rounds=opts.interleave,
        )
    profile_once(opts, f"llama_{variant}", run)
    jax_s, ref = times["jax"], torch_best(times)
    n_params = sum(x.size for x in jax.tree.leaves(params)) - config.vocab_size * config.hidden_size
    flops = 2.0 * n_params * b * t + 4.0 * config.num_hidden_layers * config.hidden_size * t * t * b
    return [pair_row(opts, "llama_forward", variant, "tokens", b * t, jax_s, ref, flops, batch=b, seq_len=t)]


def case_predict(variant: str, opts: Options) -> list[dict]:
    """predict_action, 256x256 uint8 images in, 7 actions out, preprocessing and tokenization included.
    JAX: one jitted batched call per batch (prefill + 6 cached steps in a `lax` loop). PyTorch: the
    reference (timm + transformers, sdpa, KV-cached greedy), one call per image as the original is
    batch-1 only; its per-call time is measured over `opts.torch_calls` single calls and is the same
    for every batch row, so a row's ratio is (batched JAX rate) / (rate of single PyTorch calls)."""
    import jax

    from configs import model as model_configs
    from openvla_jax.convert.hf import vla_specs
    from openvla_jax.convert.mapping import hf_to_flax
    from openvla_jax.data.normalize import action_stats, unnormalize
    from openvla_jax.models.preprocess import preprocess_images
    from openvla_jax.policy import OpenVLA
    from openvla_jax.testing.torch_reference import build_torch_vla, hf_state_dict
    from openvla_jax.tokenizer.prompt import inference_prompt_ids
    from openvla_jax.tokenizer.small_spm import write_sentencepiece
    from openvla_jax.train.flops import predict_flops

    torch = _torch() if opts.torch else None
    cfg = model_configs.get_config(variant)
    ref = build_torch_vla(cfg, seed=0, attn_implementation="sdpa", randomize=False) if opts.torch else None
    params = (
        hf_to_flax(vla_specs(cfg, False), {k: v.numpy() for k, v in hf_state_dict(ref).items()})
        if opts.torch
        else random_params(cfg)
    )
    stats = {"demo": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}}}
    tok = write_sentencepiece(tempfile.mkdtemp(), INSTRUCTIONS)
    models = {d: OpenVLA(cfg, params, stats, tok, dtype=d) for d in opts.jax_dtypes}
    # fp32 for the parity check against PyTorch; without PyTorch any of the timed models will do
    vla = models.get("float32") or (
        OpenVLA(cfg, params, stats, tok, dtype="float32") if opts.torch else next(iter(models.values()))
    )
    rng = np.random.default_rng(0)

    def torch_predict(images, texts):
        out = []
        with torch.inference_mode():
            for image, text in zip(images, texts):  # the original takes one image per call
                pv = torch.from_numpy(preprocess_images(image[None]).transpose(0, 3, 1, 2).copy())
                ids = torch.tensor([inference_prompt_ids(vla.tokenizer, text)], dtype=torch.long)
                tokens = ref.greedy_ids(pv, ids, vla.action_dim).numpy()
                out.append(
                    unnormalize(vla.action_tokenizer.decode(tokens).astype(np.float64), action_stats(stats, "demo"))[0]
                )
        return np.stack(out)

    n = opts.torch_calls
    images = rng.integers(0, 256, (max(max(opts.predict_batches), n), 256, 256, 3), dtype=np.uint8)
    texts = [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(len(images))]
    weights = 2 * sum(x.size for x in jax.tree.leaves(params))  # what batch-1 decoding reads per token in bf16
    prompt = max(len(inference_prompt_ids(vla.tokenizer, t)) for t in INSTRUCTIONS)
    diffs = (
        {
            b: float(
                np.abs(vla.predict_action(images[:b], texts[:b], "demo") - torch_predict(images[:b], texts[:b])).max()
            )
            for b in opts.predict_batches
        }
        if ref
        else {}
    )
    fns = {
        f"jax_{d}_{b}": (lambda m=m, b=b: m.predict_action(images[:b], texts[:b], "demo"))
        for d, m in models.items()
        for b in opts.predict_batches
    }
    if ref is not None:
        fns.update(torch_settings(lambda: torch_predict(images[:n], texts[:n])))
    times = interleaved_medians(fns, repeats=opts.repeats, rounds=opts.interleave)
    rows = []
    for b in opts.predict_batches:  # PyTorch: b single calls take b x (one call)
        jax_t = jax_best(times, lambda d: f"jax_{d}_{b}", opts.jax_dtypes)
        profile_once(opts, f"predict_{variant}_b{b}", fns[f"jax_{jax_t['jax_setting'].split()[0]}_{b}"])
        extra = dict(max_action_diff_fp32=diffs[b]) if ref is not None else {}
        rows.append(
            pair_row(
                opts,
                "predict_action",
                variant,
                "actions",
                b,
                jax_t.pop("jax_s"),
                torch_best(times, b / n) if ref is not None else None,
                predict_flops(cfg, b, prompt),
                batch=b,
                weights_bytes_bf16=weights,
                **extra,
                **jax_t,
            )
        )
    return rows


def case_train(variant: str, opts: Options) -> list[dict]:
    """One optimizer step (forward, backward, clip 1.0, AdamW) on the same batch and weights: our jitted
    step (lm_head at the supervised positions only, the default; and at every position as the original)
    vs the PyTorch reference (timm + transformers sdpa, torch AdamW + clip_grad_norm_, HF-style loss
    over all logits). Units: samples (rows)."""
    import jax

    from configs import model as model_configs
    from openvla_jax.convert.hf import vla_specs
    from openvla_jax.convert.mapping import hf_to_flax
    from openvla_jax.models import vla
    from openvla_jax.parallel.batch import global_batch
    from openvla_jax.parallel.mesh import make_mesh
    from openvla_jax.testing.synthetic import synthetic_batch
    from openvla_jax.testing.torch_reference import build_torch_vla, hf_state_dict
    from openvla_jax.train.optimizer import default_optimizer_config, make_optimizer
    from openvla_jax.train.step import abstract_params, init_train_state, make_train_step

    torch = _torch() if opts.torch else None
    cfg = model_configs.get_config(variant)
    b, t = opts.batch, opts.train_len
    ref = params = None  # without PyTorch: params initialised on device, already sharded
    if opts.torch:
        ref = build_torch_vla(cfg, seed=0, attn_implementation="sdpa", randomize=False).train()
        params = hf_to_flax(vla_specs(cfg, False), {k: v.numpy() for k, v in hf_state_dict(ref).items()})
    batch = synthetic_batch(b, t, cfg.vision.image_size)
    module = vla.from_config(cfg, dtype="float32")  # for the abstract params / patches (dtype-free)
    mesh = make_mesh()
    tx, schedule = make_optimizer(default_optimizer_config(), abstract_params(module))
    device_batch = global_batch(batch, mesh)
    # One train state (fp32 master params + Adam moments: 12 bytes per parameter, 90 GB at 7B) shared
    # by every JAX variant, each step passing it on (donated); the variants differ in compute only.
    state = [init_train_state(module, cfg, tx, mesh, None, jax.random.key(0), params=params)]
    del params
    fns = {}
    # Compute in each dtype, as the train config's model.dtype does. Full logits (as the original
    # computes them) in the first dtype only: a comparison, not a setting.
    for name, dtype, k in [(f"jax_{d}", d, 8) for d in opts.jax_dtypes] + [
        ("jax_full_logits", opts.jax_dtypes[0], None)
    ]:
        step = make_train_step(vla.from_config(cfg, dtype=dtype), tx, schedule, mesh, supervised_tokens=k)

        def run(step=step):
            state[0], metrics = step(state[0], device_batch)
            return jax.block_until_ready(metrics)

        fns[name] = run
    p = module.num_patches
    if ref is None:
        times = interleaved_medians(fns, repeats=opts.repeats, rounds=opts.interleave)
        return _train_rows(opts, variant, cfg, times, fns, b, t, p)
    opt = torch.optim.AdamW(ref.parameters(), lr=2e-5, weight_decay=0.0)
    pv = torch.from_numpy(batch["pixel_values"].transpose(0, 3, 1, 2).copy())
    ids = torch.from_numpy(batch["input_ids"]).long()
    mask = torch.from_numpy(batch["attention_mask"]).long()
    labels = torch.from_numpy(batch["labels"]).long()

    def torch_step():
        opt.zero_grad(set_to_none=True)
        logits = ref(pv, ids, mask)
        loss = torch.nn.functional.cross_entropy(
            logits[:, p:-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        return loss

    times = interleaved_medians(dict(fns, **torch_settings(torch_step)), repeats=opts.repeats, rounds=opts.interleave)
    return _train_rows(opts, variant, cfg, times, fns, b, t, p, torch_best(times))


def _train_rows(opts: Options, variant: str, cfg, times: dict, fns, b: int, t: int, p: int, ref_t=None) -> list[dict]:
    from openvla_jax.train.flops import step_flops

    jax_t = jax_best(times, lambda d: f"jax_{d}", opts.jax_dtypes)
    if fns is not None:
        profile_once(opts, f"train_{variant}", fns[f"jax_{jax_t['jax_setting'].split()[0]}"])
    common = dict(batch=b, seq_len=t, tokens_per_step=b * (t + p))
    return [
        pair_row(
            opts,
            "train_step",
            variant,
            "samples",
            b,
            jax_t.pop("jax_s"),
            ref_t,
            step_flops(cfg, b, t, 8),
            jax_impl="logits at 8 supervised positions",
            **jax_t,
            **common,
        ),
        pair_row(
            opts,
            "train_step",
            variant,
            "samples",
            b,
            times["jax_full_logits"],
            ref_t,
            step_flops(cfg, b, t, None),
            jax_impl="logits at every position",
            jax_setting=f"{opts.jax_dtypes[0]} compute",
            **common,
        ),
    ]
