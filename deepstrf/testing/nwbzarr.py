"""Write the NWB-Zarr twin of an NWB (HDF5) file, in the layout hdmf-zarr < 0.14 writes (Zarr v2).

For the tests and the benchmark: hdmf-zarr itself pins zarr < 3, so the twin is written here with
zarr-python 3 (``zarr_format=2``) and numcodecs, following hdmf-zarr's storage conventions:

- groups and datasets mirror the HDF5 ones, attributes become JSON (``.zattrs``);
- soft links become the group attribute ``zarr_link``: ``[{"name", "source": ".", "path"}]``;
- object-reference datasets are object arrays encoded with numcodecs' ``JSON`` codec, each element
  ``{"source": ".", "path", "object_id", "source_object_id"}``, with ``zarr_dtype: "object"``;
- reference attributes are ``{"zarr_dtype": "object", "value": {"source": ".", "path", ...}}``;
- scalar datasets are shape ``(1,)`` arrays with ``zarr_dtype: "scalar"``; text is variable-length UTF-8;
- the root attribute ``.specloc`` names the group holding the cached specifications;
- all metadata is consolidated in ``.zmetadata``.

Compound datasets holding references and region references are not written (the synthetic
sessions of :mod:`deepstrf.testing.nwb` have none).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

CHUNK_BYTES = 1 << 20


def write_nwb_zarr(h5_path: str | os.PathLike, out: str | os.PathLike) -> None:
    """Write the NWB-Zarr (Zarr v2) twin of the NWB file at ``h5_path`` into the folder ``out``."""
    import h5py
    import zarr

    with h5py.File(h5_path, "r") as h5:
        root = zarr.open_group(os.fspath(out), mode="w", zarr_format=2)
        root_id = h5.attrs.get("object_id")
        _write_group(h5, h5, root, os.fspath(out), _text(root_id))
    _consolidate(os.fspath(out))


def _text(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v


def _attr(h5: Any, value: Any) -> Any:
    import h5py

    if isinstance(value, h5py.Reference):
        target = h5[value]
        return {"zarr_dtype": "object", "value": {"source": ".", "path": target.name,
                                                  "object_id": _text(target.attrs.get("object_id")),
                                                  "source_object_id": _text(h5.attrs.get("object_id"))}}
    if isinstance(value, np.ndarray):
        return [_attr(h5, v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return _text(value)


def _attrs(h5: Any, node: Any) -> dict:
    out = {}
    for k, v in node.attrs.items():
        out[k] = h5[v].name.lstrip("/") if k == ".specloc" else _attr(h5, v)
    return out


def _write_group(h5: Any, group: Any, zgroup: Any, root: str, root_id: Any) -> None:
    import h5py

    links = []
    for name in group:
        link = group.get(name, getlink=True)
        if isinstance(link, h5py.SoftLink):
            links.append({"name": name, "source": ".", "path": link.path})
            continue
        if isinstance(link, h5py.ExternalLink):
            raise NotImplementedError(f"external link {group.name}/{name} is not written")
        node = group[name]
        if isinstance(node, h5py.Group):
            _write_group(h5, node, zgroup.create_group(name), root, root_id)
        else:
            _write_dataset(h5, node, zgroup, name, root, root_id)
    attrs = _attrs(h5, group)
    if links:
        attrs["zarr_link"] = links
    zgroup.attrs.update(attrs)


def _write_dataset(h5: Any, ds: Any, zgroup: Any, name: str, root: str, root_id: Any) -> None:
    import h5py

    attrs = _attrs(h5, ds)
    if h5py.check_dtype(ref=ds.dtype) is h5py.Reference:
        refs = np.empty(ds.shape, dtype=object)
        for i, r in enumerate(ds[()].reshape(-1)):
            target = h5[r]
            refs.reshape(-1)[i] = {"source": ".", "path": target.name, "source_object_id": root_id,
                                   "object_id": _text(target.attrs.get("object_id"))}
        _write_json_array(os.path.join(root, zgroup.path, name), refs)
        with open(os.path.join(root, zgroup.path, name, ".zattrs"), "w") as f:
            json.dump({**attrs, "zarr_dtype": "object"}, f)
        return
    if ds.dtype.names is not None and any(h5py.check_dtype(ref=ds.dtype[n]) for n in ds.dtype.names):
        raise NotImplementedError(f"compound dataset {ds.name} with references is not written")
    data = ds[()]
    if ds.shape == ():
        data = np.asarray([data])
        attrs["zarr_dtype"] = "scalar"
    text = h5py.check_string_dtype(ds.dtype) is not None
    if text:
        data = np.array([_text(v) for v in np.asarray(data).reshape(-1)], dtype=str).reshape(np.shape(data))
    itemsize = max(1, data.dtype.itemsize)
    rows = max(1, CHUNK_BYTES // max(1, itemsize * int(np.prod(data.shape[1:], dtype=np.int64))))
    arr = zgroup.create_array(name, shape=data.shape, dtype=str if text else data.dtype,
                              chunks=(min(rows, max(1, data.shape[0])), *data.shape[1:]) if data.ndim else ())
    if data.size:
        arr[...] = data
    arr.attrs.update(attrs)


def _write_json_array(path: str, values: np.ndarray) -> None:
    """An object array encoded with numcodecs' JSON codec in one chunk (zarr-python 3 does not write these)."""
    import numcodecs

    codec = numcodecs.JSON()
    os.makedirs(path, exist_ok=True)
    meta = {"zarr_format": 2, "shape": list(values.shape), "chunks": list(values.shape) or [1], "dtype": "|O",
            "compressor": None, "fill_value": None, "filters": [codec.get_config()], "order": "C",
            "dimension_separator": "."}
    with open(os.path.join(path, ".zarray"), "w") as f:
        json.dump(meta, f)
    if values.size:
        with open(os.path.join(path, ".".join("0" * max(1, values.ndim))), "wb") as f:
            f.write(bytes(codec.encode(values)))


def _consolidate(root: str) -> None:
    """``.zmetadata``: every ``.zgroup``, ``.zarray`` and ``.zattrs`` of the hierarchy in one document."""
    metadata = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if f in (".zgroup", ".zarray", ".zattrs"):
                key = os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/")
                with open(os.path.join(folder, f)) as fh:
                    metadata[key] = json.load(fh)
    with open(os.path.join(root, ".zmetadata"), "w") as f:
        json.dump({"zarr_consolidated_format": 1, "metadata": metadata}, f)
