"""Benchmark suite: JAX against the PyTorch reference, same config, same machine, one run.

  python scripts/bench.py --case llama --config tiny,small --out results.json

Each case warms up, reports the median over repeats and the JAX/PyTorch speed ratio. Results are
printed as one line per measurement and optionally written as JSON.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

flags.DEFINE_string("case", "llama", "comma-separated cases, or 'all'")
FLAGS = flags.FLAGS
flags.DEFINE_string("config", "tiny,small", "comma-separated model variants from configs/model.py")
flags.DEFINE_integer("batch", 8, "batch size for model cases")
flags.DEFINE_integer("seq_len", 128, "sequence length for the Llama forward case")
flags.DEFINE_integer("repeats", 5, "timed repeats (median reported)")
flags.DEFINE_string("out", None, "write results as JSON here")
flags.DEFINE_integer("train_len", 48, "text tokens per row for the train case (plus the image patches)")
flags.DEFINE_float("peak_tflops", None, "peak TFLOP/s of one device for MFU (default: known accelerators)")
flags.DEFINE_string("work_dir", None, "scratch directory for the convert case (default: a temp dir)")


def _torch():
    from openvla_jax.utils.torch_compat import import_torch

    return import_torch(os.cpu_count() or 1)


def case_llama(variant: str) -> list[dict]:
    """Forward tokens/s of the Llama decoder: jitted Flax vs transformers LlamaForCausalLM (sdpa)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from configs import model as model_configs
    from openvla_jax.convert.llama import llama_specs
    from openvla_jax.convert.mapping import hf_to_flax
    from openvla_jax.models import llama
    from openvla_jax.utils.timing import median_seconds
    from openvla_jax.utils.torch_compat import transformers_llama

    torch = _torch()
    config = llama.LlamaConfig.from_dict(model_configs.get_config(variant).llm)
    b, t = FLAGS.batch, FLAGS.seq_len
    hf = transformers_llama(config, attn_implementation="sdpa")
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    params = jax.device_put(hf_to_flax(llama_specs(config, scanned=False), sd))
    tokens = np.random.default_rng(0).integers(1, config.vocab_size, (b, t)).astype(np.int32)
    module = llama.Llama(config)
    fwd = jax.jit(lambda p, x: module.apply({"params": p}, x)[0])
    jax_s = median_seconds(lambda: fwd(params, tokens), repeats=FLAGS.repeats, block=jax.block_until_ready)
    tt = torch.tensor(tokens, dtype=torch.long)
    with torch.inference_mode():
        torch_s = median_seconds(lambda: hf(input_ids=tt).logits, repeats=FLAGS.repeats)
    n = b * t
    return [
        dict(case="llama_forward", config=variant, impl="jax", batch=b, seq_len=t, seconds=jax_s, tokens_per_s=n / jax_s),
        dict(case="llama_forward", config=variant, impl="torch", batch=b, seq_len=t, seconds=torch_s, tokens_per_s=n / torch_s),
        dict(case="llama_forward", config=variant, impl="ratio", jax_over_torch_speed=torch_s / jax_s),
    ]


def case_data(variant: str) -> list[dict]:
    """Frames/s to model-ready batches (augmentation off / on) vs a plain tf.data decode + resize."""
    del variant  # the data pipeline does not depend on the model size
    from openvla_jax.data.bench import bench_data

    r = bench_data(batch_size=16)
    return [dict(case="data", **r)]


INSTRUCTIONS = ["pick up the red block", "open the top drawer", "put the green cup to the left of the big bowl",
                "push the blue button"]


def case_predict(variant: str) -> list[dict]:
    """predict_action: latency at batch 1, throughput at batches 8 and 32. JAX (one jitted batched
    call) vs the PyTorch reference (timm + transformers, sdpa, KV-cached greedy, one call per image
    as the original is batch-1 only), same weights, fp32 on both sides, preprocessing included."""
    import tempfile

    import numpy as np

    from configs import model as model_configs
    from openvla_jax.convert.hf import vla_specs
    from openvla_jax.convert.mapping import hf_to_flax
    from openvla_jax.data.normalize import action_stats, unnormalize
    from openvla_jax.models.preprocess import preprocess_images
    from openvla_jax.policy import OpenVLA
    from openvla_jax.tokenizer.prompt import inference_prompt_ids
    from openvla_jax.tokenizer.train import write_sentencepiece
    from openvla_jax.utils.timing import median_seconds
    from openvla_jax.utils.torch_reference import build_torch_vla, hf_state_dict

    torch = _torch()
    cfg = model_configs.get_config(variant)
    ref = build_torch_vla(cfg, seed=0, attn_implementation="sdpa", randomize=False)
    params = hf_to_flax(vla_specs(cfg, False), {k: v.numpy() for k, v in hf_state_dict(ref).items()})
    stats = {"demo": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}}}
    vla = OpenVLA(cfg, params, stats, write_sentencepiece(tempfile.mkdtemp(), INSTRUCTIONS), dtype="float32")
    rng = np.random.default_rng(0)

    def torch_predict(images, texts):
        out = []
        with torch.inference_mode():
            for image, text in zip(images, texts):  # the original takes one image per call
                pv = torch.from_numpy(preprocess_images(image[None]).transpose(0, 3, 1, 2).copy())
                ids = torch.tensor([inference_prompt_ids(vla.tokenizer, text)], dtype=torch.long)
                tokens = ref.greedy_ids(pv, ids, vla.action_dim).numpy()
                out.append(unnormalize(vla.action_tokenizer.decode(tokens).astype(np.float64),
                                       action_stats(stats, "demo"))[0])
        return np.stack(out)

    rows = []
    for b in (1, 8, 32):
        images = rng.integers(0, 256, (b, 256, 256, 3), dtype=np.uint8)
        texts = [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(b)]
        same = np.abs(vla.predict_action(images, texts, "demo") - torch_predict(images, texts)).max()
        jax_s = median_seconds(lambda: vla.predict_action(images, texts, "demo"), repeats=FLAGS.repeats)
        torch_s = median_seconds(lambda: torch_predict(images, texts), repeats=max(1, FLAGS.repeats // 2),
                                 warmup=1)
        common = dict(case="predict_action", config=variant, batch=b)
        rows += [dict(common, impl="jax", seconds=jax_s, actions_per_s=b / jax_s),
                 dict(common, impl="torch", seconds=torch_s, actions_per_s=b / torch_s),
                 dict(common, impl="ratio", jax_over_torch_speed=torch_s / jax_s, max_action_diff=float(same))]
    return rows


def case_train(variant: str) -> list[dict]:
    """One optimizer step (forward, backward, clip, AdamW) on the same batch and weights: our jitted
    sharded step (logits at the supervised positions only, and at every position as the original
    computes them) vs the PyTorch reference (timm + transformers sdpa, torch AdamW + clip_grad_norm_,
    HF-style loss over all logits), fp32 on both sides. FLOPs per step from `train.flops` (the
    formula is in its docstring); MFU when the device's peak is known or given (--peak_tflops)."""
    import jax
    import numpy as np

    from configs import model as model_configs
    from openvla_jax.convert.hf import vla_specs
    from openvla_jax.convert.mapping import hf_to_flax
    from openvla_jax.models import vla
    from openvla_jax.parallel.batch import global_batch
    from openvla_jax.parallel.mesh import make_mesh
    from openvla_jax.train.flops import peak_flops, step_flops
    from openvla_jax.train.optimizer import default_optimizer_config, make_optimizer
    from openvla_jax.train.step import abstract_params, init_train_state, make_train_step
    from openvla_jax.train.synthetic import synthetic_batch
    from openvla_jax.utils.timing import median_seconds
    from openvla_jax.utils.torch_reference import build_torch_vla, hf_state_dict

    torch = _torch()
    cfg = model_configs.get_config(variant)
    b, t = FLAGS.batch, FLAGS.train_len
    image = cfg.vision.image_size
    ref = build_torch_vla(cfg, seed=0, attn_implementation="sdpa", randomize=False).train()
    params = hf_to_flax(vla_specs(cfg, False), {k: v.numpy() for k, v in hf_state_dict(ref).items()})
    batch = synthetic_batch(b, t, image)
    module = vla.from_config(cfg, dtype="float32")
    mesh = make_mesh()
    tx, schedule = make_optimizer(default_optimizer_config(), abstract_params(module))
    device_batch = global_batch(batch, mesh)
    rows, peak = [], peak_flops(jax.devices()[0].device_kind, FLAGS.peak_tflops * 1e12 if FLAGS.peak_tflops else None)
    common = dict(case="train_step", config=variant, batch=b, seq_len=t)
    jax_s = {}
    for name, k in (("jax", 8), ("jax_full_logits", None)):
        state = [init_train_state(module, cfg, tx, mesh, None, jax.random.key(0), params=params)]
        step = make_train_step(module, tx, schedule, mesh, supervised_tokens=k)

        def run():
            state[0], m = step(state[0], device_batch)
            return m

        jax_s[name] = median_seconds(run, repeats=FLAGS.repeats, block=jax.block_until_ready)
        flops = step_flops(cfg, b, t, k)
        rows.append(dict(common, impl=name, seconds=jax_s[name], samples_per_s=b / jax_s[name],
                         tokens_per_s=b * (t + module.num_patches) / jax_s[name], tflops_per_step=flops / 1e12,
                         mfu=flops / jax_s[name] / peak if peak else None))
        del state
    opt = torch.optim.AdamW(ref.parameters(), lr=2e-5, weight_decay=0.0)
    pv = torch.from_numpy(batch["pixel_values"].transpose(0, 3, 1, 2).copy())
    ids = torch.from_numpy(batch["input_ids"]).long()
    mask = torch.from_numpy(batch["attention_mask"]).long()
    labels = torch.from_numpy(batch["labels"]).long()
    p = module.num_patches

    def torch_step():
        opt.zero_grad(set_to_none=True)
        logits = ref(pv, ids, mask)
        loss = torch.nn.functional.cross_entropy(logits[:, p:-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        return loss

    torch_s = median_seconds(torch_step, repeats=FLAGS.repeats)
    flops = step_flops(cfg, b, t, None)
    rows.append(dict(common, impl="torch", seconds=torch_s, samples_per_s=b / torch_s,
                     tokens_per_s=b * (t + p) / torch_s, tflops_per_step=flops / 1e12))
    rows.append(dict(common, impl="ratio", jax_over_torch_speed=torch_s / jax_s["jax"],
                     jax_full_logits_over_torch_speed=torch_s / jax_s["jax_full_logits"]))
    return rows


def case_serve(variant: str) -> list[dict]:
    """The HTTP action server on loopback: throughput and p50/p99 latency at 1, 8 and 32 concurrent
    clients, dynamic batching on (max_batch 32, 5 ms wait) and off, random `variant` weights."""
    from openvla_jax.evaluate.serve_bench import bench_server, tiny_random_vla

    rows = bench_server(tiny_random_vla(variant), clients=(1, 8, 32), batching=(True, False),
                        requests_per_client=16)
    return [dict(case="serve", config=variant, **r) for r in rows]


def case_convert(variant: str) -> list[dict]:
    """Synthetic full-size checkpoint (random bf16, real names and shapes) -> to-jax: wall time and
    peak RSS of the converting process. `--config` picks the variant (use 7b for the real size)."""
    from openvla_jax.convert.bench import bench_convert

    return [bench_convert(variant, work_dir=FLAGS.work_dir)]


CASES = {"llama": case_llama, "data": case_data, "predict": case_predict, "train": case_train,
         "serve": case_serve, "convert": case_convert}


def main(argv):
    del argv
    names = list(CASES) if FLAGS.case == "all" else FLAGS.case.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise app.UsageError(f"unknown case(s) {unknown}; expected some of {sorted(CASES)} or 'all'")
    import jax

    meta = dict(
        date=datetime.date.today().isoformat(), machine=f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores", jax_device=str(jax.devices()[0].device_kind),
    )
    print(json.dumps(meta))
    results = []
    for name in names:
        for variant in (FLAGS.config.split(",") if name != "data" else ["-"]):
            for row in CASES[name](variant):
                print(json.dumps(row))
                results.append(row)
    if FLAGS.out:
        Path(FLAGS.out).write_text(json.dumps(dict(meta=meta, results=results), indent=1))


if __name__ == "__main__":
    app.run(main)
