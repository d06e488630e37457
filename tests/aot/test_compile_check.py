"""Ahead-of-time compiles for TPU slices and GPU clusters (`openvla_jax.aot`, scripts/compile_check.py).

The compile cases need the `aot` extra (libtpu / the CUDA plugin: `make install-aot`) and skip
cleanly without it; target parsing, the mesh's slice grouping and the FLOPs tables need nothing.
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from openvla_jax.aot import targets as T

ROOT = Path(__file__).resolve().parents[2]
needs_tpu = pytest.mark.skipif(not T.available("tpu"), reason="no libtpu (pip install -e '.[aot]')")


def test_tpu_names_resolve_to_chip_grids():
    assert T.parse_tpu("v5p-64") == ("v5p", (2, 4, 4))  # 64 TensorCores = 32 megacore chips
    assert T.parse_tpu("v4-32") == ("v4", (2, 2, 4))
    assert T.parse_tpu("v5p-8") == ("v5p", (2, 2, 1))
    assert T.parse_tpu("v5p-256") == ("v5p", (4, 4, 8))
    assert T.parse_tpu("v5e-8") == ("v5e", (2, 4))  # v5e / v6e count chips
    assert T.parse_tpu("v5e-256") == ("v5e", (16, 16))
    assert T.parse_tpu("v6e-64") == ("v6e", (8, 8))
    assert T.parse_tpu("v5p:4x4x2") == ("v5p", (4, 4, 2))
    with pytest.raises(ValueError, match="TensorCores"):
        T.parse_tpu("v5p-3")
    with pytest.raises(ValueError, match="unknown TPU target"):
        T.parse_tpu("v9-8")


def test_gpu_names_and_specs():
    assert T.parse_gpu("h100:4x8") == ("h100", 4, 8)
    assert T.parse_gpu("a100:8") == ("a100", 1, 8)
    assert T.is_gpu("h200:2x8") and not T.is_gpu("v5e-8")
    with pytest.raises(ValueError, match="unknown GPU target"):
        T.parse_gpu("k80:1x8")
    for gpu in T.GPUS:  # every shipped spec names its device and memory
        spec = T.gpu_spec(gpu)
        assert 40 * T.GiB < T.gpu_memory(spec) < 200 * T.GiB
        assert 'platform_name: "CUDA"' in spec


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    process_index: int
    slice_index: int
    platform: str
    device_kind: str = "fake"


def test_make_mesh_groups_by_slice_only_with_several_slices():
    from openvla_jax.parallel.mesh import make_mesh

    cfg = SimpleNamespace(get=lambda k, d=None: dict(data=1, fsdp=-1, tensor=1, dcn_data=2).get(k, d))

    # Deviceless GPU devices: every one reports slice 0; the hosts (processes) are the granules.
    mesh = make_mesh(cfg, [FakeDevice(i, i // 4, 0, "gpu") for i in range(8)])
    assert mesh.devices.shape == (2, 4, 1)
    assert [{d.process_index for d in row.flat} for row in mesh.devices] == [{0}, {1}]

    # Two slices of two processes each (as multi-slice TPU devices report): the slices are the granules.
    mesh = make_mesh(cfg, [FakeDevice(i, i // 2, i // 4, "cpu") for i in range(8)])
    assert [{d.slice_index for d in row.flat} for row in mesh.devices] == [{0}, {1}]


def test_flops_tables_match_reported_device_kinds():
    from openvla_jax.train.flops import hbm_bandwidth, peak_flops

    assert peak_flops("TPU v5") == 459e12  # v5p reports plain "TPU v5"
    assert peak_flops("TPU v5 lite") == 197e12
    assert peak_flops("TPU v6 lite") == 918e12
    assert peak_flops("TPU7x") and hbm_bandwidth("TPU7x")
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert hbm_bandwidth("TPU v5") == 2.76e12


def test_cudnn_check_reads_the_traced_platform():
    import jax.numpy as jnp

    from openvla_jax.models.common import attention, target_platform, traced_for

    q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match="needs a GPU"):
        attention(q, q, q, None, impl="cudnn")
    mesh = SimpleNamespace(devices=np.asarray([SimpleNamespace(platform="gpu")]))
    with traced_for(mesh):
        assert target_platform() == "gpu"
    assert target_platform() == "cpu"


def test_mixture_size_from_the_table():
    from openvla_jax.aot.compile import num_datasets
    from openvla_jax.data.oxe.mixtures import MIXTURES

    cfg = SimpleNamespace(data={"mixture": "oxe_magic_soup_plus_minus"})
    assert num_datasets(cfg) == len(MIXTURES["oxe_magic_soup_plus_minus"]) > 20
    assert num_datasets(SimpleNamespace(data={"mixture": ""})) == 1


@needs_tpu
def test_tiny_step_compiles_for_a_tpu_slice_with_the_sharded_state_as_arguments():
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from configs import train as train_configs
    from openvla_jax.aot import compile as C
    from openvla_jax.parallel import rules as R
    from openvla_jax.train.loop import build_module
    from openvla_jax.train.optimizer import make_optimizer
    from openvla_jax.train.step import (
        abstract_batch,
        abstract_params,
        abstract_train_state,
        select_batch,
        train_state_shardings,
    )

    config = train_configs.get_config("tiny")
    config.model.scan_layers = True  # a shorter program: the test compiles in well under a minute
    target = T.get_target("v5e-4")
    assert target.num_devices == 4 and target.device_kind == "TPU v5 lite"
    report = C.compile_train(config, target, rows_per_device=1, text_len=16)
    assert report.fits and not report.error
    # The arguments the compiler plans for one chip = that chip's shards of state + batch + the step
    # counter, from their shapes, each rounded up to the TPU tile of the layout the compiler chose.
    mesh = C.train_mesh(config, target)
    module = build_module(config)
    optimizer, _ = make_optimizer(config.optimizer, abstract_params(module))
    state = abstract_train_state(module, optimizer, train_state_shardings(module, optimizer, mesh, R.RULES))
    batch = abstract_batch(module, mesh, 4, 16)
    expected = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
    args = (state, select_batch(batch), expected)
    assert report.argument == C.argument_bytes(args, report.input_formats)
    untiled = C.per_device_bytes(args)
    assert untiled < report.argument < 2 * untiled  # tiles pad the tiny model's small dims
    assert report.alias > 0.9 * C.per_device_bytes(state)  # the donated state is updated in place
    assert report.collectives  # FSDP gathers params / reduces gradients
    assert report.flops > 0


def _compile_check(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/compile_check.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@needs_tpu
def test_7b_pretraining_on_too_small_a_slice_does_not_fit():
    # Four 16 GiB v5e chips cannot hold the 7B fp32 state and Adam moments (about 21 GiB a chip).
    out = _compile_check("--config=configs/train.py:openvla_7b_pretrain", "--target=v5e-4", "--rows_per_device=1")
    assert out.returncode == 1, out.stdout + out.stderr[-2000:]
    assert "does NOT fit" in out.stdout and "arguments alone need" in out.stdout


@needs_tpu
@pytest.mark.slow
def test_7b_pretraining_runs_out_of_hbm_in_the_tpu_compiler():
    # v5e-8 holds the state (10.5 GiB a chip) but not 8 rows' activations: the compiler says so.
    out = _compile_check(
        "--config=configs/train.py:openvla_7b_pretrain", "--target=v5e-8", "--rows_per_device=8", timeout=3600
    )
    assert out.returncode == 1, out.stdout + out.stderr[-2000:]
    assert "RESOURCE_EXHAUSTED" in out.stdout or "memory" in out.stdout


@pytest.mark.skipif(not T.available("gpu"), reason="no CUDA plugin (pip install -e '.[aot]')")
def test_tiny_step_compiles_for_gpus_and_reports_peak_memory(tmp_path):
    from configs import train as train_configs
    from openvla_jax.aot import compile as C

    config = train_configs.get_config("tiny")
    config.model.scan_layers = True
    saved = tmp_path / "step.exe"
    report = C.compile_train(config, T.get_target("h100:1x2"), rows_per_device=1, text_len=16, save=str(saved))
    assert report.fits and report.device_kind.startswith("NVIDIA H100")
    assert 0 < report.peak < report.memory_bytes
    assert saved.stat().st_size > 100_000  # the serialized executable (--save)
