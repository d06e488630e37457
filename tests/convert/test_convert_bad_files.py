"""Malformed safetensors files and indexes, and weights a model must not run with: each is refused
with an error naming the file (and the tensor), before anything large is allocated."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from openvla_jax.convert.io import INDEX_NAME, open_state_dict, save_state_dict


def _raw(path, header: dict, data: bytes = b""):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_a_header_size_beyond_the_file_is_an_error_not_a_memory_error(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(ValueError, match=f"{path}: safetensors header claims 1099511627776 bytes"):
        open_state_dict(path)
    _raw(tmp_path / "list.safetensors", [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="header must be a JSON object, got list"):
        open_state_dict(tmp_path / "list.safetensors")


def test_header_entries_without_offsets_or_with_bad_ones_are_named(tmp_path):
    no_offsets = _raw(tmp_path / "a.safetensors", {"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8)
    with pytest.raises(ValueError, match=f"{no_offsets}: header entry 'w' needs dtype, shape and data_offsets"):
        open_state_dict(no_offsets)
    beyond = _raw(
        tmp_path / "b.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4096]}}, b"\0" * 8
    )
    with pytest.raises(ValueError, match="tensor 'w' has data_offsets \\[0, 4096\\]; expected .* 8 data bytes"):
        open_state_dict(beyond)
    shape = _raw(tmp_path / "c.safetensors", {"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(ValueError, match="tensor 'w' has shape \\[-2\\]"):
        open_state_dict(shape)


def test_index_shards_must_stay_inside_the_checkpoint_directory(tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    save_state_dict(outside, {"w": np.ones(2, np.float32)})
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / INDEX_NAME).write_text(json.dumps({"weight_map": {"w": "../elsewhere.safetensors"}}))
    with pytest.raises(ValueError, match="names shard files outside .*ckpt: \\['../elsewhere.safetensors'\\]"):
        open_state_dict(ckpt)
    (ckpt / INDEX_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=f"{ckpt / INDEX_NAME}: unreadable JSON"):
        open_state_dict(ckpt)
    (ckpt / INDEX_NAME).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="expected \\{'weight_map'"):
        open_state_dict(ckpt)


def test_integer_and_non_finite_weights_are_refused_unless_allowed(tmp_path):
    path = tmp_path / "w.safetensors"
    bf16 = np.array([1.0, np.nan, 2.0, np.inf], ml_dtypes.bfloat16)
    save_state_dict(path, {"ints": np.arange(4, dtype=np.int32), "nan": bf16, "ok": np.ones(3, np.float32)})
    reader = open_state_dict(path)
    np.testing.assert_array_equal(reader["ok"], np.ones(3, np.float32))
    with pytest.raises(ValueError, match=f"{path}: tensor 'ints' has dtype I32; model weights must be floating"):
        reader["ints"]
    with pytest.raises(ValueError, match="tensor 'nan' holds 2 non-finite values .* of 4"):
        reader["nan"]
    allowed = open_state_dict(path, allow_nonfloat=True, allow_nonfinite=True)
    np.testing.assert_array_equal(allowed["ints"], np.arange(4, dtype=np.int32))
    assert np.isnan(allowed["nan"].astype(np.float32)).sum() == 1
