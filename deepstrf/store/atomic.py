"""Atomic publication of a store: readers see the old store, or the new one, never a half.

The root ``zarr.json`` of a store is its completion marker: it is written
last, so an interrupted write never opens as valid. Local stores are written
in a hidden sibling folder and renamed into place. On object stores (no
atomic rename) a new store is written in place with its root held back;
replacing an existing store writes a hidden sibling first, and only once it
is complete removes the old store (root marker first) and copies the new one
in (root marker last).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from zarr.core.sync import sync
from zarr.storage import WrapperStore

from ..errors import StoreError, StoreExistsError
from ..tempdirs import OWNER_PATTERN, ended, owner
from .format import SOURCE_FORMAT, VERSIONS_FORMAT
from .location import ROOT_KEY, Location

OWN_TOP_LEVEL = ("responses", "stims", "meta")
STAGING_MARKER = ".writing"  # an empty object a publish keeps in its staging group until it commits (versions.py)


class DeferredRootStore(WrapperStore):
    """Store wrapper holding the root ``zarr.json`` in memory until :meth:`publish`."""

    def __init__(self, store, held: dict | None = None) -> None:
        super().__init__(store)
        self._held = {} if held is None else held

    def _with_store(self, store):
        return type(self)(store, self._held)

    async def set(self, key, value):
        if key == ROOT_KEY:
            self._held[key] = value
        else:
            await self._store.set(key, value)

    async def set_if_not_exists(self, key, value):
        if key == ROOT_KEY:
            self._held.setdefault(key, value)
        else:
            await self._store.set_if_not_exists(key, value)

    async def get(self, key, prototype, byte_range=None):
        if key == ROOT_KEY and byte_range is None and key in self._held:
            return self._held[key]
        return await self._store.get(key, prototype, byte_range)

    async def exists(self, key):
        return key in self._held if key == ROOT_KEY else await self._store.exists(key)

    async def list_dir(self, prefix):
        async for key in self._store.list_dir(prefix):
            if prefix or key != STAGING_MARKER:  # not part of the hierarchy (zarr would warn when consolidating)
                yield key

    async def publish(self) -> None:
        if ROOT_KEY not in self._held:
            raise StoreError("internal error: the root zarr.json was never written")
        await self._store.set(ROOT_KEY, self._held[ROOT_KEY])


@dataclass
class Staging:
    """Where a write goes before it is published: a zarr store and its location."""

    store: DeferredRootStore
    location: Location


def store_state(loc: Location) -> str:
    """``"absent"``, ``"store"`` (has a root ``zarr.json``), ``"partial"`` (other objects only) or
    ``"file"`` (a file, not a folder, at the store's own path)."""
    if loc.is_local:
        if not os.path.exists(loc.url):
            return "absent"
        if not os.path.isdir(loc.url):
            return "file"
        if os.path.isfile(os.path.join(loc.url, ROOT_KEY)):
            return "store"
        if os.path.isdir(loc.url) and not os.listdir(loc.url):
            return "absent"
        return "partial"
    fs, path = loc.filesystem()
    fs.invalidate_cache()
    if fs.exists(f"{path}/{ROOT_KEY}"):
        return "store"
    if _remote_keys(fs, path):
        return "partial"
    return "file" if fs.isfile(path) else "absent"


def _remote_keys(fs, path: str) -> list[str]:
    try:
        found = fs.find(path)
    except FileNotFoundError:
        return []
    return [p for p in found if p.startswith(path.rstrip("/") + "/")]


def _relative_keys(loc: Location) -> list[str]:
    if loc.is_local:
        return [os.path.relpath(os.path.join(d, f), loc.url).replace(os.sep, "/")
                for d, _, files in os.walk(loc.url) for f in files]
    fs, path = loc.filesystem()
    return [k[len(path.rstrip("/")) + 1:] for k in _remote_keys(fs, path)]


def _kind_name(fmt: str) -> str:
    """``"source"`` or ``"pool"`` for a deepstrf format (a versioned source's root is an index)."""
    return "source" if fmt == VERSIONS_FORMAT else fmt.removeprefix("deepstrf.")


def _format_at(fs, path: str) -> str:
    """The ``format`` attribute of the root ``zarr.json`` at ``path`` (one read); ``""`` where there is
    none, it cannot be read, or it names no format."""
    try:
        doc = json.loads(fs.cat_file(f"{path}/{ROOT_KEY}"))
    except (OSError, ValueError):
        return ""
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    fmt = attrs.get("format") if isinstance(attrs, dict) else None
    return fmt if isinstance(fmt, str) else ""


def _parents(url: str) -> Iterator[str]:
    """The folders or prefixes above ``url``, nearest first (a bucket is the last of an object store's)."""
    scheme, sep, path = url.rpartition("://")
    parts = path.rstrip("/").split("/")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1]:
            yield scheme + sep + "/".join(parts[:i])


def _check_not_nested(loc: Location) -> None:
    """Refuse a store inside a deepstrf store (in any parent folder or prefix of ``loc``): replacing
    or pruning that store would delete it. One read of a ``zarr.json`` per parent, no listing."""
    fs, _ = loc.filesystem()
    for parent in _parents(loc.url):
        fmt = _format_at(fs, parent)
        if fmt.startswith("deepstrf."):
            raise StoreError(
                f"cannot write {loc.url}: it lies inside {parent}, a {_kind_name(fmt)} store, which would delete "
                "it when replaced or pruned. Choose a URL outside that store.")


def _check_replaceable(loc: Location, state: str, own: tuple[str, ...], kind: str) -> None:
    """Refuse to delete anything but a deepstrf store of the same ``kind`` (format) or the remains
    of a deepstrf write."""
    if state == "store":
        fmt = _format_at(*loc.filesystem())
        if fmt == kind:
            return
        if fmt.startswith("deepstrf."):  # _format_at gives a str
            raise StoreExistsError(
                f"{loc.url} holds a {_kind_name(fmt)} store and this writes a {_kind_name(kind)}; refusing to "
                "replace it even with overwrite=True (a source's versions, or the pool others open by this URL, "
                "would be lost). Choose another URL, or remove it yourself.")
        raise StoreExistsError(
            f"{loc.url} holds a zarr store that deepstrf did not write; refusing to replace it even with "
            "overwrite=True. Remove it yourself or choose another URL.")
    stray = [k for k in _relative_keys(loc) if k.split("/")[0] not in own]
    if stray:
        raise StoreExistsError(
            f"{loc.url} is not empty and is not a deepstrf store (e.g. {stray[0]!r}); refusing to delete "
            "it even with overwrite=True. Choose another URL or remove it yourself.")


def remove(loc: Location) -> None:
    """Delete everything at ``loc`` (best effort; missing is fine)."""
    if loc.is_local:
        shutil.rmtree(loc.url, ignore_errors=True)
        return
    fs, path = loc.filesystem()
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    fs.invalidate_cache()


_SIBLING = re.compile(rf"\.(?P<stem>.+)\.(?P<role>tmp|old)-{OWNER_PATTERN}~[0-9a-f]{{8}}")  # _sibling_name's


def _sibling_name(loc: Location, role: str) -> str:
    """A hidden sibling of ``loc`` for a write (``role``: ``tmp``, the new store being written;
    ``old``, the replaced one until it is deleted), named after the host, process-id namespace and
    process writing it."""
    return f".{loc.name}.{role}-{owner()}~{os.getpid()}~{uuid.uuid4().hex[:8]}"


def _remove_abandoned(folder: str) -> None:
    """Delete the staging folders (a full store or version each) that writes into local ``folder``
    by processes of this host (and process-id namespace) that were killed left behind. Where a
    killed write also left the store it was replacing (an ``old`` sibling: killed between its two
    renames), that store's folders are not touched: they are its only copies."""
    abandoned: dict[tuple[str, str], list[str]] = {}
    for name in os.listdir(folder):
        found = _SIBLING.fullmatch(name)
        if found and ended(found):
            abandoned.setdefault((found["stem"], found["role"]), []).append(os.path.join(folder, name))
    for (stem, role), paths in abandoned.items():
        if role == "tmp" and (stem, "old") not in abandoned:
            for path in paths:
                shutil.rmtree(path, ignore_errors=True)


def _publish_local(staging: Location, loc: Location, replace: bool) -> None:
    if not replace:
        if os.path.isdir(loc.url):
            os.rmdir(loc.url)  # empty (checked by store_state); rename needs the name free
        os.rename(staging.url, loc.url)
        return
    trash = loc.sibling(_sibling_name(loc, "old"))
    os.rename(loc.url, trash.url)
    try:
        os.rename(staging.url, loc.url)
    except BaseException:
        os.rename(trash.url, loc.url)
        raise
    shutil.rmtree(trash.url, ignore_errors=True)


def _publish_remote_replace(staging: Location, loc: Location) -> None:
    fs, dst = loc.filesystem()
    _, src = staging.filesystem()
    try:
        fs.rm(f"{dst}/{ROOT_KEY}")  # from here on the old store no longer opens
    except FileNotFoundError:
        pass  # replacing the remains of an interrupted write
    remove(loc)
    keys = [k for k in _remote_keys(fs, src) if k != f"{src}/{ROOT_KEY}"]
    fs.copy(keys, [dst + k[len(src):] for k in keys])
    fs.copy(f"{src}/{ROOT_KEY}", f"{dst}/{ROOT_KEY}")
    fs.invalidate_cache()
    remove(staging)


# object stores whose first path component is a bucket (container) that a write cannot create
BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs")


def _check_bucket(loc: Location) -> None:
    """Refuse a store in a bucket that does not exist before anything is written (the first write
    would otherwise fail deep inside zarr with the object store's bare error)."""
    if loc.protocol not in BUCKET_PROTOCOLS:
        return
    fs, path = loc.filesystem()
    bucket = path.split("/", 1)[0]
    try:
        found = fs.exists(bucket)
    except (OSError, ValueError):  # not allowed to look (a write-only key): the write will tell
        return
    if not found:
        raise StoreError(
            f"cannot write {loc.url}: the bucket {bucket!r} does not exist at this endpoint. Create it first "
            f"(for S3: `aws s3 mb {loc.protocol}://{bucket}`, or s3fs.S3FileSystem(...).mkdir({bucket!r})), "
            "or check the URL and storage_options (endpoint_url, credentials).")


@contextmanager
def staged_write(loc: Location, *, overwrite: bool, kind: str = SOURCE_FORMAT,
                 own_top_level: tuple[str, ...] = OWN_TOP_LEVEL, within: Location | None = None) -> Iterator[Staging]:
    """Yield a :class:`Staging` to write a store into; publish it at ``loc`` on success.

    ``overwrite=False`` refuses a non-empty ``loc`` before writing anything.
    On failure the staging area is removed and ``loc`` is left as it was.
    ``kind`` is the format written: ``overwrite`` replaces only a store of that
    format. ``own_top_level`` names the top-level keys a deepstrf store of this
    kind writes (what may be removed when replacing an interrupted write).
    A file at ``loc`` is never replaced. Neither ``loc`` nor ``within`` (the store that ``loc`` is
    part of, e.g. a version's group inside its source store) may lie inside another deepstrf store.
    """
    loc.check_writable()
    _check_bucket(loc)
    _check_not_nested(within or loc)
    state = store_state(loc)
    if state == "file":
        raise StoreExistsError(f"{loc.url} is a file, not a store; refusing to replace it, even with overwrite=True. "
                               "Choose another URL, or remove the file yourself.")
    if state != "absent":
        if not overwrite:
            what = "a store" if state == "store" else "files (an interrupted write?)"
            raise StoreExistsError(f"{loc.url} already holds {what}; pass overwrite=True to replace it.")
        _check_replaceable(loc, state, own_top_level, kind)
    in_place = state == "absent" and not loc.is_local
    target = loc if in_place else loc.sibling(_sibling_name(loc, "tmp"))
    if target.is_local:
        os.makedirs(os.path.dirname(target.url), exist_ok=True)
        _remove_abandoned(os.path.dirname(target.url))
    staging = Staging(DeferredRootStore(target.zarr_store(read_only=False)), target)
    try:
        yield staging
        sync(staging.store.publish())
        if loc.is_local:
            _publish_local(target, loc, replace=state != "absent")
        elif not in_place:
            _publish_remote_replace(target, loc)
    except BaseException:
        remove(target)
        raise


_CONSOLIDATING = threading.Lock()


def consolidate(store) -> None:
    """Write zarr's inline consolidated metadata into the (held-back) root ``zarr.json``."""
    import zarr

    # zarr notes that consolidation is not in the v3 spec yet; catch_warnings swaps the process's
    # filters, so two threads publishing at once would restore them under each other
    with _CONSOLIDATING, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(store)


def stored_bytes(loc: Location) -> int:
    """Total size of the objects under ``loc``."""
    if loc.is_local:
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(loc.url) for f in files)
    fs, path = loc.filesystem()
    fs.invalidate_cache()
    return int(fs.du(path))

