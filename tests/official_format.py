"""Test helpers: the tiny official fixture, and a writer for the released `.pkl` format.

A released MagicLens checkpoint is `pickle.dumps(flax.serialization.msgpack_serialize({'params': tree}))`:
nested dicts keyed by the parts of each `'/'`-separated parameter path, every array stored as
`msgpack.ExtType(1, msgpack.packb((shape, dtype_name, raw_bytes)))`.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import msgpack
import numpy as np

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "official_tiny"
FIXTURE_PKL = FIXTURE_DIR / "params_tiny.pkl"

_EXT_NDARRAY = 1


def _pack_array(array: np.ndarray) -> msgpack.ExtType:
    # not np.ascontiguousarray: it turns a 0-d array (`logit_scale`) into shape (1,)
    return msgpack.ExtType(_EXT_NDARRAY, msgpack.packb((list(array.shape), array.dtype.name, array.tobytes("C"))))


def official_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """`arrays` (`{'clip/visual/...': array}`) serialised like a released checkpoint."""
    tree: dict = {}
    for key, array in arrays.items():
        *parents, leaf = key.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _pack_array(np.asarray(array))
    return pickle.dumps(msgpack.packb({"params": tree}), protocol=4)


def write_official(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write `arrays` as an official-format `.pkl` at `path`; returns `path`."""
    path.write_bytes(official_bytes(arrays))
    return path
