"""Recognising the storage layouts deepstrf writes, from an array's ``zarr.json`` document.

:mod:`.direct` and :mod:`.shards` read arrays in these layouts without zarr's
codec pipeline; both check a layout here first and leave any other to zarr.
"""

from __future__ import annotations

import sys
from typing import Any

import google_crc32c
import numpy as np


def plain_dtype(meta: dict[str, Any]) -> np.dtype | None:
    """The numpy dtype of an array's metadata document, if a plain numeric one."""
    name = meta.get("data_type")
    if not isinstance(name, str):
        return None
    try:
        dtype = np.dtype(name)
    except TypeError:
        return None
    return dtype if dtype.kind in "biuf" else None


def codec_names(codecs: list[dict[str, Any]]) -> list[str | None]:
    return [c.get("name") for c in codecs]


def native_bytes(codec: dict[str, Any], dtype: np.dtype) -> bool:
    """Is ``codec`` zarr's ``bytes`` codec storing ``dtype`` as this (little-endian) machine does?"""
    if codec.get("name") != "bytes" or sys.byteorder != "little":
        return False
    endian = (codec.get("configuration") or {}).get("endian")
    return endian == "little" or (endian is None and dtype.itemsize == 1)


def compressed_chunks(codecs: list[dict[str, Any]], dtype: np.dtype) -> bool:
    """Are these the codecs of deepstrf's chunks: ``bytes`` -> ``blosc`` -> ``crc32c``?"""
    return codec_names(codecs) == ["bytes", "blosc", "crc32c"] and native_bytes(codecs[0], dtype)


def slash_chunk_keys(meta: dict[str, Any]) -> bool:
    """Does the array name its chunks ``c/<i>/<j>...`` (zarr v3's default key encoding)?"""
    keys = meta.get("chunk_key_encoding") or {}
    return keys.get("name") == "default" and (keys.get("configuration") or {}).get("separator", "/") == "/"


def chunk_shape(meta: dict[str, Any]) -> tuple[int, ...] | None:
    """The chunk shape of a regular chunk grid, else None."""
    grid = meta.get("chunk_grid") or {}
    if grid.get("name") != "regular":
        return None
    return tuple(int(c) for c in (grid.get("configuration") or {}).get("chunk_shape") or ())


def check_crc(blob: np.ndarray, where: str) -> np.ndarray:
    """``blob`` (uint8) without its trailing CRC32C, after checking it."""
    body = blob[:-4]
    if len(blob) < 4 or np.uint32(google_crc32c.value(body)).tobytes() != blob[-4:].tobytes():
        raise ValueError(f"{where}: stored and computed crc32c checksums do not match")
    return body


def blosc_nbytes(body: np.ndarray) -> int:
    """The uncompressed size a blosc chunk's header declares (bytes 4-8, little endian); -1 if it has none."""
    return int.from_bytes(body[4:8].tobytes(), "little") if len(body) >= 16 else -1
