"""CLI sub-commands for versions and attribution: ``versions``, ``prune``, ``pool-update``, ``cite``."""

from __future__ import annotations

import json
from argparse import Namespace

from . import citations
from .commands import refuse_version_of_pool
from .location import Location
from .pool import POOL_FORMAT, read_sources
from .reader import group_of, read_root
from .repin import update_pool
from .versions import list_versions, open_version, prune_versions


def versions_main(args: Namespace) -> int:
    """``deepstrf versions URL``: the versions of a source store, oldest first."""
    held = list_versions(args.url, storage_options=args.storage_options)
    if args.json:
        print(json.dumps([{k: v for k, v in vars(v).items() if k != "root"} for v in held]))
        return 0
    print(f"{'fingerprint':<14}{'tag':<14}{'date':<27}{'S x N':<14}id")
    for i, v in enumerate(held):
        latest = "  (latest)" if i == len(held) - 1 else ""
        print(f"{v.short:<14}{v.tag or '-':<14}{v.date or '-':<27}{f'{v.n_stims} x {v.n_neurons}':<14}"
              f"{v.id}{latest}")
    return 0


def prune_main(args: Namespace) -> int:
    """``deepstrf prune URL --keep N``: remove all but the N newest versions of a source store."""
    gone = prune_versions(args.url, args.keep, storage_options=args.storage_options)
    for v in gone:
        print(f"removed {v.describe()}")
    print(f"{args.url}: {len(gone)} version(s) removed, {args.keep} kept at most")
    return 0


def pool_update_main(args: Namespace) -> int:
    """``deepstrf pool-update POOL OUT``: the pool re-pinned to its sources' latest versions."""
    pool, changes = update_pool(args.pool, args.out, storage_options=args.storage_options,
                                allowed_roots=args.allow_root, overwrite=args.overwrite)
    moved = sum(c.changed for c in changes)
    print(f"wrote pool {args.out}: {len(changes)} sources, {moved} re-pinned to a newer version")
    for change in changes:
        print(f"  {change.describe()}")
    return 0


def cite_main(args: Namespace) -> int:
    """``deepstrf cite URL``: the citations and licenses of a source, or of every source of a pool."""
    loc = Location.parse(args.url, args.storage_options)
    root = read_root(loc)
    attrs = root.get("attributes") or {}
    if attrs.get("format") == POOL_FORMAT:
        refuse_version_of_pool(args, loc)
        cards = [(e["name"], e.get("card")) for e in read_sources(loc, group_of(loc, root), attrs)]
    else:
        _, root, _ = open_version(loc, root, args.version)
        source = root.get("attributes") or {}
        cards = [(source.get("name") or loc.name, source.get("card"))]
    cites = citations.collect(cards)
    if args.bibtex:
        print(citations.as_bibtex(cites))
    else:
        print(citations.as_text(cites, citations.licenses(cards)))
    return 0
