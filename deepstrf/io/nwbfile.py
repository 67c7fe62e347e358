"""Opening an NWB file, local or remote, and identifying its content without reading it.

Remote files (``s3://``, ``https://``, any fsspec protocol) are opened as fsspec byte-range files
with a block cache and handed to h5py, so only the HDF5 objects actually read are fetched. An
NWB-Zarr session (a folder, local or remote) is rebuilt as an HDF5 image in memory
(:mod:`deepstrf.io.nwbzarr`) and read the same way.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

from ..errors import NWBReadError
from ..store.location import Location
from .nwbzarr import hdf5_image, is_nwb_zarr, metadata_document

BLOCK_SIZE = 4 << 20     # bytes per range request from remote files
MAX_BLOCKS = 16          # at most 64 MiB of a remote file cached per open file


def _fs_path(loc: Location) -> tuple[Any, str]:
    import fsspec

    if loc.is_local:
        return fsspec.filesystem("file"), loc.url
    return fsspec.url_to_fs(loc.url, **(loc.fsspec_options() or {}))


def input_identity(url: str | os.PathLike, storage_options: dict | None = None) -> dict[str, Any]:
    """URL, size and version (ETag or modification time) of the file (of an NWB-Zarr session: of its
    consolidated metadata document): a few metadata requests."""
    loc = Location.parse(url, storage_options)
    try:
        fs, path = _fs_path(loc)
        info = fs.info(metadata_document(fs, path) if is_nwb_zarr(fs, path) else path)
    except FileNotFoundError as e:
        raise NWBReadError(f"no NWB file at {loc.url}: check the path or URL (and storage_options).") from e
    except OSError as e:
        raise NWBReadError(f"cannot reach {loc.url}: {e}. Check the URL and storage_options.") from e
    version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return {"url": loc.url, "size": int(info.get("size") or 0), "version": str(version)}


def fingerprint(identity: dict[str, Any], options: dict[str, Any]) -> str:
    """``sha256:<hex>`` of the input's identity and the conversion options (what decides the output)."""
    doc = json.dumps({"input": identity, "options": options}, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(doc.encode()).hexdigest()


@contextlib.contextmanager
def open_nwb(url: str | os.PathLike, storage_options: dict | None = None, keep: tuple[str, ...] = ()) -> Iterator[Any]:
    """Yield the ``pynwb.NWBFile`` at ``url`` (read-only); remote files are read by byte ranges.
    ``keep``: series under ``/acquisition`` or ``/processing`` an NWB-Zarr image must hold."""
    import h5py
    import pynwb

    loc = Location.parse(url, storage_options)
    # Files read before may be garbage in reference cycles (pynwb's objects form them). Collected
    # later by whichever thread the collector runs in, their finalizers take h5py's global lock: in
    # fsspec's event-loop thread, while this thread holds that lock waiting for a remote read from
    # that loop, that deadlocks. Collect them here, where no h5py lock is held.
    gc.collect()
    with contextlib.ExitStack() as stack:
        try:
            fs, path = _fs_path(loc)
            if is_nwb_zarr(fs, path):
                h5 = stack.enter_context(h5py.File(hdf5_image(loc, fs, path, keep), "r"))
            elif loc.is_local:
                h5 = stack.enter_context(h5py.File(loc.url, "r"))
            else:
                raw = stack.enter_context(fs.open(path, "rb", block_size=BLOCK_SIZE, cache_type="blockcache",
                                                  cache_options={"maxblocks": MAX_BLOCKS}))
                h5 = stack.enter_context(h5py.File(raw, "r"))
            io = stack.enter_context(pynwb.NWBHDF5IO(file=h5, mode="r", load_namespaces=True))
            nwb = io.read()
        except NWBReadError:
            raise
        except FileNotFoundError as e:
            raise NWBReadError(f"no NWB file at {loc.url}: check the path or URL (and storage_options).") from e
        except OSError as e:  # over a network, also what the storage raised (a 503, credentials)
            storage = "" if loc.is_local else (" (or reading it failed: check the connection and credentials, "
                                                "then retry)")
            raise NWBReadError(f"{loc.url} cannot be read as an NWB (HDF5) file{storage}: {e}") from e
        except Exception as e:  # pynwb/hdmf raise many types for a file that is HDF5 but not NWB
            raise NWBReadError(f"{loc.url} is not a readable NWB file ({type(e).__name__}: {e}); is it damaged "
                               "or truncated? Check it against its source.") from e
        yield nwb
