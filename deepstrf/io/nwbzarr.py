"""NWB files stored as Zarr (hdmf-zarr), read through zarr-python 3 into an in-memory HDF5 image.

hdmf-zarr pins zarr < 3, so it is not used. An NWB-Zarr session (a Zarr v2 hierarchy, local or at
any fsspec URL) is instead rebuilt as an HDF5 file in memory with the same groups, datasets,
attributes, links and references, and that image is read by pynwb exactly as an NWB (HDF5) file
is: both forms of a session give the same dataset. Supported, following hdmf-zarr's conventions
for Zarr v2 files (hdmf-zarr < 0.14, what archives serve today):

- groups, datasets (numeric, text, compound without references) and their attributes;
- links (group attribute ``zarr_link`` with ``source: "."``);
- object references in datasets (``zarr_dtype: "object"``, elements encoded with numcodecs' JSON
  codec) and in attributes (``{"zarr_dtype": "object", "value": {"path": ...}}``);
- scalar datasets (``zarr_dtype: "scalar"``); the cached specifications (root ``.specloc``);
- consolidated metadata (``.zmetadata``: one request), else the ``.zgroup`` / ``.zarray`` /
  ``.zattrs`` documents found by listing (not over ``https://``, which cannot be listed).

Refused with a clear error: links or references into another file, region references, object
arrays encoded with the Pickle codec (never unpickled), and the Zarr v3 layout of hdmf-zarr >= 0.14.
The arrays under ``/acquisition`` and ``/processing`` (raw data, LFP) are not copied unless they
belong to a series named in ``keep`` (e.g. ``stim_series``): their shape and dtype are kept, their
values are never read by the import.
"""

from __future__ import annotations

import io
import json
import posixpath
from typing import Any

import numpy as np

from ..errors import NWBReadError
from ..store.location import Location

BULK_GROUPS = ("acquisition", "processing")  # raw data and LFP: not copied unless kept
RESERVED_ATTRS = ("zarr_link", "zarr_dtype")
READ_THREADS = 16


def is_nwb_zarr(fs: Any, path: str) -> bool:
    """Is ``path`` the root of a Zarr v2 hierarchy (it holds ``.zgroup``)? One small request, also
    over HTTP, where a folder cannot be listed."""
    return fs.exists(f"{path.rstrip('/')}/.zgroup")


def metadata_document(fs: Any, path: str) -> str:
    """The document that changes when the session's metadata does: ``.zmetadata``, else ``.zgroup``."""
    consolidated = f"{path.rstrip('/')}/.zmetadata"
    return consolidated if fs.exists(consolidated) else f"{path.rstrip('/')}/.zgroup"


class _Hierarchy:
    """The metadata documents of a Zarr v2 hierarchy: ``{node path: {".zgroup"|".zarray"|".zattrs": doc}}``."""

    def __init__(self, loc: Location, fs: Any, root: str) -> None:
        self.loc, self.fs, self.root = loc, fs, root.rstrip("/")
        consolidated = f"{self.root}/.zmetadata"
        if fs.exists(consolidated):
            docs = json.loads(fs.cat_file(consolidated))["metadata"]
        else:
            keys = [p for p in fs.find(self.root) if posixpath.basename(p) in (".zgroup", ".zarray", ".zattrs")]
            docs = {k[len(self.root) + 1:]: json.loads(v) for k, v in fs.cat(keys).items()}
        self.store = loc.zarr_store(read_only=True)
        self.nodes: dict[str, dict[str, Any]] = {}
        for key, doc in docs.items():
            node, _, kind = key.rpartition("/") if "/" in key else ("", "", key)
            self.nodes.setdefault(node, {})[kind] = doc
        if self.nodes.get("", {}).get(".zgroup") is None:
            raise NWBReadError(f"{loc.url} is not a Zarr v2 group (no .zgroup); NWB-Zarr files written by "
                               "hdmf-zarr >= 0.14 (Zarr v3) are not supported.")

    def children(self, node: str) -> list[str]:
        prefix = f"{node}/" if node else ""
        return sorted(p for p in self.nodes if p.startswith(prefix) and p != node and "/" not in p[len(prefix):])

    def attrs(self, node: str) -> dict:
        return self.nodes[node].get(".zattrs", {})

    def read_arrays(self, keep: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Every array the image holds values of, read concurrently (remote reads overlap)."""
        from ..forksafe import thread_map

        paths = [p for p, kinds in self.nodes.items() if ".zarray" in kinds
                 and self.attrs(p).get("zarr_dtype") != "object" and not _skipped(p, keep)]
        return dict(zip(paths, thread_map(lambda p: _read_array(self, p), paths, max_workers=READ_THREADS,
                                          name="deepstrf-nwbzarr")))


def hdf5_image(loc: Location, fs: Any, root: str, keep: tuple[str, ...] = ()) -> io.BytesIO:
    """The HDF5 bytes of the NWB-Zarr session at ``root`` (see the module docstring)."""
    import h5py

    tree = _Hierarchy(loc, fs, root)
    values = tree.read_arrays(keep)
    buf = io.BytesIO()
    with h5py.File(buf, "w") as h5:
        late: list[tuple[Any, str, Any]] = []  # (h5 object, attribute name, reference path or attrs)
        _copy_group(tree, "", h5, values, late)
        for obj, name, path in late:
            if name == "@links":
                for link in path:
                    obj[link["name"]] = h5py.SoftLink(link["path"])
            elif name == "@refs":
                obj[...] = np.array([h5[p].ref for p in path.reshape(-1)], dtype=h5py.ref_dtype).reshape(obj.shape)
            else:
                obj.attrs[name] = h5[path].ref
    buf.seek(0)
    return buf


def _where(tree: _Hierarchy, node: str) -> str:
    return f"{tree.loc.url}/{node}" if node else tree.loc.url


def _copy_attrs(tree: _Hierarchy, node: str, obj: Any, late: list) -> None:
    import h5py

    for name, value in tree.attrs(node).items():
        if name in RESERVED_ATTRS:
            continue
        if node == "" and name == ".specloc":
            late.append((obj, name, "/" + str(value).lstrip("/")))
        elif isinstance(value, dict) and value.get("zarr_dtype") == "object":
            late.append((obj, name, _reference_path(tree, node, value["value"])))
        elif isinstance(value, dict):
            raise NWBReadError(f"{_where(tree, node)}: attribute {name!r} holds a {value.get('zarr_dtype')!r} "
                               "value, which is not supported (region references).")
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            obj.attrs[name] = np.array(value, dtype=h5py.string_dtype())
        elif isinstance(value, list):
            obj.attrs[name] = np.array(value)
        else:
            obj.attrs[name] = value


def _reference_path(tree: _Hierarchy, node: str, ref: Any) -> str:
    if not isinstance(ref, dict) or "path" not in ref:
        raise NWBReadError(f"{_where(tree, node)}: an object reference is not a {{source, path}} document: {ref!r}")
    if ref.get("source", ".") not in (".", "", None):
        raise NWBReadError(f"{_where(tree, node)}: a reference points into another file ({ref['source']!r}); "
                           "references across NWB-Zarr files are not supported.")
    return "/" + ref["path"].lstrip("/")


def _copy_group(tree: _Hierarchy, node: str, group: Any, values: dict, late: list) -> None:
    for child in tree.children(node):
        name = posixpath.basename(child)
        kinds = tree.nodes[child]
        if ".zgroup" in kinds:
            _copy_group(tree, child, group.create_group(name), values, late)
        elif ".zarray" in kinds:
            _copy_array(tree, child, group, name, values.pop(child, None), late)
    links = tree.attrs(node).get("zarr_link") or []
    for link in links:
        link["path"] = _reference_path(tree, node, link)
    if links:
        late.append((group, "@links", links))
    _copy_attrs(tree, node, group, late)


def _copy_array(tree: _Hierarchy, node: str, group: Any, name: str, data: np.ndarray | None, late: list) -> None:
    """One dataset of the image: references (filled in later), the values read, or (``data`` None)
    an unfilled dataset of the same shape and dtype."""
    import h5py

    meta, attrs = tree.nodes[node][".zarray"], tree.attrs(node)
    kind = attrs.get("zarr_dtype")
    if kind == "object":
        refs = _json_chunks(tree, node, meta)
        ds = group.create_dataset(name, shape=refs.shape, dtype=h5py.ref_dtype)
        late.append((ds, "@refs", np.vectorize(lambda r: _reference_path(tree, node, r), otypes=[object])(refs)
                     if refs.size else refs))
    elif data is None:
        dtype = np.dtype("float64") if meta["dtype"] == "|O" else _dtype(meta["dtype"])
        ds = group.create_dataset(name, shape=tuple(meta["shape"]), dtype=dtype,
                                  chunks=tuple(max(1, c) for c in meta["chunks"]) if meta["shape"] else None)
    else:
        if kind == "scalar":
            data = data.reshape(-1)[0]
        if isinstance(data, str) or (isinstance(data, np.ndarray) and data.dtype.kind in "OUT"):
            ds = group.create_dataset(name, data=np.asarray(data, dtype=object) if not isinstance(data, str)
                                      else data, dtype=h5py.string_dtype())
        else:
            ds = group.create_dataset(name, data=data)
    _copy_attrs(tree, node, ds, late)


def _skipped(node: str, keep: tuple[str, ...]) -> bool:
    parts = node.split("/")
    return parts[0] in BULK_GROUPS and not any(k in parts for k in keep if k)


def _dtype(spec: Any) -> np.dtype:
    return np.dtype([tuple(f) for f in spec]) if isinstance(spec, list) else np.dtype(spec)


def _read_array(tree: _Hierarchy, node: str) -> np.ndarray:
    import zarr

    try:
        arr = zarr.open_array(store=tree.store, path=node, mode="r", zarr_format=2)
        return np.asarray(arr[...])
    except (ValueError, TypeError, KeyError) as e:
        raise NWBReadError(f"{_where(tree, node)}: array cannot be read ({type(e).__name__}: {e}).") from e


def _json_chunks(tree: _Hierarchy, node: str, meta: dict) -> np.ndarray:
    """An object array of JSON documents, decoded chunk by chunk with numcodecs (zarr-python 3 has no
    data type for it)."""
    import numcodecs

    filters = meta.get("filters") or []
    if not filters or filters[-1].get("id") not in ("json2", "json"):
        codec = filters[-1].get("id") if filters else None
        raise NWBReadError(f"{_where(tree, node)}: object references encoded with {codec!r}; only the JSON codec "
                           "is read (pickled data is never loaded).")
    shape, chunks = tuple(meta["shape"]), tuple(meta["chunks"])
    out = np.empty(shape, dtype=object)
    if not out.size:
        return out
    sep = meta.get("dimension_separator", ".")
    grid = [range(-(-s // c)) for s, c in zip(shape, chunks)]
    compressor = numcodecs.get_codec(meta["compressor"]) if meta.get("compressor") else None
    codecs = [numcodecs.get_codec(f) for f in filters]
    for index in np.ndindex(*[len(g) for g in grid]):
        raw = tree.fs.cat_file(f"{tree.root}/{node}/{sep.join(map(str, index))}")
        if compressor is not None:
            raw = compressor.decode(raw)
        for codec in reversed(codecs):
            raw = codec.decode(raw)
        block = np.asarray(raw, dtype=object).reshape(chunks)
        where = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, chunks, shape))
        out[where] = block[tuple(slice(0, w.stop - w.start) for w in where)]
    return out
