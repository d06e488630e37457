"""parallel/: mesh shapes and errors, the rule table covers every logical name the models use,
shardings follow the rules (hand-written expectations), global batches (one and two processes)."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from configs import model as model_configs
from openvla_jax.models import vla
from openvla_jax.parallel import batch as B
from openvla_jax.parallel import mesh as M
from openvla_jax.parallel import rules as R
from openvla_jax.parallel import sharding as S
from openvla_jax.train.step import abstract_params

ROOT = Path(__file__).resolve().parents[2]


def mesh_cfg(**kw):
    cfg = M.default_mesh_config()
    cfg.update(kw)
    return cfg


def tiny_module(scan=False):
    cfg = model_configs.get_config("tiny")
    cfg.vision.image_size = 28  # 2x2 patches: same code, less compute
    return vla.from_config(cfg, dtype=jnp.float32, scan_layers=scan)


# --- mesh -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, want",
    [
        ({}, [1, 8, 1]),  # default: pure FSDP
        (dict(data=2), [2, 4, 1]),
        (dict(data=2, fsdp=2, tensor=2), [2, 2, 2]),
        (dict(data=-1, fsdp=1, tensor=2), [4, 1, 2]),
    ],
)
def test_mesh_shapes(kw, want):
    mesh = M.make_mesh(mesh_cfg(**kw))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert [mesh.shape[a] for a in M.AXES] == want
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_mesh_errors_name_devices_and_shape():
    with pytest.raises(ValueError, match=r"8 devices.*not a multiple of 3"):
        M.make_mesh(mesh_cfg(data=3))
    with pytest.raises(ValueError, match=r"needs 12 devices but there are 8"):
        M.make_mesh(mesh_cfg(data=3, fsdp=2, tensor=2))
    with pytest.raises(ValueError, match="at most one"):
        M.make_mesh(mesh_cfg(data=-1, fsdp=-1))
    with pytest.raises(ValueError, match="dcn"):
        M.mesh_shape(mesh_cfg(dcn_data=0), 8)


def test_dcn_split():
    # 2 slices x 4 devices: ICI sizes are per slice, totals are ici x dcn.
    ici, dcn = M.mesh_shape(mesh_cfg(dcn_data=2), 8)
    assert (ici, dcn) == ([1, 4, 1], [2, 1, 1])
    with pytest.raises(ValueError, match="8 devices cannot be split into 3 slices"):
        M.mesh_shape(mesh_cfg(dcn_fsdp=3), 8)


# --- rules ----------------------------------------------------------------------------------------


def _names(boxed):
    boxes = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return {n for b in boxes for n in b.names if n is not None}


def test_every_logical_name_has_a_rule():
    used = _names(abstract_params(tiny_module())) | _names(abstract_params(tiny_module(scan=True)))
    used |= {"batch", "length", "embed", "vocab"}  # activation constraints in llama.py / vit.py
    assert used >= {"vocab", "embed", "mlp", "heads", "kv", "pos", "layers"}
    assert used <= set(R.LOGICAL_NAMES), used - set(R.LOGICAL_NAMES)


def test_fsdp_rule_by_hand():
    # largest divisible free dim; skip tensor-used dims and the scan axis; replicate if none divides.
    assert R.add_fsdp(P(None, None), (64, 128), ("embed", "mlp"), 4) == P(None, "fsdp")
    assert R.add_fsdp(P(None, "tensor"), (64, 128), ("embed", "mlp"), 4) == P("fsdp", "tensor")
    assert R.add_fsdp(P(None, None), (32, 6), ("layers", "embed"), 4) == P(None, None)
    assert R.add_fsdp(P(None, None), (6, 10), None, 4) == P(None, None)
    assert R.add_fsdp(
        P(
            None,
        ),
        (64,),
        None,
        1,
    ) == P(None)
    # size-1 and non-dividing mesh axes are dropped
    sizes = dict(data=2, fsdp=2, tensor=2)
    assert R.fit_spec(P(None, "tensor"), (64, 179), sizes) == P(None, None)
    assert R.fit_spec(P(("data", "fsdp"), None), (8, 3), sizes) == P(("data", "fsdp"), None)
    assert R.fit_spec(P(("data", "fsdp"), None), (2, 3), sizes) == P("data", None)
    assert R.fit_spec(P("tensor"), (8,), dict(data=8, fsdp=1, tensor=1)) == P(None)


def test_param_specs_on_2x2x2():
    mesh = M.make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2))
    specs = S.describe(S.param_shardings(abstract_params(tiny_module()), mesh))
    lm = "language_model/layers_0"
    dino = "vision_backbone/featurizer/blocks_0"
    assert specs[f"{lm}/self_attn/q_proj/kernel"] == P("fsdp", "tensor", None)  # [embed, heads, kv]
    assert specs[f"{lm}/self_attn/o_proj/kernel"] == P("tensor", None, "fsdp")  # [heads, kv, embed]
    assert specs[f"{lm}/mlp/gate_proj/kernel"] == P("fsdp", "tensor")  # [embed, mlp]
    assert specs[f"{lm}/mlp/down_proj/kernel"] == P("tensor", "fsdp")
    assert specs["language_model/embed_tokens/embedding"] == P("tensor", "fsdp")  # [vocab, embed]
    assert specs["language_model/lm_head/kernel"] == P("fsdp", "tensor")  # [embed, vocab]
    assert specs[f"{dino}/attn/qkv/kernel"] == P("fsdp", None, "tensor", None)  # [embed, 3, heads, kv]
    assert specs["vision_backbone/featurizer/pos_embed"] == P(None, None, "fsdp")
    # SigLIP's tiny MLP width 179 divides by nothing: replicated there, fsdp on the other dim.
    assert specs["vision_backbone/fused_featurizer/blocks_0/mlp/fc1/kernel"] == P("fsdp", None)
    # (8, 1, 1): pure data parallel, everything replicated.
    mesh8 = M.make_mesh(mesh_cfg(data=8, fsdp=1))
    assert set(S.describe(S.param_shardings(abstract_params(tiny_module()), mesh8)).values()) == {
        P(None, None),
        P(None),
        P(None, None, None),
        P(None, None, None, None),
    }


def test_scanned_layers_axis_never_fsdp():
    mesh = M.make_mesh(mesh_cfg(fsdp=-1))
    specs = S.describe(S.param_shardings(abstract_params(tiny_module(scan=True)), mesh))
    q = specs["language_model/layers/self_attn/q_proj/kernel"]  # [layers, embed, heads, kv] = [2, 64, 4, 16]
    assert q == P(None, "fsdp", None, None)


def test_opt_state_mirrors_params():
    mesh = M.make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2))
    boxed = abstract_params(tiny_module())
    p_sh = S.param_shardings(boxed, mesh)
    tx = optax.adamw(1e-3)
    o_sh = S.opt_state_shardings(tx, boxed, p_sh, mesh)
    adam = o_sh[0]
    assert jax.tree.structure(adam.mu) == jax.tree.structure(p_sh)
    assert all(a.spec == b.spec for a, b in zip(jax.tree.leaves(adam.nu), jax.tree.leaves(p_sh)))
    assert adam.count.spec == P()


# --- batches --------------------------------------------------------------------------------------


def test_global_batch_values_and_sharding():
    mesh = M.make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2))
    host = dict(
        input_ids=np.arange(8 * 5, dtype=np.int32).reshape(8, 5),
        pixel_values=np.random.default_rng(0).normal(size=(8, 2, 2, 6)).astype(np.float32),
        dataset_name=np.array(["b", "a", "b", "b", "a", "a", "b", "a"]),
    )
    out = B.global_batch(host, mesh, dataset_names=["a", "b"])
    assert set(out) == {"input_ids", "pixel_values", "dataset_index"}
    np.testing.assert_array_equal(np.asarray(out["input_ids"]), host["input_ids"])
    np.testing.assert_array_equal(np.asarray(out["dataset_index"]), [1, 0, 1, 1, 0, 0, 1, 0])
    assert out["pixel_values"].sharding.spec == P(("data", "fsdp"), None, None, None)
    # each of the 4 batch shards holds 2 rows; the tensor axis holds replicas
    assert {s.data.shape[0] for s in out["input_ids"].addressable_shards} == {2}
    with pytest.raises(ValueError, match="'c'.*not in the dataset list"):
        B.global_batch(dict(dataset_name=np.array(["c"] * 8), x=np.zeros(8)), mesh, ["a", "b"])
    with pytest.raises(ValueError, match="6 rows.*not divisible by data x fsdp = 4"):
        B.global_batch(dict(x=np.zeros((6, 2))), mesh)


_TWO_PROCESS = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np
    from openvla_jax.parallel import batch, distributed, mesh as M
    pid = int(sys.argv[1])
    assert distributed.maybe_initialize(f"localhost:{sys.argv[2]}", 2, pid)
    assert distributed.maybe_initialize()  # idempotent
    assert jax.process_count() == 2 and jax.device_count() == 8
    mesh = M.make_mesh(M.default_mesh_config())
    rows = np.arange(4, dtype=np.float32)[:, None] + 4 * pid + np.zeros((4, 3), np.float32)
    out = batch.global_batch({"x": rows, "dataset_name": np.array(["a", "b", "a", "b"])}, mesh, ["a", "b"])
    assert out["x"].shape == (8, 3), out["x"].shape
    weights = jnp.arange(8, dtype=jnp.float32)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    total = jax.jit(lambda x, w: (x[:, 0] * w).sum(), out_shardings=replicated)(out["x"], weights)
    print("RESULT", pid, float(total), int(jnp.sum(out["dataset_index"])))
""")


def test_two_process_global_batch(tmp_path):
    """Two processes x 4 CPU devices joined by jax.distributed: each feeds rows 4p..4p+3, the global
    array holds rows 0..7 in order (sum_i i * i = 140 on both processes)."""
    script = tmp_path / "two.py"
    script.write_text(_TWO_PROCESS)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["PYTHONPATH"] = str(ROOT)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    results = sorted(line.split()[1:] for out in outs for line in out.splitlines() if line.startswith("RESULT"))
    assert results == [["0", "140.0", "4"], ["1", "140.0", "4"]], outs
