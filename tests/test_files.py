"""utils/files.py: outputs appear whole or not at all; JSON errors name the file."""

import json

import pytest

from openvla_jax.utils.files import atomic_output, atomic_write_text, read_json, write_json


def test_atomic_output_appears_only_when_the_block_completes(tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_output(out) as tmp:
            (tmp / "weights.bin").write_bytes(b"half")
            raise RuntimeError("crash")
    assert not out.exists() and list(tmp_path.iterdir()) == []  # the temp dir is gone too
    with atomic_output(out) as tmp:
        (tmp / "weights.bin").write_bytes(b"whole")
    assert (out / "weights.bin").read_bytes() == b"whole" and list(tmp_path.iterdir()) == [out]
    with pytest.raises(FileExistsError, match="not empty"):
        with atomic_output(out):
            pass


def test_json_round_trip_and_errors_that_name_the_file(tmp_path):
    path = write_json(tmp_path / "a" / "stats.json", {"x": [1, 2]})
    assert read_json(path) == {"x": [1, 2]} and json.loads(path.read_text()) == {"x": [1, 2]}
    atomic_write_text(path, "{not json")
    with pytest.raises(ValueError, match=r"dataset statistics .*stats.json is not valid JSON"):
        read_json(path, "dataset statistics")
    with pytest.raises(FileNotFoundError, match=r"model config .*missing.json does not exist"):
        read_json(tmp_path / "missing.json", "model config")
    assert sorted(p.name for p in path.parent.iterdir()) == ["stats.json"]  # no temp files left
