"""Metadata lists (``stim_meta``, ``nrn_meta``) as strict JSON, losslessly.

Plain JSON values are stored as they are (key order kept). The few Python
values JSON lacks are tagged objects ``{"$deepstrf": TYPE, ...}``: tuples,
dicts with non-string keys (or with the key ``"$deepstrf"`` itself, so a user's dict is
never read as a tag), non-finite floats, and numpy / torch arrays.
NumPy scalars become the matching Python number. Anything else is refused,
naming the entry, so nothing is ever pickled.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

TAG = "$deepstrf"


def _encode(x: Any, where: str) -> Any:
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return x if math.isfinite(x) else {TAG: "float", "value": repr(x)}
    if isinstance(x, np.generic):
        if x.dtype.kind in "biuf":
            return _encode(x.item(), where)
        raise TypeError(f"{where}: cannot store a numpy {x.dtype} scalar; convert it to a JSON type")
    if isinstance(x, dict):
        if TAG not in x and all(isinstance(k, str) for k in x):
            return {k: _encode(v, f"{where}[{k!r}]") for k, v in x.items()}
        return {TAG: "dict", "items": [[_encode(k, f"{where} key"), _encode(v, f"{where}[{k!r}]")]
                                       for k, v in x.items()]}
    if isinstance(x, list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, tuple):
        return {TAG: "tuple", "items": [_encode(v, f"{where}[{i}]") for i, v in enumerate(x)]}
    kind, arr = _as_array(x)
    if arr is not None and arr.dtype.kind in "biuf":
        return {TAG: kind, "dtype": arr.dtype.str, "shape": list(arr.shape),
                "data": [_encode(v, where) for v in arr.reshape(-1).tolist()]}
    raise TypeError(
        f"{where}: cannot store a {type(x).__name__} in store metadata; use JSON types, tuples, "
        "or numeric numpy/torch arrays (nothing is pickled)")


def _as_array(x: Any) -> tuple[str, np.ndarray | None]:
    if isinstance(x, np.ndarray):
        return "ndarray", x
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return "", None
    if isinstance(x, torch.Tensor):
        return "tensor", x.detach().cpu().numpy()
    return "", None


def _decode(x: Any) -> Any:
    if isinstance(x, list):
        return [_decode(v) for v in x]
    if not isinstance(x, dict):
        return x
    tag = x.get(TAG)
    if tag is None:
        return {k: _decode(v) for k, v in x.items()}
    if tag == "float":
        return float(x["value"])
    if tag == "tuple":
        return tuple(_decode(v) for v in x["items"])
    if tag == "dict":
        return {_decode(k): _decode(v) for k, v in x["items"]}
    if tag in ("ndarray", "tensor"):
        arr = np.array([_decode(v) for v in x["data"]], dtype=np.dtype(x["dtype"])).reshape(x["shape"])
        if tag == "tensor":
            import torch

            return torch.from_numpy(arr)
        return arr
    raise ValueError(f"unknown tagged metadata value {tag!r}")


def encode_meta(items: list[dict], name: str) -> bytes:
    """UTF-8 JSON array of the encoded dicts; ``name`` labels errors (e.g. ``"stim_meta"``)."""
    doc = []
    for i, m in enumerate(items):
        if not isinstance(m, dict):
            raise TypeError(f"{name}[{i}] must be a dict, got {type(m).__name__}")
        doc.append(_encode(m, f"{name}[{i}]"))
    return _utf8_json(doc, items, name)


def _utf8_json(doc: Any, items: list[dict], name: str) -> bytes:
    """``doc`` (encoded from ``items``) as strict UTF-8 JSON; a string UTF-8 cannot encode (a lone
    surrogate) is refused, naming its entry."""
    text = json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{_unencodable(items, name) or name}: a string holds {text[e.start:e.end]!r} "
                         f"({e.reason}), which is not text; fix or remove that string") from None


def _unencodable(x: Any, where: str) -> str | None:
    """Where in ``x`` the first string (a value or a dict key) that UTF-8 cannot encode is, or None."""
    if isinstance(x, str):
        try:
            x.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    if isinstance(x, dict):
        for k, v in x.items():
            bad = _unencodable(k, f"{where} key {k!r}") or _unencodable(v, f"{where}[{k!r}]")
            if bad:
                return bad
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            bad = _unencodable(v, f"{where}[{i}]")
            if bad:
                return bad
    return None


def decode_meta(data: bytes) -> list[dict]:
    """Inverse of :func:`encode_meta`."""
    return [_decode(m) for m in json.loads(data.decode("utf-8"))]


def encode_columns(items: list[dict], name: str) -> bytes:
    """Metadata dicts as UTF-8 JSON *columns*: ``{"n": len, "columns": [{"key", "values",
    "absent", "tagged"}]}``. Columns decode in one ``json.loads`` each without a per-value
    walk unless they hold tagged values, and answer ``m[key] == value`` without building rows."""
    keys: dict[str, None] = {}
    for i, m in enumerate(items):
        if not isinstance(m, dict):
            raise TypeError(f"{name}[{i}] must be a dict, got {type(m).__name__}")
        keys.update(dict.fromkeys(m))
    columns = []
    for key in keys:
        if not isinstance(key, str):
            raise TypeError(f"{name}: key {key!r} is not a string; pooled metadata needs string keys")
        absent = [i for i, m in enumerate(items) if key not in m]
        values = [_encode(m[key], f"{name}[{i}][{key!r}]") if key in m else None for i, m in enumerate(items)]
        tagged = any(isinstance(v, (dict, list)) for v in values)
        columns.append({"key": key, "values": values, "absent": absent, "tagged": tagged})
    return _utf8_json({"n": len(items), "columns": columns}, items, name)


def decode_columns(data: bytes) -> tuple[int, dict[str, tuple[list, set[int]]]]:
    """Inverse of :func:`encode_columns`: ``(n, {key: (values, absent rows)})``."""
    doc = json.loads(data.decode("utf-8"))
    out = {}
    for col in doc["columns"]:
        values = [_decode(v) for v in col["values"]] if col["tagged"] else col["values"]
        out[col["key"]] = (values, set(col["absent"]))
    return doc["n"], out
