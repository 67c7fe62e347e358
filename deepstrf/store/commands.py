"""CLI sub-commands ``deepstrf info`` and ``deepstrf verify`` for source and pool stores."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from argparse import Namespace
from typing import Any

from ..errors import StoreError
from . import format as fmt
from .location import Location
from .reader import group_of, read_root
from .pool import POOL_FORMAT
from .versions import Version, is_versioned, open_version, versions_of
from .verify import verify_source


def describe_source(attrs: dict[str, Any], url: str) -> dict[str, Any]:
    """Plain-dict summary of a source store's attributes (no data read)."""
    stats = attrs.get("stats", {})
    S, N = attrs["n_stims"], attrs["n_neurons"]
    out: dict[str, Any] = {
        "url": url, "format": attrs["format"], "format_version": attrs["format_version"],
        "kind": attrs["kind"], "class_name": attrs.get("class_name"), "name": attrs.get("name"),
        "S": S, "N": N, "dt_ms": attrs["dt_ms"],
    }
    for key in ("F", "audio_fs", "H", "W"):
        if attrs.get(key) is not None:
            out[key] = attrs[key]
    on_disk, in_memory = attrs.get("nbytes_stored"), stats.get("float32_bytes")
    out.update(
        valid_cells=stats.get("valid_cells"), coverage=stats.get("valid_cells", 0) / (S * N),
        repeats=[stats.get("repeats_min"), stats.get("repeats_max")], T=[stats.get("T_min"), stats.get("T_max")],
        response_dtype=attrs.get("response_dtype"), stim_dtype=attrs.get("stim_dtype"),
        bytes_on_disk=on_disk, bytes_float32=in_memory,
        compression_ratio=(in_memory / on_disk) if on_disk and in_memory else None,
        fingerprint=attrs.get("fingerprint"), card=attrs.get("card"),
    )
    return out


def _version_of(loc: Location, root: dict, wanted: str | None) -> tuple[Location, dict, Version]:
    """The location, root document and version of the version ``wanted`` (latest: None)."""
    if wanted is None and not is_versioned(root):
        is_source = (root.get("attributes") or {}).get("format") == fmt.SOURCE_FORMAT
        return loc, root, Version.of_root(root, loc.url) if is_source else None
    return open_version(loc, root, wanted)


def refuse_version_of_pool(args: Namespace, loc: Location) -> None:
    """A command given ``--version`` for a pool refuses it (rather than ignore it)."""
    if getattr(args, "version", None):
        raise StoreError(f"--version chooses a version of a source store; {loc.url} is a pool (it pins a "
                         "version of each source: deepstrf info lists them, deepstrf pool-update re-pins them)")


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:,.1f} MB"


def _ratio_text(ratio: float | None) -> str:
    """`` (1/12)`` for a store 12 times smaller than its float32 form; a tiny store, which its
    metadata and chunk headers make larger, says how much larger (was ``(1/0)``)."""
    if not ratio:
        return ""
    if ratio >= 1:
        return f" (1/{ratio:.0f})" if ratio >= 10 else f" (1/{ratio:.1f})"
    return f" ({1 / ratio:.1f} times larger: metadata and chunk headers outweigh so little data)"


def _print_source(d: dict[str, Any]) -> None:
    lines = [
        ("store", d["url"]),
        ("kind", f"{d['kind']} (recorded class {d['class_name']}; {d['format']} v{d['format_version']})"),
        ("name", d["name"] or "-"),
        ("S x N", f"{d['S']} stims x {d['N']} neurons, {d['valid_cells']} valid cells ({d['coverage']:.1%})"),
        ("dt", f"{d['dt_ms']} ms"),
    ]
    if "F" in d:
        lines.append(("F", str(d["F"]) + (f" (audio_fs={d['audio_fs']})" if d.get("audio_fs") else "")))
    if "H" in d:
        lines.append(("H x W", f"{d['H']} x {d['W']}"))
    ratio = _ratio_text(d["compression_ratio"])
    lines += [
        ("repeats", f"{d['repeats'][0]}-{d['repeats'][1]} per cell"),
        ("T", f"{d['T'][0]}-{d['T'][1]} bins"),
        ("dtypes", f"responses {d['response_dtype']}, stims {d['stim_dtype']}"),
        ("size", f"{_mb(d['bytes_on_disk'])} on disk vs {_mb(d['bytes_float32'])} as float32 in memory{ratio}"),
        ("fingerprint", d["fingerprint"]),
    ]
    v = d.get("version")
    if v and (v["versions"] > 1 or v["tag"]):
        which = "the latest" if v["latest"] else "not the latest"
        lines.append(("version", f"{v['id']}{' tag ' + repr(v['tag']) if v['tag'] else ''} ({which} of "
                                 f"{v['versions']}; deepstrf versions URL lists them)"))
    for key, value in (d["card"] or {}).items():
        lines.append((f"card.{key}", str(value)))
    width = max(len(k) for k, _ in lines)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in lines))


def info_main(args: Namespace) -> int:
    """``deepstrf info URL``: describe a source or pool store from its metadata (reads no data)."""
    from .pool_commands import describe_pool, print_pool

    loc = Location.parse(args.url, args.storage_options)
    root = read_root(loc)
    attrs = root.get("attributes") or {}
    if attrs.get("format") == POOL_FORMAT:
        refuse_version_of_pool(args, loc)
        group = group_of(loc, root)
        fmt.check_format(attrs, loc.url, POOL_FORMAT, supported=fmt.POOL_SUPPORTED_MAJORS)
        summary = describe_pool(attrs, loc, group, newer=not args.offline, allowed_roots=args.allow_root)
        show = print_pool
    else:
        where, root, chosen = _version_of(loc, root, getattr(args, "version", None))
        attrs = root.get("attributes") or {}
        fmt.check_format(attrs, where.url, expected=None)
        if attrs["format"] != fmt.SOURCE_FORMAT:
            raise StoreError(f"{loc.url} holds a {attrs['format']!r} group; upgrade deepstrf to read it")
        summary, show = describe_source(attrs, loc.url), _print_source
        held = versions_of(loc) if is_versioned(read_root(loc)) else [chosen]
        chosen = next((v for v in held if v.id == chosen.id), chosen)  # with its tag and date
        summary["version"] = {"id": chosen.id, "path": chosen.path, "tag": chosen.tag, "date": chosen.date,
                              "latest": chosen.id == held[-1].id, "versions": len(held)}
    if args.json:
        print(json.dumps(summary))
    else:
        show(summary)
    return 0


def verify_main(args: Namespace) -> int:
    """``deepstrf verify URL``: check a store; 1 on any problem.

    A source: every chunk read and checksummed, digests and fingerprint recomputed.
    A pool: references, fingerprints and coverage (with ``--data`` also every source's data).
    With ``--dask ADDRESS`` each source is checked, data included, by one task on that cluster.
    """
    from ..engine import dask_client, run_tasks
    from .pool_commands import verify_pool

    loc = Location.parse(args.url, args.storage_options)
    root = read_root(loc)
    is_pool = (root.get("attributes") or {}).get("format") == POOL_FORMAT
    data = args.data or bool(args.dask)
    with dask_client(args.dask) if args.dask else contextlib.nullcontext() as client:
        if is_pool:
            refuse_version_of_pool(args, loc)
            problems = verify_pool(loc, allowed_roots=args.allow_root, data=data, client=client)
        else:
            store = loc
            loc, root, chosen = _version_of(store, root, getattr(args, "version", None))
            published = None if chosen is None else (store, chosen.path)
            [problems] = run_tasks(functools.partial(verify_source, root=root, published=published), [(loc,)],
                                   failed=lambda _, e: [f"{loc.url}: {e}"], client=client, progress=False)
    for p in problems:
        print(f"deepstrf verify: problem: {p}", file=sys.stderr)
    if problems:
        print(f"{loc.url}: {len(problems)} problem(s) found", file=sys.stderr)
        return 1
    what = ("references, fingerprints and coverage match" + (", every source chunk checksummed" if data else "")
            if is_pool else
            "every chunk read and checksummed, digests and fingerprint match")
    print(f"{loc.url}: OK ({what})")
    return 0
