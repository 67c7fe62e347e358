"""Storage options per location: which fsspec options reach which URL.

``storage_options`` is either a plain options dict (``{"anon": True}``), or a
mapping of URL prefixes to plain options
(``{"s3://lab-a": {...}, "s3://lab-b": {...}}``), where the longest prefix of a
URL gives its options. A mapping may hold ``""`` as the fallback for URLs no
other prefix matches; a URL no prefix matches gets no options. Local prefixes
(``/data``, ``~/data``, ``file://``) are compared as absolute paths.

A plain dict keeps its meaning: it applies to the URL it was given with, and
to a pool's sources reached over that URL's protocol (or, for a pool on local
disk, where fsspec options mean nothing, to its remote sources). Options live
in memory only; nothing here writes them anywhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

CONFIG_ENV = "DEEPSTRF_STORAGE_OPTIONS"
"""Environment variable naming the CLI's storage options file."""
DEFAULT_CONFIG = "~/.config/deepstrf/storage.json"
"""The CLI's storage options file when ``DEEPSTRF_STORAGE_OPTIONS`` is not set (used if it exists)."""

StorageOptions = Mapping[str, Any] | None
"""A plain fsspec options dict, a mapping of URL prefixes to such dicts, or None."""


def protocol_of(url: str) -> str:
    """The URL's protocol (``"file"`` for a plain path)."""
    head, sep, _ = url.partition("://")
    return head.lower() if sep else "file"


def _is_prefix_key(key: Any) -> bool:
    return isinstance(key, str) and (key == "" or "://" in key or key.startswith(("/", "~")))


def is_per_location(options: StorageOptions) -> bool:
    """Is ``options`` a mapping of URL prefixes (rather than one plain options dict)?

    A mapping mixing prefixes with plain option names is refused: it is almost always a
    plain dict missing its prefix.
    """
    if not options:
        return False
    prefixes = [k for k in options if _is_prefix_key(k)]
    if not prefixes:
        return False
    if len(prefixes) != len(options):
        plain = next(k for k in options if not _is_prefix_key(k))
        raise ValueError(
            f"storage_options mixes URL prefixes ({prefixes[0]!r}) with option names ({plain!r}): give either "
            "one options dict, or a mapping of URL prefixes to options dicts "
            "({'s3://lab-a': {...}, 's3://lab-b': {...}}; '' for every other URL)")
    for prefix in prefixes:
        if options[prefix] is not None and not isinstance(options[prefix], Mapping):
            raise ValueError(f"storage_options[{prefix!r}] must be an options dict, got "
                             f"{type(options[prefix]).__name__}")
    return True


def _canonical_prefix(prefix: str) -> str:
    if prefix == "" or protocol_of(prefix) != "file":
        return prefix
    path = prefix[len("file://"):] if prefix.startswith("file://") else prefix
    absolute = os.path.abspath(os.path.expanduser(path))
    return absolute + os.sep if path.endswith(("/", os.sep)) and not absolute.endswith(os.sep) else absolute


def options_for(options: StorageOptions, url: str) -> dict[str, Any] | None:
    """The plain options for canonical ``url``: a plain dict as given, else the longest
    matching prefix's options (None when no prefix matches)."""
    if not is_per_location(options):
        return dict(options) if options else None
    best, found = -1, None
    for prefix, value in options.items():
        canonical = _canonical_prefix(prefix)
        if _covers(canonical, url) and len(canonical) > best:
            best, found = len(canonical), value
    return dict(found) if found else None


def _covers(prefix: str, url: str) -> bool:
    """Whether canonical ``prefix`` covers ``url`` in whole path components: ``s3://lab-a`` covers
    ``s3://lab-a/x.zarr``, not ``s3://lab-ab/x.zarr`` (another bucket: other credentials)."""
    if not url.startswith(prefix):
        return False
    return prefix in ("", url) or prefix.endswith(("/", os.sep)) or url[len(prefix)] in "/" + os.sep


def options_key(options: StorageOptions, url: str) -> str:
    """Which entry of ``options`` reaches ``url`` (its prefix, or its protocol for a plain dict):
    URLs with one key share one opener."""
    if not is_per_location(options):
        return protocol_of(url)
    matches = [p for p in options if _covers(_canonical_prefix(p), url)]
    return max(matches, key=lambda p: len(_canonical_prefix(p)), default="\0none")


def options_from(given_url: str, options: StorageOptions, url: str) -> dict[str, Any] | None:
    """Options for ``url``, reached from a store at ``given_url`` opened with ``options``.

    A mapping resolves ``url`` itself; a plain dict applies over ``given_url``'s protocol,
    and to remote URLs when ``given_url`` is a local path.
    """
    if is_per_location(options):
        return options_for(options, url)
    if not options:
        return None
    given, target = protocol_of(given_url), protocol_of(url)
    return dict(options) if target == given or (given == "file" and target not in ("file", "memory")) else None


def location_prefix(url: str) -> str:
    """The bucket or host of a remote URL as a prefix (``s3://bucket/``); a local path itself."""
    protocol = protocol_of(url)
    if protocol == "file":
        return url
    host = url[len(protocol) + 3:].split("/", 1)[0]
    return f"{protocol}://{host}/"


def merged(base: StorageOptions, extra: StorageOptions) -> StorageOptions:
    """``extra`` over ``base``: two mappings merge prefix by prefix (``extra`` wins); a plain
    dict joins a mapping as its ``""`` fallback."""
    if not base:
        return extra
    if not extra:
        return base
    as_map = [dict(o) if is_per_location(o) else {"": dict(o)} for o in (base, extra)]
    return {**as_map[0], **as_map[1]}


def load_options_file(path: str | os.PathLike | None = None) -> StorageOptions:
    """Storage options from a JSON file: ``path``, else ``$DEEPSTRF_STORAGE_OPTIONS``, else
    ``~/.config/deepstrf/storage.json`` if it exists (None if there is none)."""
    from_env = not path and bool(os.environ.get(CONFIG_ENV))
    explicit = path or os.environ.get(CONFIG_ENV)
    path = os.path.expanduser(explicit or DEFAULT_CONFIG)
    if not explicit and not os.path.exists(path):
        return None
    what = f"the storage options file {path}" + (f" (named by ${CONFIG_ENV})" if from_env else "")
    todo = f"; fix the file, or unset ${CONFIG_ENV}" if from_env else ""  # it applies to every command
    try:
        with open(path, encoding="utf-8") as f:
            options = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read {what}: {e}{todo}") from e
    except ValueError as e:
        raise ValueError(f"{what} is not valid JSON: {e}{todo}") from e
    if not isinstance(options, dict):
        raise ValueError(f"{what} must hold a JSON object (options, or URL prefixes mapped to options), got "
                         f"{type(options).__name__}{todo}")
    try:
        is_per_location(options)
    except ValueError as e:
        raise ValueError(f"{what}: {e}{todo}") from e
    return options
