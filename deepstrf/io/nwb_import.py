"""``deepstrf import-nwb``: NWB sessions -> one source store each, in parallel, skipping done ones.

Sessions run as one task each on local worker processes (``--jobs``) or a Dask cluster
(``--dask``), through :mod:`deepstrf.engine`; inputs may come from listings and patterns
(:mod:`deepstrf.store.listing`). A session's store is ``OUT_DIR/<file name without .nwb>.zarr``, written by
:func:`deepstrf.store.save_dataset` (atomic) with the dataset card filled from the file. Its card
records the import's fingerprint (the input's URL, size and version plus every conversion
argument); a re-run skips a session whose store records the same fingerprint.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from ..errors import NWBImportError, StoreExistsError, StoreNotFoundError, command_line_words, error_types
from ..store import save_dataset
from ..store.location import Location
from .nwb import NWBConversion, import_fingerprint, read_nwb


@dataclass
class ImportResult:
    """What happened to one input: ``status`` is ``"imported"``, ``"skipped"`` (already imported
    with the same fingerprint) or ``"failed"`` (``error`` says why)."""

    source: str
    store: str
    status: str
    fingerprint: str | None = None
    n_stims: int | None = None
    n_neurons: int | None = None
    seconds: float = 0.0
    error: str | None = None


def store_url(out_dir: str, source: str) -> str:
    """``OUT_DIR/<stem>.zarr`` for the NWB file (or NWB-Zarr folder) at ``source``."""
    stem = posixpath.basename(str(source).rstrip("/").split("?")[0])
    for suffix in (".zarr", ".nwb"):  # an NWB-Zarr session is a folder such as x.nwb.zarr
        stem = stem[:-len(suffix)] if stem.lower().endswith(suffix) else stem
    out = str(out_dir)
    return f"{out.rstrip('/')}/{stem}.zarr" if "://" in out else os.path.join(out, f"{stem}.zarr")


def recorded_fingerprint(url: str, storage_options: dict | None) -> str | None:
    """The import fingerprint in the card of the store at ``url`` (its latest version); None if
    there is no store."""
    from ..store.reader import read_root
    from ..store.versions import is_versioned, open_version

    loc = Location.parse(url, storage_options)
    try:
        root = read_root(loc)
        if is_versioned(root):
            root = open_version(loc, root, None)[1]
    except StoreNotFoundError:
        return None
    card = (root.get("attributes") or {}).get("card") or {}
    return (card.get("nwb_import") or {}).get("fingerprint") or ""


def interrupted_write(url: str, storage_options: dict | None) -> bool:
    """Whether ``url`` holds only the remains of a write that never completed (objects but no root
    ``zarr.json``: an import killed while it wrote in place, as it does on an object store). A
    re-run replaces them; the write still refuses anything but deepstrf's own keys there."""
    from ..store.atomic import store_state

    return store_state(Location.parse(url, storage_options)) == "partial"


def import_one(source: str, out_url: str, conversion: dict[str, Any], *, license: str | None = None,
               storage_options: dict | None = None, overwrite: bool = False) -> ImportResult:
    """Import one session unless its store already records the same fingerprint."""
    t0 = time.perf_counter()
    conv = NWBConversion(**conversion)
    fp = import_fingerprint(source, storage_options, conv, None, license)
    existing = recorded_fingerprint(out_url, storage_options)
    if existing == fp:
        return ImportResult(source, out_url, "skipped", fp, seconds=time.perf_counter() - t0)
    if existing is not None and not overwrite:
        raise StoreExistsError(f"{out_url} already holds a store whose recorded import fingerprint differs from "
                               f"this import's: it was imported from another file, from {source} before the file "
                               "changed, or with other arguments, or not imported at all. Pass overwrite=True to "
                               "replace it, or choose another OUT_DIR.")
    ds = read_nwb(source, conv, license=license, storage_options=storage_options)
    replace = overwrite or interrupted_write(out_url, storage_options)
    save_dataset(ds, out_url, storage_options=storage_options, overwrite=replace, progress=False)
    return ImportResult(source, out_url, "imported", fp, ds.get_S(), ds.N_neurons, time.perf_counter() - t0)


def import_reported(source: str, out_url: str, conversion: dict[str, Any], **kw: Any) -> ImportResult:
    """:func:`import_one` with any error turned into a ``"failed"`` result (the task every engine runs)."""
    try:
        return import_one(source, out_url, conversion, **kw)
    except Exception as e:  # noqa: BLE001 - a broken file may raise anything from h5py/pynwb: report it
        return _failed((source, out_url), e)


def _failed(task: tuple, error: BaseException) -> ImportResult:
    """The result of a session whose import raised (or whose worker died): its error, for the report."""
    source, out_url = task[0], task[1]
    message = str(error) if isinstance(error, error_types()) else f"{type(error).__name__}: {error}"
    return ImportResult(source, out_url, "failed", error=message if source in message else f"{source}: {message}")


def import_sessions(out_dir: str | os.PathLike, sources: list[str], *, dt_ms: float, jobs: int = 1,
                    client: Any = None, license: str | None = None, storage_options: dict | None = None,
                    overwrite: bool = False, progress: bool | None = None, **conversion: Any) -> list[ImportResult]:
    """Import each NWB file in ``sources`` into ``OUT_DIR/<stem>.zarr`` (``conversion``: the
    keyword arguments of :class:`NWBConversion`, e.g. ``presentations``, ``stim_column``, ``mel``).

    One engine runs :func:`import_one` per session (:func:`deepstrf.engine.run_tasks`): a
    ``dask.distributed.Client`` as ``client`` (one task per session, on the cluster's workers),
    else ``jobs`` worker processes of this machine (forkserver, else spawn), else this process.
    A file that cannot be imported gives a ``"failed"`` result with the reason; the others still run.
    """
    from ..engine import run_tasks

    out_dir = os.fspath(out_dir)
    NWBConversion(dt_ms=dt_ms, **conversion)  # refuse bad arguments before starting anything
    conversion = {"dt_ms": dt_ms, **conversion}
    targets = [store_url(out_dir, s) for s in sources]
    seen: dict[str, str] = {}
    for s, t in zip(sources, targets):
        if t in seen:
            raise NWBImportError(f"{seen[t]} and {s} would both be imported into {t} (same file name); "
                                 "import them into different OUT_DIRs.")
        seen[t] = s
    task = partial(import_reported, license=license, storage_options=storage_options, overwrite=overwrite)
    return run_tasks(task, [(s, t, conversion) for s, t in zip(sources, targets)], failed=_failed, jobs=jobs,
                     client=client, desc="import-nwb", unit="session", progress=progress)


def main(args: Any) -> int:
    """``deepstrf import-nwb`` (arguments parsed in :mod:`deepstrf.cli`)."""
    from ..engine import dask_client
    from ..store.listing import gather_inputs
    from .spectrogram import MelSpec

    unit_filter: dict[str, list[str]] = {}
    for col, value in args.unit_filter:  # COLUMN=VALUE pairs, split by the parser
        unit_filter.setdefault(col, []).append(value)
    sources = gather_inputs(args.sources, args.from_list, args.storage_options, what="NWB files to import")
    options = dict(
        dt_ms=args.dt_ms, jobs=args.jobs, license=args.license, storage_options=args.storage_options,
        overwrite=args.overwrite, presentations=args.presentations, stim_column=args.stim_column,
        stim_index_series=args.stim_index_series, stim_series=args.stim_series, stim_kind=args.stim_kind,
        pre_ms=args.pre_ms, post_ms=args.post_ms, unit_filter=unit_filter or None,
        use_obs_intervals=not args.ignore_obs_intervals, stim_dir=args.stim_dir, stim_rate=args.stim_rate,
        mel=MelSpec(bands=args.bands, f_min=args.f_min, f_max=args.f_max, window_ms=args.window_ms))
    with dask_client(args.dask) if args.dask else contextlib.nullcontext() as client:
        results = import_sessions(args.out_dir, sources, client=client, **options)
    for r in results:
        if r.status == "failed":
            print(f"deepstrf import-nwb: error: {command_line_words(r.error)}", file=sys.stderr)
        else:
            shape = f" ({r.n_stims} stims x {r.n_neurons} neurons, {r.seconds:.1f} s)" if r.status == "imported" else ""
            print(f"{r.status:9s} {r.source} -> {r.store}{shape}")
    return 1 if any(r.status == "failed" for r in results) else 0
