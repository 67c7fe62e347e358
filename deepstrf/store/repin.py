"""A pool's pinned source versions against the sources' latest: which moved on, and re-pinning.

A pool reads the version of each source it pinned when written. :func:`newer_versions` tells
which sources have published a newer one since; :func:`update_pool` writes a new pool pinned to
the latest versions and reports, per source, what changed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..datasets.neural_dataset import NeuralDataset
from ..errors import StoreError, environment_errors, unreadable
from ..forksafe import thread_map
from .dataset import open_dataset
from .location import Location
from .options import StorageOptions
from .pool import POOL_FORMAT, source_options
from .reader import read_root
from .references import resolve_reference
from .versions import Version, versions_of


# how newer_versions starts the message of a source it could not ask, and of one without its pinned version
NOT_CHECKED, PIN_GONE = "not checked:", "pin gone:"


def newer_versions(pool: Location, entries: Sequence[dict[str, Any]], allowed_roots: Sequence[str] = (),
                   trust: bool = False) -> dict[str, Version | str]:
    """By source name: its latest version where it differs from the pinned one, or a message: why it
    could not be checked (:data:`NOT_CHECKED`), or that it no longer holds the pinned version
    (:data:`PIN_GONE`). Reads each source's root (and lists a versioned one's manifests)."""

    def check(entry: dict) -> tuple[str, Version | str | None]:
        url = entry["ref"]
        try:
            url = resolve_reference(pool, entry["ref"], allowed_roots, trust)
            held = versions_of(Location.parse(url, source_options(pool, None, url)))
        except StoreError as e:
            return entry["name"], f"{NOT_CHECKED} {e}"
        except environment_errors() as e:
            return entry["name"], f"{NOT_CHECKED} {unreadable(url, e)}"
        if not any(v.fingerprint == entry["fingerprint"] for v in held):
            return entry["name"], (f"{PIN_GONE} {url} no longer holds the version the pool pins "
                                   f"({entry['fingerprint']}; pruned, or written again in place): opening the pool "
                                   f"fails until it is re-pinned (deepstrf pool-update POOL OUT); latest: "
                                   f"{held[-1].describe()}")
        return entry["name"], None if held[-1].fingerprint == entry["fingerprint"] else held[-1]

    found = thread_map(check, list(entries), max_workers=16, name="deepstrf-versions")
    return {name: v for name, v in found if v is not None}


@dataclass
class SourceChange:
    """What re-pinning changed for one source."""

    name: str
    before: str
    after: str
    stims_added: int
    stims_removed: int
    neurons_added: int
    neurons_removed: int

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def describe(self) -> str:
        short = [f.split(":")[-1][:12] for f in (self.before, self.after)]
        if not self.changed:
            return f"{self.name}: unchanged ({short[0]})"
        return (f"{self.name}: {short[0]} -> {short[1]}: stims +{self.stims_added} -{self.stims_removed}, "
                f"neurons +{self.neurons_added} -{self.neurons_removed}")


def _added_removed(old: Sequence[dict], new: Sequence[dict]) -> tuple[int, int]:
    """Rows added and removed, by ``uid`` where every row has one, else by count."""
    if all("uid" in m for m in old) and all("uid" in m for m in new):
        a, b = {m["uid"] for m in old}, {m["uid"] for m in new}
        return len(b - a), len(a - b)
    return max(0, len(new) - len(old)), max(0, len(old) - len(new))


def update_pool(pool_url: str | os.PathLike, out_url: str | os.PathLike, *, storage_options: StorageOptions = None,
                allowed_roots: Sequence[str] = (), trust: bool = False,
                overwrite: bool = False) -> tuple[NeuralDataset, list[SourceChange]]:
    """Write at ``out_url`` the pool at ``pool_url`` re-pinned to its sources' latest versions
    (same names and order); return it opened, and what changed per source."""
    from ..utils.data import concat_neural_datasets

    loc = Location.parse(pool_url, storage_options)
    kind = (read_root(loc).get("attributes") or {}).get("format")
    if kind != POOL_FORMAT:
        raise StoreError(f"{loc.url} is not a pool (it holds a {kind!r} group): pool-update re-pins a pool's "
                         "sources; give the URL of a pool written by deepstrf concat.")
    pool = open_dataset(pool_url, storage_options=storage_options, allowed_roots=allowed_roots, trust=trust,
                        check_sources=False)
    parts = list(pool.responses.sources)
    latest = thread_map(lambda p: open_dataset(p.store_url, storage_options=p.storage_options), parts,
                        max_workers=16, name="deepstrf-open")
    changes = []
    for entry, part, new in zip(pool.pool_sources, parts, latest):
        stims = _added_removed(list(part.stim_meta), list(new.stim_meta))
        neurons = _added_removed(list(part.nrn_meta), list(new.nrn_meta))
        changes.append(SourceChange(entry["name"], entry["fingerprint"], new.fingerprint, *stims, *neurons))
    repinned = concat_neural_datasets(latest, names=pool.source_names, store=os.fspath(out_url),
                                      storage_options=storage_options, overwrite=overwrite,
                                      allowed_roots=allowed_roots, trust=trust)
    return repinned, changes
