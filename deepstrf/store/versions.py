"""Versions of a source store: publishing a new one, finding one, pruning old ones.

A source store that has been published again holds every version as a plain
source group (``versions/<id>/``), one small manifest per version
(``manifests/<id>.json``, written after the version's group is complete: its
presence publishes the version), and a root ``zarr.json`` indexing them for
readers that cannot list (HTTP). The latest version is the manifest with the
greatest id (ids begin with the UTC time of publication), found by listing
``manifests/`` where the storage can list, so two publishers never overwrite
each other's version. A store written before its first re-publish keeps its
arrays at the root: they become the first version (path ``""``), whose root
document moves into its manifest. ``docs/format.md`` describes the layout.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from ..errors import IntegrityError, StoreError, VersionNotFoundError
from . import format as fmt
from .format import VERSIONS_FORMAT
from .atomic import OWN_TOP_LEVEL, STAGING_MARKER, Staging, remove, staged_write
from .location import ROOT_KEY, Location
from .options import StorageOptions
from .reader import read_root
from .schema import check_attributes

VERSIONS_FORMAT_VERSION = "1.0"
VERSIONS_DIR, MANIFESTS_DIR = "versions", "manifests"
FIRST_ID = "00000000T000000000000Z"  # the id of a store's content from before its first re-publish
ORPHAN_AGE_S = 3600  # prune removes version folders without a manifest once nothing was written there for this long


_VERSION_PATH = re.compile(rf"{VERSIONS_DIR}/[0-9A-Za-z][0-9A-Za-z_-]*")


def checked_path(path: str, where: str) -> str:
    """``path`` if it names a version group inside a store (``""`` or ``versions/<id>``); a path
    from a damaged or hostile manifest or pool that would lead elsewhere is refused."""
    if path == "" or (isinstance(path, str) and _VERSION_PATH.fullmatch(path)):
        return path
    raise IntegrityError(f"{where}: version path {path!r} is not a version of the store ({VERSIONS_DIR}/<id>); "
                         "it is damaged or was edited to lead elsewhere: refusing to follow it.")


@dataclass(frozen=True)
class Version:
    """One published version of a source store."""

    id: str
    path: str            # the version's group inside the store; "" for the arrays at the root
    fingerprint: str
    tag: str | None
    date: str | None     # ISO 8601, UTC
    n_stims: int
    n_neurons: int
    root: dict | None = None  # the root document of the version at path "" (the root itself indexes)

    @property
    def short(self) -> str:
        """The fingerprint's first 12 hex digits."""
        return self.fingerprint.split(":")[-1][:12]

    def describe(self) -> str:
        tag = f" tag {self.tag!r}" if self.tag else ""
        return f"{self.short}{tag} ({self.date or 'date unknown'}, {self.n_stims} x {self.n_neurons})"

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("tag", "date")}

    @classmethod
    def from_json(cls, doc: Any, where: str) -> "Version":
        try:
            version = cls(id=str(doc["id"]), path=str(doc["path"]), fingerprint=str(doc["fingerprint"]),
                          tag=doc.get("tag"), date=doc.get("date"), n_stims=int(doc["n_stims"]),
                          n_neurons=int(doc["n_neurons"]), root=doc.get("root"))
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{where}: damaged version manifest ({e!r}); remove it or prune the store") from e
        checked_path(version.path, where)
        return version

    @classmethod
    def of_root(cls, doc: dict, url: str, version_id: str = FIRST_ID, path: str = "", date: str | None = None,
                keep_root: bool = True) -> "Version":
        """The version whose source group (at ``url``) has root document ``doc`` (kept for the root's own)."""
        attrs = doc.get("attributes") or {}
        fmt.check_format(attrs, url, fmt.SOURCE_FORMAT)
        check_attributes(attrs, url)
        return cls(version_id, path, attrs["fingerprint"], None, date, attrs["n_stims"], attrs["n_neurons"],
                   doc if keep_root else None)


def is_versioned(root: dict) -> bool:
    """Is ``root`` the document of a versioned store's index?"""
    return (root.get("attributes") or {}).get("format") == VERSIONS_FORMAT


def _listable(loc: Location) -> bool:
    return not loc.read_only


def versions_of(loc: Location, root: dict | None = None) -> list[Version]:
    """The versions of the source store at ``loc``, oldest first (an unversioned store: its one)."""
    root = read_root(loc) if root is None else root
    attrs = root.get("attributes") or {}
    if attrs.get("format") == fmt.SOURCE_FORMAT:
        return [Version.of_root(root, loc.url, date=_modified(loc, ROOT_KEY))]
    if attrs.get("format") != VERSIONS_FORMAT:
        raise StoreError(f"{loc.url} holds a {attrs.get('format')!r} group, which has no versions; "
                         "only source stores are versioned.")
    fmt.check_format(attrs, loc.url, VERSIONS_FORMAT)
    if not _listable(loc):
        return [Version.from_json(v, loc.url) for v in attrs.get("versions", [])]
    return _listed(loc)


def _listed(loc: Location, latest_only: bool = False) -> list[Version]:
    """Every published version (or only the latest), from the manifests: one listing, then the
    contents of those wanted."""
    ids = _manifest_ids(loc)
    names = [f"{i}.json" for i in (ids[-1:] if latest_only else ids)]
    if loc.is_local:
        docs = []
        for n in names:
            with open(os.path.join(loc.url, MANIFESTS_DIR, n), "rb") as f:
                docs.append(f.read())
    else:
        fs, path = loc.filesystem()
        keys = [f"{path}/{MANIFESTS_DIR}/{n}" for n in names]
        found = fs.cat(keys) if keys else {}
        docs = [found[k] for k in keys]
    versions = []
    for name, raw in zip(names, docs):
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise StoreError(f"{loc.url}: the manifest {MANIFESTS_DIR}/{name} is not JSON ({e})") from e
        versions.append(Version.from_json(doc, f"{loc.url}/{MANIFESTS_DIR}/{name}"))
    return sorted(versions, key=lambda v: v.id)


def select(loc: Location, versions: list[Version], wanted: str | None, versioned: bool = True) -> Version:
    """The version ``wanted`` names (None: the latest): its id, path, fingerprint, a unique prefix
    of its fingerprint's hex digits, or a tag (the newest version with it). ``versioned``: whether
    the store has versions at all (else it is a store written once), for the error."""
    if not versions:
        raise VersionNotFoundError(f"{loc.url} holds no published version (an interrupted first publish?). "
                                   "Save the dataset there again.", versions, versioned)
    if wanted is None:
        return versions[-1]
    wanted = str(wanted)
    exact = [v for v in versions if wanted in (v.id, v.path, v.fingerprint)]
    if exact:
        return exact[-1]
    tagged = [v for v in versions if v.tag == wanted]
    if tagged:
        return tagged[-1]
    digits = wanted.split(":")[-1].lower()
    by_prefix = {v.fingerprint: v for v in versions if len(digits) >= 4 and
                 v.fingerprint.split(":")[-1].startswith(digits)}
    if len(by_prefix) == 1:
        return next(iter(by_prefix.values()))
    what = "matches several versions" if by_prefix else "matches no version (fingerprint, prefix of one, or tag)"
    raise VersionNotFoundError(f"{loc.url}: version {wanted!r} {what}; it holds {listing(versions)}. "
                               "List them with `deepstrf versions URL`.", versions, versioned)


def listing(versions: list[Version]) -> str:
    """The versions, described on one line (for error messages)."""
    return ", ".join(v.describe() for v in versions) or "none"


def open_version(loc: Location, root: dict, wanted: str | None) -> tuple[Location, dict, Version]:
    """``(location, root document, version)`` of the version ``wanted`` (None: the latest) of the
    store at ``loc``, whose root document is ``root``."""
    attrs = root.get("attributes") or {}
    if attrs.get("format") not in (fmt.SOURCE_FORMAT, VERSIONS_FORMAT):
        raise StoreError(f"{loc.url} holds a {attrs.get('format')!r} group, which has no versions; "
                         "only source stores are versioned (drop version=...).")
    if attrs.get("format") == fmt.SOURCE_FORMAT:  # a store written once: its content is its version
        only = Version.of_root(root, loc.url)
        if wanted:
            select(loc, [only], wanted, versioned=False)
        return loc, root, only
    fmt.check_format(attrs, loc.url, VERSIONS_FORMAT)
    if wanted is None and _listable(loc):
        return _latest(loc)
    # a version named exactly (a pool's pin) is found in the index without listing
    indexed = [Version.from_json(v, loc.url) for v in attrs.get("versions", [])]
    exact = [v for v in indexed if wanted is not None and wanted in (v.id, v.path, v.fingerprint)]
    return located(loc, exact[-1] if exact else select(loc, versions_of(loc, root), wanted))


def _latest(loc: Location) -> tuple[Location, dict, Version]:
    """The latest version from the listing of manifest names alone: the newest id names its group."""
    ids = _manifest_ids(loc)
    if not ids or ids[-1] == FIRST_ID:  # nothing newer than the store's first content
        return located(loc, select(loc, _listed(loc, latest_only=True), None))
    path = checked_path(f"{VERSIONS_DIR}/{ids[-1]}", f"{loc.url}/{MANIFESTS_DIR}")
    where = Location.parse(loc.child(path), loc.storage_options)
    doc = read_root(where)
    return where, doc, Version.of_root(doc, where.url, ids[-1], path, keep_root=False)


def _names_in(loc: Location, folder: str) -> list[str]:
    """Names of the entries of ``folder`` (``""``: the top) of the store at ``loc`` (none if it does not exist)."""
    if loc.is_local:
        local = os.path.join(loc.url, folder)
        return os.listdir(local) if os.path.isdir(local) else []
    fs, path = loc.filesystem()
    try:
        return [k.rstrip("/").rsplit("/", 1)[-1] for k in fs.ls(f"{path}/{folder}".rstrip("/"), detail=False)]
    except FileNotFoundError:
        return []


def _manifest_ids(loc: Location) -> list[str]:
    return sorted(n[:-len(".json")] for n in _names_in(loc, MANIFESTS_DIR) if n.endswith(".json"))


def located(loc: Location, version: Version) -> tuple[Location, dict, Version]:
    """``(location, root document, version)`` of ``version`` of the store at ``loc``."""
    if not version.path:
        return loc, version.root, version
    where = Location.parse(loc.child(version.path), loc.storage_options)
    return where, read_root(where), version


def open_path(loc: Location, path: str) -> tuple[Location, dict]:
    """The version group at ``path`` inside the store (a pool's pin), without listing; a missing
    one is a :class:`VersionNotFoundError` listing the versions the store holds."""
    where = Location.parse(loc.child(checked_path(path, loc.url)), loc.storage_options)
    try:
        return where, read_root(where)
    except StoreError as e:
        if not isinstance(e, FileNotFoundError):
            raise
        try:
            held = versions_of(loc)
        except StoreError:
            held = []
        raise VersionNotFoundError(f"{loc.url} no longer holds the version at {path} (pruned?); it holds "
                                   f"{listing(held)}", held, True) from e


def pruned_since_opened(store: Location, path: str, fingerprint: str) -> VersionNotFoundError | None:
    """The error for data found missing in the version at ``path`` (of ``fingerprint``) of ``store``
    if that version is no longer published (pruned since it was opened), else None (the data is
    missing from a version that is still published: damage). One listing, on the error path only."""
    try:
        held = versions_of(store)
    except StoreError:  # the store itself is gone or unreadable: the caller's error says so
        return None
    if any(v.path == path and v.fingerprint == fingerprint for v in held):
        return None
    opened = f"version {path}" if path else "version at the store's root (its first content)"
    return VersionNotFoundError(
        f"{store.url}: the {opened}, fingerprint {fingerprint}, was pruned since this dataset opened it; the "
        f"store now holds {listing(held)}. Reopen the dataset (open_dataset) to read the latest; a pool pinned "
        "to it must be re-pinned with `deepstrf pool-update POOL NEW_POOL`.", held, True)


def list_versions(url: str | os.PathLike, *, storage_options: StorageOptions = None) -> list[Version]:
    """The versions of the source store at ``url``, oldest first (``deepstrf versions``)."""
    return versions_of(Location.parse(url, storage_options))


def prune_versions(url: str | os.PathLike, keep: int, *, storage_options: StorageOptions = None) -> list[Version]:
    """Remove all but the ``keep`` newest versions of the source store at ``url``; return those
    removed (``deepstrf prune``)."""
    return prune(Location.parse(url, storage_options), keep)


# -- publishing ----------------------------------------------------------------------------------

def new_id() -> str:
    """A version id: the UTC time of publication (sortable), then random digits."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}"


def check_tag(tag: Any) -> None:
    """Refuse a tag ``open_dataset(url, version=tag)`` could not select: not a non-empty str, or a
    version path (``versions/...``, which names a version's group)."""
    if tag is None:
        return
    if not isinstance(tag, str):
        raise TypeError(f"tag must be a str (it is selected by open_dataset(url, version=tag)), got "
                        f"{type(tag).__name__} {tag!r}; pass str(tag)")
    if not tag or tag.startswith(f"{VERSIONS_DIR}/"):
        raise ValueError(f"tag {tag!r} cannot be selected by open_dataset(url, version=tag): give a non-empty "
                         f"name that does not start with {VERSIONS_DIR + '/'!r}")


def publish(loc: Location, root: dict | None, write: Callable[[Staging], dict], tag: str | None) -> str:
    """Publish a new version at ``loc`` (its current root document ``root``, None if empty), whose
    content ``write`` writes into a staging group; return its fingerprint.

    The version's group is complete before its manifest is written, and the manifest before the
    root index: a reader sees the old latest or the new one. Publishing the latest's content
    again adds nothing (its fingerprint is returned). A first publish (``root`` None) writes the
    index first: killed, it leaves a store holding no version, which a save publishes into and a
    listing reader opens once the manifest exists; failed, it removes what it wrote.
    """
    held = [] if root is None else versions_of(loc, root)
    version_id = new_id()
    path = f"{VERSIONS_DIR}/{version_id}"
    where = Location.parse(loc.child(path), loc.storage_options)
    try:
        attrs = _stage(loc, where, write, first=root is None)
        try:
            if held and held[-1].fingerprint == attrs["fingerprint"] and tag in (None, held[-1].tag):
                remove(where)
                return attrs["fingerprint"]
            if _still_unversioned(loc, root):  # the root's arrays become the first version: its document moves here
                _put(loc, _manifest_key(held[0]), held[0].to_json())
            mine = Version(version_id, path, attrs["fingerprint"], tag, _now(), attrs["n_stims"], attrs["n_neurons"])
            _put(loc, _manifest_key(mine), mine.to_json())
        except BaseException:
            remove(where)
            raise
    except BaseException:
        if root is None:
            _remove_unused_index(loc)
        raise
    write_index(loc)
    return attrs["fingerprint"]


def _stage(loc: Location, where: Location, write: Callable[[Staging], dict], first: bool) -> dict:
    """Write a version's group at ``where`` (complete, not yet published) and return its attributes;
    ``first``: the store at ``loc`` has no root document yet (its index is written first)."""
    with staged_write(where, overwrite=False, within=loc) as staging:
        if first:  # after staged_write's checks (bucket, nesting), before any data
            write_index(loc)
        _put_bytes(staging.location, STAGING_MARKER, b"")
        attrs = write(staging)
        _check_still_staged(staging.location, loc.url)
    return attrs


def _remove_unused_index(loc: Location) -> None:
    """Undo a failed first publish: while no version is published, remove the index it wrote and
    the folders it left empty, leaving ``loc`` as it was."""
    if _manifest_ids(loc):
        return
    _delete(loc, ROOT_KEY)
    if loc.is_local:
        for folder in (VERSIONS_DIR, MANIFESTS_DIR):
            try:
                os.rmdir(os.path.join(loc.url, folder))
            except OSError:  # not there, or not empty (another publish's)
                pass


def holds_version(loc: Location, root: dict | None) -> bool:
    """Does the source store at ``loc`` (root document ``root``; None for what an interrupted
    first publish left) hold a published version? A store written once does; else its manifests say."""
    if root is not None and not is_versioned(root):
        return True
    return bool(_manifest_ids(loc))


def is_first_publish_remains(loc: Location) -> bool:
    """Does ``loc`` hold only what a first publish interrupted before its index left (earlier
    releases wrote that index last): ``versions/`` and ``manifests/``, no root document?"""
    names = _names_in(loc, "")
    return bool(names) and set(names) <= {VERSIONS_DIR, MANIFESTS_DIR}


def _check_still_staged(staging: Location, url: str) -> None:
    """Refuse to commit a version whose group was removed while it was written (its marker is
    gone: a prune took it for an interrupted publish), then remove the marker."""
    if not _exists(staging, STAGING_MARKER):
        raise StoreError(f"{url}: the new version's data ({staging.url}) was removed while it was being written "
                         "(by a `deepstrf prune` that took it for an interrupted publish?); nothing was published. "
                         "Save the dataset again.")
    _delete(staging, STAGING_MARKER)


def _still_unversioned(loc: Location, root: dict | None) -> bool:
    """Was the store at ``loc`` written once (its arrays at the root, ``root`` its document) and is it
    still? Read again just before the first version's manifest is written: once the root is an
    index, that manifest exists already, or a prune has removed it with the arrays (writing it
    again would list a version whose data is gone)."""
    return root is not None and not is_versioned(root) and not is_versioned(read_root(loc))


def write_index(loc: Location) -> None:
    """Write the root document indexing the listed versions (one atomic write)."""
    versions = _listed(loc)
    doc = {"zarr_format": 3, "node_type": "group", "attributes": {
        "format": VERSIONS_FORMAT, "format_version": VERSIONS_FORMAT_VERSION,
        "versions": [v.to_json() for v in versions]}}
    _put(loc, ROOT_KEY, doc)


def _manifest_key(version: Version) -> str:
    return f"{MANIFESTS_DIR}/{version.id}.json"


def _put(loc: Location, key: str, doc: dict) -> None:
    """Write one small JSON object whole: a reader sees the old object or the new one."""
    _put_bytes(loc, key, json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8"))


def _put_bytes(loc: Location, key: str, data: bytes) -> None:
    """Write one small object whole: a reader sees the old object or the new one."""
    if loc.is_local:
        target = os.path.join(loc.url, key)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        staging = f"{target}.tmp-{uuid.uuid4().hex[:12]}"
        with open(staging, "wb") as f:
            f.write(data)
        os.replace(staging, target)
        return
    fs, path = loc.filesystem()
    fs.pipe_file(f"{path}/{key}", data)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _exists(loc: Location, key: str) -> bool:
    if loc.is_local:
        return os.path.exists(os.path.join(loc.url, key))
    fs, path = loc.filesystem()
    fs.invalidate_cache()
    return bool(fs.exists(f"{path}/{key}"))


def _modified(loc: Location, key: str) -> str | None:
    """When ``key`` was last written (ISO 8601, UTC), if the storage says."""
    try:
        if loc.is_local:
            when = _utc(os.path.getmtime(os.path.join(loc.url, key)))
        else:
            fs, path = loc.filesystem()
            when = _info_time(fs.info(f"{path}/{key}"))
    except (OSError, ValueError):
        return None
    return None if when is None else when.isoformat(timespec="seconds")


def _utc(when: Any) -> datetime | None:
    """``when`` (a datetime or a POSIX time) in UTC; None if it is neither."""
    if isinstance(when, datetime):
        return when.astimezone(timezone.utc)
    if isinstance(when, (int, float)):
        return datetime.fromtimestamp(when, timezone.utc)
    return None


def _info_time(info: dict) -> datetime | None:
    """When an object was last written, from its fsspec ``info``."""
    return _utc(info.get("LastModified") or info.get("mtime") or info.get("last_modified"))


def _last_written(loc: Location, folder: str) -> datetime | None:
    """When anything in ``folder`` of the store at ``loc`` was last written (None: nothing there,
    or the storage gives no times)."""
    if loc.is_local:
        top = os.path.join(loc.url, folder)
        paths = [top, *(os.path.join(d, n) for d, dirs, files in os.walk(top) for n in dirs + files)]
        times = []
        for p in paths:
            try:
                times.append(os.stat(p).st_mtime)
            except OSError:  # removed meanwhile
                continue
        return _utc(max(times)) if times else None
    fs, path = loc.filesystem()
    try:
        infos = fs.find(f"{path}/{folder}", detail=True).values()
    except FileNotFoundError:
        return None
    times = [t for t in map(_info_time, infos) if t is not None]
    return max(times) if times else None


# -- pruning -------------------------------------------------------------------------------------

def prune(loc: Location, keep: int) -> list[Version]:
    """Remove all but the ``keep`` newest versions of the store at ``loc``; return those removed.

    Each version's manifest goes first (it stops being listed), then the index is rewritten,
    then its data; version folders left by interrupted publishes (no manifest, nothing written
    in them for an hour) are removed too.
    """
    if keep < 1:
        raise ValueError(f"prune: keep must be at least 1 (the latest version), got {keep}")
    loc.check_writable()
    root = read_root(loc)
    if not is_versioned(root):
        versions_of(loc, root)  # refuses what is not a source store
        return []
    versions = _listed(loc)
    gone, kept = versions[:-keep], versions[-keep:]
    for v in gone:
        _delete(loc, _manifest_key(v))
    write_index(loc)
    live = {v.path for v in kept}
    for v in gone:
        if v.path in live:
            continue
        if v.path:
            remove(Location.parse(loc.child(v.path), loc.storage_options))
        else:
            for top in OWN_TOP_LEVEL:
                remove(Location.parse(loc.child(top), loc.storage_options))
    _remove_orphans(loc, live)
    return gone


def _delete(loc: Location, key: str) -> None:
    if loc.is_local:
        try:
            os.remove(os.path.join(loc.url, key))
        except FileNotFoundError:
            pass
        return
    fs, path = loc.filesystem()
    try:
        fs.rm_file(f"{path}/{key}")
    except FileNotFoundError:
        pass


def _remove_orphans(loc: Location, live: set[str]) -> None:
    """Remove version folders without a manifest (interrupted publishes) in which nothing was
    written for ``ORPHAN_AGE_S``: a publish still uploading (however long ago it began) keeps
    writing there, so its folder stays."""
    for name in _names_in(loc, VERSIONS_DIR):
        folder = f"{VERSIONS_DIR}/{name}"
        started = _started(name)  # the id's time: a folder begun recently is not looked into
        if folder in live or started is None or not _idle(started):
            continue
        last = _last_written(loc, folder)
        if last is None or _idle(last):
            remove(Location.parse(loc.child(folder), loc.storage_options))


def _started(name: str) -> datetime | None:
    """When the publish that writes version folder ``name`` (``<id>`` or a hidden staging sibling
    ``.<id>.tmp-...``) began, from its id; None for a name that holds no id."""
    stamp = name.lstrip(".").split("-", 1)[0].split(".", 1)[0]
    try:
        return datetime.strptime(stamp, "%Y%m%dT%H%M%S%fZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def _idle(since: datetime) -> bool:
    return (datetime.now(timezone.utc) - since).total_seconds() > ORPHAN_AGE_S
