"""`scripts/eval_libero.py` end to end on the real LIBERO with a tiny random OpenVLA checkpoint (HF
layout, with a `libero_goal_no_noops` action statistic, as the released LIBERO checkpoints have):
two workers, one batched `predict_action` per step, results and GIFs written, the run resumed.
Slow (`make test-slow`, ~75 s here): a torch-built checkpoint, a jit compile and two scene builds."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

if importlib.util.find_spec("libero") is None:
    pytest.skip(
        "LIBERO is not installed: `make install-libero` (pip install -r requirements-libero.txt) to run these",
        allow_module_level=True,
    )

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from tests.support.rlds_fixtures import train_tiny_sentencepiece
    from tests.support.vla_refs import NORM_STATS, build_torch_vla, write_hf_dir

    path = tmp_path_factory.mktemp("tiny_libero")
    write_hf_dir(build_torch_vla(), path, norm_stats={"libero_goal_no_noops": NORM_STATS["bridge_orig"]})
    shutil.copy(Path(train_tiny_sentencepiece(str(tmp_path_factory.mktemp("tok")))) / "tokenizer.model", path)
    return path


def test_cli_with_a_tiny_openvla_on_real_libero(tiny_ckpt, tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, str(ROOT / "scripts" / "eval_libero.py"), "--checkpoint", str(tiny_ckpt)]
    cmd += ["--suite", "libero_goal", "--tasks", "7", "--trials", "2", "--workers", "2", "--max_steps", "2"]
    cmd += ["--dtype", "float32", "--out", str(out), "--record"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["episodes"] == 2 and line["this_run_episodes"] == 2
    settings = json.loads((out / "settings.json").read_text())
    assert settings["unnorm_key"] == "libero_goal_no_noops" and settings["center_crop"] == pytest.approx(0.9)
    assert len(list((out / "videos").glob("libero_goal--task07--trial0*--failure.gif"))) == 2
    # Same command again: resumed, nothing left to run.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1])["this_run_episodes"] == 0
