"""Full check of a source store: every chunk decoded, every digest and the fingerprint recomputed;
and, for sources and pools, every array's own ``zarr.json`` against the consolidated metadata."""

from __future__ import annotations

import json
from typing import Any

import zarr

import numpy as np
from tqdm.auto import tqdm

from ..errors import StoreError
from . import format as fmt
from .integrity import array_digest, content_hasher, fingerprint, update
from .location import Location
from .reader import SourceReader, consolidated_arrays, group_of, read_root
from .schema import as_written

BLOCK_CHUNKS = 16  # chunks read per concurrent request group


def verify_source(loc: Location, *, progress: bool | None = None, root: dict | None = None,
                  published: tuple[Location, str] | None = None) -> list[str]:
    """Problems found in the store at ``loc`` (an empty list means it is sound); ``root``: its root
    document when known (a versioned store's first version keeps it in its manifest); ``published``:
    the store ``loc`` is a version of and its path there (the advice then names that version)."""
    try:
        root = read_root(loc) if root is None else root
        group = group_of(loc, root)
        attrs = dict(group.attrs)
        fmt.check_format(attrs, loc.url, fmt.SOURCE_FORMAT)
        reader = SourceReader(loc, attrs, consolidated_arrays(root))
        reader.published = published
        arrays = reader.arrays()
    except StoreError as e:
        return [str(e)]
    problems = metadata_problems(loc, group)
    total = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in arrays.values())
    recorded = attrs.get("arrays", {})
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"verify {loc.name}",
              disable=None if progress is None else not progress) as bar:
        for name in fmt.ARRAYS:
            digest = _check_array(reader, name, arrays[name], bar, problems)
            if digest is not None and digest != recorded.get(name):
                problems.append(f"{loc.url}: content of {name} does not match the digest recorded at write time "
                                f"({digest} != {recorded.get(name)}); the store was modified or damaged.")
    if fingerprint(attrs) != attrs.get("fingerprint"):
        problems.append(f"{loc.url}: the recorded fingerprint does not match the store's attributes and digests.")
    for check in (reader.index, reader.read_meta):
        try:
            check()
        except StoreError as e:
            problems.append(str(e))
    return problems


def _check_array(reader: SourceReader, name: str, arr: Any, bar: tqdm, problems: list[str]) -> str | None:
    """Read ``name`` block by block; return its digest, or None after recording an unreadable chunk."""
    hasher = content_hasher()
    C, L = arr.chunks[0], arr.shape[0]
    row_bytes = int(np.prod(arr.shape[1:])) * arr.dtype.itemsize
    for a in range(0, L, C * BLOCK_CHUNKS):
        b = min(L, a + C * BLOCK_CHUNKS)
        (res,) = reader.gather([(name, (slice(a, b), ...))])
        if isinstance(res, BaseException):  # the first damage ends the array: a store declaring more
            problems.append(_describe(reader, name, a, b, res))  # than it holds is not read on and on
            return None
        update(hasher, np.asarray(res))
        bar.update((b - a) * row_bytes)
    return array_digest(hasher)


def _describe(reader: SourceReader, name: str, a: int, b: int, err: BaseException) -> str:
    if name == fmt.VALUES:
        try:
            return str(reader.cell_error(err, a, b))
        except StoreError as e:  # the index itself is unreadable
            return str(e)
    return str(reader.error(err, f"array {name!r} rows {a}-{b - 1}"))


def metadata_problems(loc: Location, group: zarr.Group) -> list[str]:
    """Each array's own ``zarr.json`` must exist, parse and say what the consolidated copy says.

    deepstrf opens a store from the consolidated metadata alone, but any other Zarr reader (and
    a rewrite of the consolidation) uses the per-array documents: a damaged one is a damaged store.
    """
    consolidated = group.metadata.consolidated_metadata
    if consolidated is None:
        return [f"{loc.url}: the root zarr.json holds no consolidated metadata; the store was not written "
                "by deepstrf or was rewritten. Re-create it from its source."]
    fs, root = loc.filesystem()
    problems = []
    for name, meta in sorted(consolidated.flattened_metadata.items()):
        key = f"{name}/zarr.json"
        where = f"{loc.url}: {key}"
        try:
            own = json.loads(fs.cat_file(f"{root}/{key}"))
        except FileNotFoundError:
            problems.append(f"{where} is missing (other Zarr readers cannot open {name!r}); re-create the store.")
            continue
        except (ValueError, UnicodeDecodeError) as e:
            problems.append(f"{where} cannot be parsed ({e}); other Zarr readers fail on it. Re-create the store.")
            continue
        if not isinstance(own, dict) or own.get("node_type") != meta.node_type:
            problems.append(f"{where} does not describe the {meta.node_type} the consolidated metadata lists; "
                            "re-create the store.")
        elif meta.node_type == "array" and own != as_written(meta):
            problems.append(f"{where} differs from the consolidated metadata (shape, codecs or attributes); "
                            "the store was modified after it was written. Re-create it.")
    return problems
