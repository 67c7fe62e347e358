"""References from a pool to its sources: writing them relative, resolving them safely.

A pool stores each source as a URL. When the source lies under the pool's
root (the folder or prefix that contains the pool), the URL is written
relative to that root, so the whole folder or bucket prefix can be moved,
copied or published and still opens. On open, a reference is followed only
if it resolves under the pool's root or under a root the caller allows;
everything else (another host or bucket, an absolute local path in a
downloaded pool, ``..`` escaping the root) is refused.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence
from urllib.parse import urlsplit

from ..errors import UntrustedReferenceError
from .location import Location, _protocol, canonical_url


def pool_root(pool: Location) -> str:
    """The folder or prefix that contains the pool."""
    if pool.is_local:
        return os.path.dirname(pool.url)
    return posixpath.dirname(pool.url)


def _split(url: str) -> tuple[str, str, str]:
    """``(protocol, authority, path)`` of a canonical URL; local paths have no authority."""
    proto = _protocol(url)
    if proto == "file":
        return proto, "", url
    parts = urlsplit(url)
    return proto, parts.netloc, parts.path or "/"


def _under(path: str, root: str, sep: str) -> bool:
    root = root.rstrip(sep) + sep
    return (path.rstrip(sep) + sep).startswith(root)


def is_under(url: str, root: str) -> bool:
    """True if ``url`` is ``root`` itself or lies inside it (same protocol and host)."""
    a, b = _split(canonical_url(url)), _split(canonical_url(root))
    sep = os.sep if a[0] == "file" else "/"
    return a[:2] == b[:2] and _under(a[2], b[2], sep)


def make_reference(pool: Location, source_url: str) -> str:
    """How the pool at ``pool`` should refer to ``source_url``: relative when under its root."""
    root = pool_root(pool)
    source_url = canonical_url(source_url)
    if not is_under(source_url, root):
        return source_url
    if pool.is_local:
        return os.path.relpath(source_url, root).replace(os.sep, "/")
    return posixpath.relpath(_split(source_url)[2], _split(root)[2])


def roots_outside(refs: Sequence[str]) -> list[str]:
    """The folders or prefixes that hold the references among ``refs`` that lie outside their
    pool's root (written absolute by :func:`make_reference`): what opening the pool must allow."""
    found = {(os.path.dirname if _protocol(ref) == "file" else posixpath.dirname)(canonical_url(ref))
             for ref in refs if "://" in ref or os.path.isabs(ref)}
    return sorted(found)


def _plainly_inside(ref: str) -> bool:
    """A relative reference of plain names: it resolves under the pool's root by construction."""
    return bool(ref) and "://" not in ref and not ref.startswith(("/", "~")) and "\\" not in ref and all(
        part not in ("", ".", "..") for part in ref.split("/"))


def resolve_reference(pool: Location, ref: str, allowed_roots: Sequence[str] = (), trust: bool = False,
                      root: str | None = None) -> str:
    """Absolute URL of reference ``ref`` stored in ``pool``, after the trust check.

    Raises :class:`UntrustedReferenceError` naming the pool, the reference and
    the way to allow it when it points outside the pool's root and every
    allowed root.
    """
    root = root or pool_root(pool)  # given by a caller resolving many references of one pool
    if _plainly_inside(ref):  # the common case, made cheap for pools of 10^4 sources
        return f"{root}/{ref}" if not pool.is_local else os.path.join(root, ref)
    if "://" in ref or os.path.isabs(ref):
        url = canonical_url(ref)
    elif pool.is_local:
        url = os.path.normpath(os.path.join(root, ref))
    else:
        proto, host, path = _split(root)
        url = f"{proto}://{host}{posixpath.normpath(posixpath.join(path, ref))}"
    if trust or is_under(url, root) or any(is_under(url, r) for r in allowed_roots):
        return url
    raise UntrustedReferenceError(
        f"pool {pool.url} references {ref!r} (resolved to {url}), which is outside the pool's root "
        f"{root} and outside the allowed roots {list(allowed_roots)}. If you trust this pool, open it "
        f"with allowed_roots=[{os.path.dirname(url) if _protocol(url) == 'file' else posixpath.dirname(url)!r}] "
        "or trust=True (arguments of open_dataset, or of StreamingNeuralDataset's open_options={...}; the CLI's "
        "--allow-root).")
