"""Full check of a source store: every chunk decoded, every digest and the fingerprint recomputed."""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..errors import StoreError
from . import format as fmt
from .integrity import array_digest, content_hasher, fingerprint, update
from .location import Location
from .reader import SourceReader, open_group

BLOCK_CHUNKS = 16  # chunks read per concurrent request group


def verify_source(loc: Location, *, progress: bool | None = None) -> list[str]:
    """Problems found in the store at ``loc`` (an empty list means it is sound)."""
    try:
        group = open_group(loc)
        attrs = dict(group.attrs)
        fmt.check_format(attrs, loc.url, fmt.SOURCE_FORMAT)
        reader = SourceReader(loc, attrs)
        reader.bind(group)
    except StoreError as e:
        return [str(e)]
    problems: list[str] = []
    arrays = reader.arrays()
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
    ok = True
    for a in range(0, L, C * BLOCK_CHUNKS):
        b = min(L, a + C * BLOCK_CHUNKS)
        (res,) = reader.gather([(name, (slice(a, b), ...))])
        if isinstance(res, BaseException):
            ok = False
            problems.append(_describe(reader, name, a, b, res))
        else:
            update(hasher, np.asarray(res))
        bar.update((b - a) * row_bytes)
    return array_digest(hasher) if ok else None


def _describe(reader: SourceReader, name: str, a: int, b: int, err: BaseException) -> str:
    if name == fmt.VALUES:
        try:
            return str(reader.cell_error(err, a, b))
        except StoreError as e:  # the index itself is unreadable
            return str(e)
    return str(reader.error(err, f"array {name!r} rows {a}-{b - 1}"))
