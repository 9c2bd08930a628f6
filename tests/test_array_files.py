"""The run directory's file of arrays: every dtype and shape back bit for bit, and a
file cut short or changed is refused by name."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from ftwidgets.engine.array_files import read_arrays, write_arrays

pytestmark = pytest.mark.unit


def test_arrays_of_every_kind_come_back_bit_for_bit(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "weights": [
            rng.normal(size=(3, 5)).astype(np.float32),
            np.float32(np.nan) * np.ones(2, np.float32),
            rng.normal(size=7).astype(ml_dtypes.bfloat16),
            np.array(7, np.int32),  # 0-d, as an optimizer's iteration count
            np.zeros((0, 4), np.float64),
            np.asfortranarray(rng.normal(size=(4, 3))),
        ],
        "empty": [],
    }
    digest = write_arrays(tmp_path / "a.arrays", {"label": "x"}, arrays)
    header, found = read_arrays(tmp_path / "a.arrays", digest)
    assert header == {"label": "x"} and found["empty"] == []
    for before, after in zip(arrays["weights"], found["weights"], strict=True):
        assert after.dtype == before.dtype and after.shape == before.shape
        assert before.tobytes(order="C") == after.tobytes()


def test_a_changed_or_cut_file_is_refused_by_name(tmp_path):
    path = tmp_path / "b.arrays"
    digest = write_arrays(path, {}, {"w": [np.arange(1000.0)]})
    raw = path.read_bytes()
    path.write_bytes(raw[:-8])
    with pytest.raises(ValueError, match=r"b\.arrays changed since it was written"):
        read_arrays(path, digest)
    with pytest.raises(ValueError, match=r"b\.arrays is cut short"):
        read_arrays(path)
    path.write_bytes(b"PK" + raw[2:])
    with pytest.raises(ValueError, match=r"b\.arrays is not an ftwidgets arrays file"):
        read_arrays(path)
