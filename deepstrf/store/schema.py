"""Checking a source store's metadata against the format before anything is read or allocated.

A store shared by another lab may be damaged or hostile: its attributes and array documents
may have wrong types, or shapes, chunk shapes and data types that contradict each other or
``docs/format.md``. :func:`check_source` refuses such a store with an
:class:`~deepstrf.errors.IntegrityError` naming the store and the field, so that no reader
allocates or iterates by what a document merely declares. It costs a few microseconds per
array (pooled sources are checked when each is opened).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from zarr.core.buffer import default_buffer_prototype

from ..errors import IntegrityError
from . import format as fmt

MAX_CHUNK_BYTES = 1 << 28  # no deepstrf chunk or shard is this large (format.md: at most 32 MiB)
REQUIRED = {"kind": str, "dt_ms": "number", "n_stims": "count", "n_neurons": "count", "stim_dtype": str,
            "response_dtype": str, "stim_ndim": "count", "stats": dict, "arrays": dict, "fingerprint": str}
OPTIONAL = {"name": (str, None), "class_name": (str, None), "card": (dict, None), "audio_fs": ("number", None),
            "hearing_range_hz": (list, None), "nbytes_stored": ("count",), "written_by": (str,)}
BY_KIND = {"audio": ("F",), "video": ("H", "W"), "neural": ()}
RESPONSE_DTYPES = {np.dtype(t).name for t in ("u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f4", "f8")}


def _damaged(url: str, what: str) -> IntegrityError:
    return IntegrityError(f"{url}: {what}; the store is damaged or was not written by deepstrf. "
                          "Re-create it from its source.")


def _is(value: Any, kind: Any) -> bool:
    if kind is None:
        return value is None
    if kind == "count":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if kind == "number":
        return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and value > 0)
    return isinstance(value, kind)


SET_BY_ARRAYS = ("stim_dtype", "response_dtype", "stim_ndim", "stats", "arrays", "fingerprint")


def is_positive_number(value: Any) -> bool:
    """A finite positive int or float (not a bool): what ``dt_ms`` and ``audio_fs`` must be."""
    return _is(value, "number")


def check_attributes(attrs: dict[str, Any], url: str) -> None:
    """Every attribute a reader relies on present, of its documented type (``docs/format.md``)."""
    problem = attribute_problem(attrs)
    if problem:
        raise _damaged(url, problem)


def attribute_problem(attrs: dict[str, Any], *, before_arrays: bool = False) -> str | None:
    """The first attribute a reader refuses, described (``the attribute 'F' is 0, not a positive
    integer``), or None. ``before_arrays``: skip those writing the arrays sets (:data:`SET_BY_ARRAYS`),
    so that a writer refuses a dataset before writing anything."""
    for key, kind in REQUIRED.items():
        if key not in attrs and before_arrays and key in SET_BY_ARRAYS:
            continue
        if key not in attrs:
            return f"the attribute {key!r} is missing"
        if not _is(attrs[key], kind):
            return f"the attribute {key!r} is {attrs[key]!r}, not a {_name(kind)}"
    if attrs["kind"] not in fmt.KINDS:
        return f"the attribute 'kind' is {attrs['kind']!r}, not one of {list(fmt.KINDS)}"
    for key in BY_KIND[attrs["kind"]]:
        value = attrs.get(key)
        if not _is(value, "count") or value == 0:
            return f"the attribute {key!r} is {value!r}, not a positive integer"
    for key, kinds in OPTIONAL.items():
        if key in attrs and not any(_is(attrs[key], k) for k in kinds):
            return f"the attribute {key!r} is {attrs[key]!r}, not a {' or '.join(_name(k) for k in kinds)}"
    hr = attrs.get("hearing_range_hz")
    if hr is not None and not (len(hr) == 2 and all(_is(v, "number") for v in hr) and hr[0] < hr[1]):
        return f"the attribute 'hearing_range_hz' is {hr!r}, not an increasing [low, high] pair"
    return None if before_arrays else _array_attribute_problem(attrs)


def _array_attribute_problem(attrs: dict[str, Any]) -> str | None:
    """:func:`attribute_problem` of the attributes in :data:`SET_BY_ARRAYS`, beyond their types."""
    for key in ("values", "stim_values"):
        if not _is(attrs["stats"].get(key), "count"):
            return f"the attribute 'stats.{key}' is {attrs['stats'].get(key)!r}, not a count"
    if attrs["response_dtype"] not in RESPONSE_DTYPES:
        return f"the attribute 'response_dtype' is {attrs['response_dtype']!r}, not one of {sorted(RESPONSE_DTYPES)}"
    if numeric_dtype(attrs["stim_dtype"]) is None:
        return f"the attribute 'stim_dtype' is {attrs['stim_dtype']!r}, not a numeric NumPy dtype"
    return None


def check_pool_attributes(attrs: dict[str, Any], url: str, tables: tuple[str, ...]) -> None:
    """A pool's attributes of their documented types; ``tables``: the arrays its ``digests`` must name."""
    for key, kind in {"kind": str, "dt_ms": "number", "n_stims": "count", "n_neurons": "count",
                      "fingerprint": str}.items():
        if not _is(attrs.get(key, _MISSING), kind):
            raise _damaged(url, f"the attribute {key!r} is {attrs.get(key, 'missing')!r}, not a {_name(kind)}")
    if attrs["kind"] not in fmt.KINDS:
        raise _damaged(url, f"the attribute 'kind' is {attrs['kind']!r}, not one of {list(fmt.KINDS)}")
    for key in BY_KIND[attrs["kind"]]:
        if not _is(attrs.get(key), "count") or attrs[key] == 0:
            raise _damaged(url, f"the attribute {key!r} is {attrs.get(key, 'missing')!r}, not a positive integer")
    digests = attrs.get("digests")
    if tables and not (isinstance(digests, dict) and all(isinstance(digests.get(t), str) for t in tables)):
        raise _damaged(url, f"the attribute 'digests' is {digests!r}, not the digest of each of {list(tables)}")


POOL_ENTRY = {"name": str, "ref": str, "fingerprint": str, "n_stims": "count", "n_neurons": "count", "kind": str}


def check_pool_entries(entries: Any, url: str) -> None:
    """A pool's source entries: a list of objects with the documented keys and types."""
    if not isinstance(entries, list):
        raise _damaged(url, "the sources table is not a list")
    if (all(type(e) is dict for e in entries)  # the fast path (10^4 entries: a few ms), then the slow one
            and all(all(type(e.get(k)) is str for e in entries) for k in ("name", "ref", "fingerprint", "kind"))
            and all(all(type(e.get(k)) is int and e[k] >= 0 for e in entries) for k in ("n_stims", "n_neurons"))
            and {e["kind"] for e in entries} <= set(fmt.KINDS)):
        return
    for i, e in enumerate(entries):
        bad = [k for k, kind in POOL_ENTRY.items() if not isinstance(e, dict) or not _is(e.get(k, _MISSING), kind)]
        if bad or e["kind"] not in fmt.KINDS:
            raise _damaged(url, f"source entry {i} has {'a bad ' + repr(bad[0]) if bad else 'an unknown kind'} "
                                f"({str(e)[:200]})")


_MISSING = object()


def _name(kind: Any) -> str:
    return {None: "null", "count": "non-negative integer", "number": "positive number"}.get(
        kind, getattr(kind, "__name__", str(kind)))


def numeric_dtype(name: Any) -> np.dtype | None:
    """The dtype named ``name`` if it is boolean, integer or floating, else None."""
    try:
        dtype = np.dtype(name) if isinstance(name, str) else None
    except TypeError:
        return None
    return dtype if dtype is not None and dtype.kind in "biuf" else None


def expected_arrays(attrs: dict[str, Any]) -> dict[str, tuple[tuple[int | None, ...], set[str] | None]]:
    """Each array's shape (None: any length) and allowed data types, from the checked attributes."""
    S, N = attrs["n_stims"], attrs["n_neurons"]
    unsigned = {f"uint{b}" for b in (8, 16, 32, 64)}
    return {
        fmt.VALUES: ((attrs["stats"]["values"],), {attrs["response_dtype"]}),
        fmt.OFFSETS: ((S * N + 1,), {"int64"}),
        fmt.REPEATS: ((S, N), unsigned),
        fmt.STIM_VALUES: ((attrs["stats"]["stim_values"],), {np.dtype(attrs["stim_dtype"]).name}),
        fmt.STIM_OFFSETS: ((S + 1,), {"int64"}),
        fmt.STIM_SHAPES: ((S, attrs["stim_ndim"]), {"int64"}),
        fmt.STIM_META: ((None,), {"uint8"}),
        fmt.NRN_META: ((None,), {"uint8"}),
    }


def check_array(name: str, meta: Any, shape: tuple[int | None, ...], dtypes: set[str] | None, url: str) -> None:
    """Array ``name``'s document: the shape (None: any length) and data type (None: any numeric one)
    the attributes imply, sane chunks and codecs."""
    where = f"array {name!r}"
    if not isinstance(meta, dict):
        raise _damaged(url, f"the metadata of {where} is not a JSON object")
    found = list(meta["shape"]) if isinstance(meta.get("shape"), (list, tuple)) else meta.get("shape")
    if (not isinstance(found, list) or len(found) != len(shape) or not all(_is(n, "count") for n in found)
            or any(want is not None and n != want for n, want in zip(found, shape))):
        raise _damaged(url, f"{where} has shape {found!r}, expected "
                            f"{[n if n is not None else 'any' for n in shape]} (from the store's attributes)")
    dtype = meta.get("data_type")
    if dtype not in dtypes if dtypes is not None else numeric_dtype(dtype) is None:
        raise _damaged(url, f"{where} has data type {dtype!r}, expected "
                            f"{' or '.join(sorted(dtypes)) if dtypes is not None else 'a numeric one'}")
    if not isinstance(meta.get("fill_value"), (int, float)):
        raise _damaged(url, f"{where} has fill value {meta.get('fill_value')!r}, expected a number")
    itemsize = np.dtype(dtype).itemsize
    chunks = _chunk_shape(meta.get("chunk_grid"))
    _check_chunks(chunks, found, itemsize, f"{where}'s chunk shape", url)
    codecs = meta.get("codecs")
    if not isinstance(codecs, list) or not codecs or not all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                                             for c in codecs):
        raise _damaged(url, f"{where} has codecs {codecs!r}, expected a list of named codecs")
    if codecs[0]["name"] == "sharding_indexed":
        inner = _chunk_shape({"name": "regular", "configuration": codecs[0].get("configuration")})
        _check_chunks(inner, found, itemsize, f"{where}'s inner chunk shape", url)
        if any(c % i for c, i in zip(chunks, inner)):
            raise _damaged(url, f"{where}'s shards {chunks} do not hold whole inner chunks {inner}")


def _chunk_shape(grid: Any) -> Any:
    if not isinstance(grid, dict) or grid.get("name") != "regular" or not isinstance(grid.get("configuration"), dict):
        return None
    chunks = grid["configuration"].get("chunk_shape")
    return list(chunks) if isinstance(chunks, tuple) else chunks


def _check_chunks(chunks: Any, shape: list[int], itemsize: int, what: str, url: str) -> None:
    if (not isinstance(chunks, list) or len(chunks) != len(shape) or not all(_is(c, "count") and c > 0 for c in chunks)
            or chunks[1:] != shape[1:] or math.prod(chunks) * itemsize > MAX_CHUNK_BYTES):
        raise _damaged(url, f"{what} is {chunks!r}: expected a regular grid of positive lengths, whole rows, "
                            f"at most {MAX_CHUNK_BYTES >> 20} MiB per chunk")


def check_source(attrs: dict[str, Any], arrays_meta: dict[str, dict] | None, url: str) -> None:
    """Refuse a source whose attributes or array documents contradict the format or each other
    (``arrays_meta`` None: a root without consolidated metadata, whose arrays zarr describes)."""
    check_attributes(attrs, url)
    if arrays_meta is None:
        return
    for name, (shape, dtypes) in expected_arrays(attrs).items():
        if name not in arrays_meta:
            raise _damaged(url, f"array {name!r} is missing from the store")
        check_array(name, arrays_meta[name], shape, dtypes, url)


def as_written(meta: Any) -> dict:
    """The JSON document zarr writes for array or group metadata ``meta``, parsed."""
    return json.loads(meta.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes())
