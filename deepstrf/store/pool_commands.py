"""``deepstrf concat`` and ``deepstrf plot``: write a pool, draw a coverage matrix."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
import torch

from ..datasets.coverage import Coverage
from ..datasets.neural_dataset import NeuralDataset
from ..forksafe import thread_map
from ..utils.data import concat_neural_datasets
from .dataset import open_dataset
from .references import roots_outside
from .repin import NOT_CHECKED, PIN_GONE

MAX_PIXELS = 1500  # coverage images are block-reduced to at most this many rows/columns
MAX_LABELLED_SOURCES = 40  # blocks outlined and named in a coverage plot
MAX_LISTED_SOURCES = 40  # sources listed by `concat` and `info` (text)
OPEN_THREADS = 16  # sources opened or checked at once: each is a few small reads, mostly waiting on storage
STORE_PATTERN = "s3://bucket/stores/*.zarr"  # the example of a pattern of stores in `concat`'s messages


def concat_main(args: argparse.Namespace) -> int:
    """Pool the stores at ``args.sources`` (and those listed in ``args.from_list``) into a new pool at
    ``args.out``."""
    from ..errors import UsageError
    from .listing import gather_inputs

    sources = gather_inputs(args.sources, args.from_list, args.storage_options, example=STORE_PATTERN,
                            what="stores to pool")
    if args.name is not None and len(args.name) != len(sources):
        raise UsageError(f"got {len(args.name)} --name for {len(sources)} sources; give one --name per source or none")
    opened = thread_map(lambda u: open_dataset(u, storage_options=args.storage_options, **open_kw(args, u)),
                        sources, max_workers=OPEN_THREADS, name="deepstrf-open")
    pool = concat_neural_datasets(opened, names=args.name, store=args.out, storage_options=args.storage_options,
                                  overwrite=args.overwrite, allowed_roots=args.allow_root)
    info = pool.summary()
    print(f"wrote pool {args.out}: {info['S']} stims x {info['N']} neurons from {len(info['sources'])} sources, "
          f"coverage {info['coverage']:.1%}")
    for src in pool.pool_sources[:MAX_LISTED_SOURCES]:
        print(f"  {src['name']}: {src['ref']} ({src['n_stims']} x {src['n_neurons']})")
    if len(pool.pool_sources) > MAX_LISTED_SOURCES:
        print(f"  ... and {len(pool.pool_sources) - MAX_LISTED_SOURCES} more (deepstrf info --json lists them)")
    outside = roots_outside([src["ref"] for src in pool.pool_sources])
    if outside:
        allow = " ".join(f"--allow-root {root}" for root in outside)
        print(f"note: sources lie outside the pool's folder: read the pool with {allow} (allowed_roots="
              f"{outside!r} in Python), or write it into a folder that holds its sources (references there "
              "stay relative)", file=sys.stderr)
    return 0


def open_kw(args: argparse.Namespace, url: str) -> dict:
    """The keyword arguments of ``open_dataset(url)`` for a command: a pool is opened with the
    command's allowed roots (``--allow-root``), a source (which takes none) without them."""
    from ..errors import reading_store
    from .reader import open_group

    with reading_store(url):
        fmt = dict(open_group(_location(url, args)).attrs).get("format")
    return {"allowed_roots": args.allow_root} if fmt == "deepstrf.pool" else {}


def _location(url: str, args: argparse.Namespace):
    from .location import Location

    return Location.parse(url, args.storage_options)


def plot_main(args: argparse.Namespace) -> int:
    """Save the coverage matrix of the store at ``args.url`` as an image."""
    ds = open_dataset(args.url, storage_options=args.storage_options, **open_kw(args, args.url))
    plot_coverage(ds, args.output, title=args.url)
    print(f"wrote {args.output}")
    return 0


def plot_coverage(ds: NeuralDataset, path: str, title: str | None = None) -> None:
    """Draw ``ds.coverage`` (stims x neurons) with each source's block outlined (and labelled,
    up to ``MAX_LABELLED_SOURCES``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    coverage = ds.coverage
    S, N = coverage.shape
    image, fs, fn = _reduce(coverage)
    fig, ax = plt.subplots(figsize=(8, 6), dpi=120)
    ax.imshow(image, aspect="auto", interpolation="nearest", cmap="Greys", vmin=0, vmax=1, extent=(0, N, S, 0))
    colors = plt.get_cmap("tab10")
    blocks = ds.source_blocks()
    for k, (name, stims, neurons) in enumerate(blocks[:MAX_LABELLED_SOURCES]):
        ax.add_patch(Rectangle((neurons.start, stims.start), len(neurons), len(stims), fill=False,
                               edgecolor=colors(k % 10), linewidth=1.5))
        ax.text(neurons.start + 0.5, stims.start + 0.5, f"{name}\n{len(stims)}x{len(neurons)}",
                color=colors(k % 10), va="top", ha="left", fontsize=9, weight="bold",
                bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none"})
    ax.set_xlabel("neuron")
    ax.set_ylabel("stimulus")
    ax.set_title(f"{title or 'coverage'}\n{S} stims x {N} neurons from {len(blocks)} sources, "
                 f"{coverage.fraction():.1%} recorded" + (f" (shown {fs}x{fn}-reduced)" if fs * fn > 1 else ""),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _reduce(coverage: Coverage) -> tuple[np.ndarray, int, int]:
    """Fraction recorded per tile of at most ``MAX_PIXELS`` x ``MAX_PIXELS`` tiles, summed block
    by block: a pool of 10^4 sources plots without its dense mask."""
    S, N = coverage.shape
    fs, fn = max(1, -(-S // MAX_PIXELS)), max(1, -(-N // MAX_PIXELS))
    recorded = np.zeros((-(-S // fs), -(-N // fn)))
    for k in range(coverage.n_blocks):
        stims, neurons = coverage.block(k)
        rows, cols = np.nonzero(coverage.block_mask(k))
        np.add.at(recorded, ((rows + stims.start) // fs, (cols + neurons.start) // fn), 1)
    return (recorded / (fs * fn)).astype(np.float32), fs, fn


def describe_pool(attrs: dict, loc, group, *, newer: bool = False, allowed_roots=()) -> dict:
    """Plain-dict summary of a pool from its root attributes and source table, with the dataset
    card per source, its licenses, and (``newer``: asking each source) the sources that have
    published a newer version than the one the pool pins."""
    from .citations import licenses
    from .pool import pool_card, read_sources
    from .repin import newer_versions

    entries = read_sources(loc, group, attrs)
    out = {"url": loc.url, "format": attrs["format"], "format_version": attrs["format_version"],
           "kind": attrs["kind"], "class_name": attrs.get("class_name"), "S": attrs["n_stims"],
           "N": attrs["n_neurons"], "dt_ms": attrs["dt_ms"],
           **{k: attrs[k] for k in ("F", "H", "W") if attrs.get(k) is not None},
           "fingerprint": attrs["fingerprint"], "sources": pool_card(entries),
           "licenses": licenses([(e["name"], e.get("card")) for e in entries])}
    if newer:
        found = newer_versions(loc, entries, allowed_roots)
        out["newer_versions"] = {name: v if isinstance(v, str) else v.describe() for name, v in found.items()}
    return out


def _print_listed(heading: str, items: dict[str, str]) -> None:
    """``heading`` and one line per item (the first ``MAX_LISTED_SOURCES``), if there are any."""
    if items:
        print(heading)
        for name, what in list(items.items())[:MAX_LISTED_SOURCES]:
            print(f"  - {name}: {what}")


def print_pool(d: dict) -> None:
    from .citations import licenses_line

    shape = "".join(f", {k}={d[k]}" for k in ("F", "H", "W") if k in d)
    print(f"pool         {d['url']}\n"
          f"kind         {d['kind']} ({d['class_name']}; {d['format']} v{d['format_version']})\n"
          f"S x N        {d['S']} stims x {d['N']} neurons, dt {d['dt_ms']} ms{shape}\n"
          f"fingerprint  {d['fingerprint']}")
    differ = len(d["licenses"]) > 1
    print(f"licenses     {licenses_line(d['licenses'])}"
          + ("\n             the sources carry different licenses: honour each (deepstrf cite POOL lists them)"
             if differ else ""))
    newer = d.get("newer_versions")
    if newer is not None:
        unchecked = {name: what for name, what in newer.items() if what.startswith(NOT_CHECKED)}
        gone = {name: what[len(PIN_GONE):].strip() for name, what in newer.items() if what.startswith(PIN_GONE)}
        moved = {name: what for name, what in newer.items() if name not in unchecked and name not in gone}
        _print_listed(f"MISSING      {len(gone)} source(s) no longer hold the version the pool pins: the pool does "
                      "not open (deepstrf pool-update POOL OUT re-pins them):", gone)
        _print_listed(f"newer        {len(moved)} source(s) have a newer version than the pool pins "
                      "(deepstrf pool-update POOL OUT re-pins them):", moved)
        if not newer:
            print("newer        none: every source's latest version is the one the pool pins")
        _print_listed(f"unchecked    {len(unchecked)} source(s) could not be asked for a newer version:", unchecked)
    cards = any(src.get(key) for src in d["sources"] for key in ("license", "citation", "description"))
    print(f"sources      {len(d['sources'])}" + (" (dataset cards below)" if cards else ""))
    for src in d["sources"][:MAX_LISTED_SOURCES]:
        print(f"  - {src['name']}: {src['ref']} ({src['stims']} stims x {src['neurons']} neurons)")
        for key in ("license", "citation", "description"):
            if src.get(key):
                print(f"      {key}: {src[key]}")
    if len(d["sources"]) > MAX_LISTED_SOURCES:
        print(f"  ... and {len(d['sources']) - MAX_LISTED_SOURCES} more (--json lists every source)")


def verify_pool(loc, *, allowed_roots=(), data: bool = False, client: Any = None,
                progress: bool | None = None) -> list[str]:
    """Problems found in a pool: metadata, version, references, tables against their digests,
    each source's fingerprint and its coverage block against the source's own index (and, with
    ``data``, every chunk of every source). A damaged source is a problem named after it; the
    other sources are still checked. Sources are checked one task each by
    :func:`deepstrf.engine.run_tasks`: on a Dask cluster with ``client``, else in this process, 16 at
    a time (one at a time with ``data``, whose checks decode every chunk)."""
    from ..engine import run_tasks
    from ..errors import StoreError, UntrustedReferenceError
    from .integrity import fingerprint
    from .pool import checked_sources
    from .reader import open_group
    from .references import resolve_reference
    from .verify import metadata_problems

    try:
        group = open_group(loc)
        problems = metadata_problems(loc, group)
        if fingerprint(dict(group.attrs)) != group.attrs.get("fingerprint"):
            problems.append(f"pool {loc.url}: the recorded fingerprint does not match the pool's attributes; "
                            "it was edited or damaged: rewrite it with deepstrf concat")
        attrs, entries = checked_sources(loc, group)
        trusted = []  # each reference is checked against the allowed roots before anything is read
        for k, entry in enumerate(entries):
            try:
                resolve_reference(loc, entry["ref"], allowed_roots)
                trusted.append(k)
            except UntrustedReferenceError as e:
                problems.append(str(e))
        if len(trusted) < len(entries) and attrs["format_version"].startswith("1."):
            return problems  # a format-1 pool opens every source at once: not past a reference refused
        # the sources are opened one task each below: one that cannot be opened is named, the others
        # checked; nothing is read from a source here
        pool = open_dataset(loc.url, storage_options=loc.given, trust=True, check_sources=False)
        coverage = pool.coverage
        pool.stim_meta[0], pool.nrn_meta[0]  # noqa: B018 - loads (and checks) the metadata tables
    except (StoreError, ValueError) as e:
        return [str(e)]
    blocks, tasks = pool.source_blocks(), []
    for k in trusted:
        src, (_, stims, neurons) = pool.responses.sources[k], blocks[k]
        pin = {key: entries[k].get(key) for key in ("name", "ref", "version", "fingerprint")}
        tasks.append((loc.url, dict(pin, url=src.store_url), src.storage_options, _source_of(src),
                      coverage.block_mask(k), (stims.start, stims.stop - 1), (neurons.start, neurons.stop - 1), data))
    # without data the checks wait on storage (a few small reads per source): threads, as opening does
    found = run_tasks(check_pooled_source, tasks, failed=_check_failed, client=client,
                      threads=1 if data else OPEN_THREADS, desc="verify", unit="source", progress=progress)
    return problems + [p for f in found for p in f]


def _source_of(part: NeuralDataset) -> Any:
    """What a task needs to open a pooled source: its handle (fingerprint checked on opening) or
    the source itself when the pool holds it opened."""
    from .lazy import LazySourceGrid

    return part.responses.handle if isinstance(part.responses, LazySourceGrid) else part


def check_pooled_source(pool_url: str, pin: dict, storage_options: dict | None, source: Any, mask: np.ndarray,
                        stims: tuple[int, int], neurons: tuple[int, int], data: bool) -> list[str]:
    """Problems of one pooled source: the version the pool pins (``pin``: its entry's name, url, ref,
    version and fingerprint; opened as opening the pool does), its attributes against their recorded
    fingerprint (with ``data``: every chunk checksummed too), that fingerprint against the pool's
    record, and its index against the pool's coverage block ``mask``."""
    from ..errors import SourceUnreadableError, StoreError, StoreNotFoundError
    from .integrity import fingerprint
    from .lazy import SourceHandle, open_pinned
    from .location import Location
    from .reader import read_root
    from .verify import verify_source
    from .versions import open_version

    def open_root(url: str, version: str | None = None) -> tuple[Location, dict, Any]:
        where = Location.parse(url, storage_options)
        return open_version(where, read_root(where), version)

    name, url = pin["name"], pin["url"]
    try:
        where, root, chosen = open_pinned(open_root, pool_url, pin, accept_changed=False)
    except (StoreNotFoundError, SourceUnreadableError) as e:  # these name the pool and the source
        return [str(e)]
    except StoreError as e:
        return [f"pool {pool_url}: source {name!r} ({url}): {e}"]
    attrs = root.get("attributes") or {}
    if attrs.get("fingerprint") != pin["fingerprint"]:  # an unversioned store written again in place
        return [f"pool {pool_url}: source {name!r} at {url} changed after pooling (fingerprint "
                f"{attrs.get('fingerprint')}, pooled {pin['fingerprint']}); rewrite the pool with deepstrf concat"]
    if data:
        found = verify_source(where, progress=False, root=root,
                              published=(Location.parse(url, storage_options), chosen.path))
        if found:
            return [f"pool {pool_url}: source {name!r}: {p}" for p in found]
    elif fingerprint(attrs) != attrs.get("fingerprint"):
        return [f"pool {pool_url}: source {name!r} ({where.url}): its attributes do not match its recorded "
                "fingerprint; they were edited or damaged. Write the source again (save_dataset) and "
                "re-pin the pool (deepstrf pool-update)"]
    try:
        recorded = (source.dataset() if isinstance(source, SourceHandle) else source).coverage.to_dense()
    except StoreError as e:
        return [f"pool {pool_url}: source {name!r} ({url}): {e}"]
    if not torch.equal(torch.from_numpy(mask), recorded):
        return [f"pool {pool_url}: the stored coverage of source {name!r} (stims {stims[0]}-{stims[1]}, neurons "
                f"{neurons[0]}-{neurons[1]}) differs from its index at {url}; rewrite the pool with deepstrf concat"]
    return []


def _check_failed(task: tuple, error: BaseException) -> list[str]:
    pool_url, name, url = task[0], task[1]["name"], task[1]["url"]
    return [f"pool {pool_url}: source {name!r} ({url}) could not be checked ({type(error).__name__}: {error}); "
            "check that it is reachable, then run verify again"]
