"""Inputs at archive scale: listing files and glob patterns over local folders and object stores.

A command's inputs are the URLs given on its command line and, with ``--from-list FILE``, the
lines of a listing (one path or URL per line; blank lines and ``#`` comments ignored; the file
itself may be local or remote). An input holding ``*``, ``?`` or ``[`` is a pattern, expanded
with fsspec's ``glob`` on its file system (``**`` descends into sub-folders, e.g.
``s3://bucket/dandiset/**/*.nwb``). Each URL is kept once (local paths compared as absolute
paths), in the order first met.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..errors import StoreError, UsageError
from .location import Location, canonical_url

GLOB_CHARS = "*?["


def read_listing(url: str | os.PathLike, storage_options: dict | None = None) -> list[str]:
    """The entries of the listing file at ``url`` (stripped lines, without blanks and ``#`` comments)."""
    loc = Location.parse(url, storage_options)
    fs, path = loc.filesystem()
    try:
        text = fs.cat_file(path).decode()
    except FileNotFoundError as e:
        raise StoreError(f"--from-list: no listing file at {loc.url}; check the path.") from e
    except UnicodeDecodeError as e:
        raise StoreError(f"--from-list: {loc.url} is not a text file (one path or URL per line).") from e
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def expand(pattern: str, storage_options: dict | None = None) -> list[str]:
    """The URLs matching ``pattern`` (sorted), or ``[pattern]`` if it is not a pattern."""
    if not any(c in pattern for c in GLOB_CHARS):
        return [pattern]
    loc = Location.parse(pattern, storage_options)
    fs, path = loc.filesystem()
    found = sorted(fs.glob(path))
    if not found:
        raise StoreError(f"no file matches {pattern}; check the pattern (** descends into sub-folders) "
                         "and storage_options.")
    return found if loc.is_local else [f"{loc.protocol}://{p}" for p in found]


NWB_PATTERN = "s3://bucket/prefix/**/*.nwb"  # the example of a pattern of NWB files in messages


def gather_inputs(items: Sequence[str], from_list: str | None = None, storage_options: dict | None = None,
                  example: str = NWB_PATTERN, what: str = "files") -> list[str]:
    """``items`` then the entries of ``from_list``, patterns expanded, each URL once. A command line
    that names neither is a :class:`~deepstrf.errors.UsageError` naming ``what`` to give, with
    ``example`` as the pattern it shows (an empty listing is a :class:`StoreError`)."""
    if not items and not from_list:
        raise UsageError(f"name the {what}: paths or URLs, patterns ({example}), or --from-list FILE")
    entries = list(items) + (read_listing(from_list, storage_options) if from_list else [])
    if not entries:
        raise StoreError(f"no input given: name files or URLs, patterns ({example}), "
                         "or a listing with --from-list FILE.")
    out: dict[str, str] = {}  # by canonical URL (nwb/a.nwb and ./nwb/a.nwb are one file): as first written
    for entry in entries:
        for url in expand(entry, storage_options):
            out.setdefault(canonical_url(url), url)
    return list(out.values())
