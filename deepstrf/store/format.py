"""Format v1 of a source store: names, dtypes, chunking, codecs, version rules.

``docs/format.md`` is the normative description; this module is its code.
"""

from __future__ import annotations

import numpy as np

from ..errors import FormatVersionError, StoreError

SOURCE_FORMAT = "deepstrf.source"
VERSIONS_FORMAT = "deepstrf.versions"  # the root index of a source with versions (versions.py)
FORMAT_VERSION = "1.1"       # 1.1: responses/values and stims/values sharded (1.0 stores still read)
POOL_FORMAT_VERSION = "2.0"
SUPPORTED_MAJOR = 1
POOL_SUPPORTED_MAJORS = (1, 2)  # format-1 pools are read, never written
POOL_CHUNK_BYTES = 64 << 20  # a pool's tables and coverage bits: one chunk (one request) up to 64 MiB

# Inner chunks of the data arrays. A row or stimulus rarely starts or ends on a chunk edge, and
# its two edge chunks are decoded whole: small chunks waste little; below ~256 KiB (counts) or
# ~64 KiB (stimuli) blosc decodes slower or compresses worse (measured on AA2-like data).
CHUNK_BYTES = 1 << 18       # responses/values: 256 KiB of uncompressed counts per inner chunk
STIM_CHUNK_BYTES = 1 << 16  # stims/values: 64 KiB (stimuli compress poorly)
SHARD_CHUNKS = 128          # inner chunks per shard: one range GET reads many chunks
INDEX_CHUNK_BYTES = 1 << 20  # every other array (offsets, repeats, metadata, a pool's coverage)
BLOSC_LEVEL = 5        # measured: zstd 5 + bitshuffle ~80x vs float32 on counts, decode ~1.5 GB/s
# Bit-shuffle words of at least this many bytes. c-blosc un-bitshuffles odd type sizes (1-byte
# counts) with scalar code; as 2-byte words its SIMD path runs. Measured on AA1-like uint8 counts:
# decode 1.54 -> 1.83 GB/s on one core, compression 23.2x -> 21.8x (any size decodes: blosc reads
# it from each chunk's header).
BITSHUFFLE_MIN_TYPESIZE = 2

VALUES = "responses/values"
OFFSETS = "responses/offsets"
REPEATS = "responses/repeats"
STIM_VALUES = "stims/values"
STIM_OFFSETS = "stims/offsets"
STIM_SHAPES = "stims/shapes"
STIM_META = "meta/stim_meta"
NRN_META = "meta/nrn_meta"
ARRAYS = (VALUES, OFFSETS, REPEATS, STIM_VALUES, STIM_OFFSETS, STIM_SHAPES, STIM_META, NRN_META)
SHARDED = (VALUES, STIM_VALUES)

KINDS = ("audio", "video", "neural")
# group attributes that describe the store rather than its content (not fingerprinted)
NON_CONTENT_ATTRS = ("fingerprint", "nbytes_stored", "written_by")

_UINTS = (np.uint8, np.uint16, np.uint32, np.uint64)
_INTS = (np.int8, np.int16, np.int32, np.int64)


def chunk_elems(dtype: np.dtype, row: int = 1, target: int | None = None) -> int:
    """Chunk length (along axis 0) giving ~``target`` bytes (default ``INDEX_CHUNK_BYTES``) for rows of
    ``row`` elements."""
    return max(1, (target or INDEX_CHUNK_BYTES) // (np.dtype(dtype).itemsize * max(1, row)))


def data_chunk_elems(name: str, dtype: np.dtype) -> int:
    """Inner chunk length of a data array (``VALUES`` or ``STIM_VALUES``)."""
    return chunk_elems(dtype, target=STIM_CHUNK_BYTES if name == STIM_VALUES else CHUNK_BYTES)


def shards(chunk: int) -> dict:
    """zarr ``create_array`` argument sharding a 1-D array of ``chunk``-element inner chunks
    into objects of ``SHARD_CHUNKS`` chunks, shard index first (bytes -> crc32c, zarr's default)."""
    return {"shards": {"shape": (chunk * SHARD_CHUNKS,), "index_location": "start"}}


def codecs(dtype: np.dtype, text: bool = False) -> dict:
    """zarr ``create_array`` codec arguments: bytes (little endian) -> blosc zstd -> crc32c
    (of the inner chunks, when the array is sharded). Numbers are bit-shuffled in words of
    their item size, at least ``BITSHUFFLE_MIN_TYPESIZE`` bytes; text is not shuffled."""
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

    itemsize = np.dtype(dtype).itemsize
    shuffle, typesize = ("noshuffle", itemsize) if text else ("bitshuffle", max(itemsize, BITSHUFFLE_MIN_TYPESIZE))
    return {
        "serializer": BytesCodec(),
        "compressors": [BloscCodec(cname="zstd", clevel=BLOSC_LEVEL, shuffle=shuffle, typesize=typesize),
                        Crc32cCodec()],
        "filters": None,
        "fill_value": 0,
        "config": {"write_empty_chunks": True},
    }


def smallest_int(lo: int, hi: int) -> np.dtype:
    """Smallest unsigned (or, with negatives, signed) integer dtype holding ``[lo, hi]``."""
    for t in (_UINTS if lo >= 0 else _INTS):
        info = np.iinfo(t)
        if info.min <= lo and hi <= info.max:
            return np.dtype(t)
    raise OverflowError(f"integer range [{lo}, {hi}] does not fit in 64 bits")


def value_dtype(values: np.ndarray) -> np.dtype:
    """Smallest dtype that stores ``values`` losslessly.

    Integral values (also when given as floats) get the smallest integer
    type; other values float32, or float64 when float32 would round them.
    """
    return value_type(values)[0]


Span = tuple[int, int]


def value_type(values: np.ndarray) -> tuple[np.dtype, Span | None]:
    """:func:`value_dtype` of ``values``, and their ``(min, max)`` where that is an integer type
    (None for no values and for floating ones)."""
    if values.size == 0:
        return np.dtype(np.uint8), None
    if values.dtype.kind in "biu":
        lo, hi = int(values.min()), int(values.max())
        return smallest_int(lo, hi), (lo, hi)
    if values.dtype.kind != "f":
        raise TypeError(f"responses must hold numbers, got dtype {values.dtype}")
    finite = bool(np.isfinite(values).all())
    if finite and np.array_equal(values, np.trunc(values)):
        lo, hi = float(values.min()), float(values.max())
        if -2.0 ** 63 <= lo and hi < 2.0 ** 64 and (values.dtype.itemsize <= 4 or max(abs(lo), abs(hi)) <= 2 ** 53):
            return smallest_int(int(lo), int(hi)), (int(lo), int(hi))
    if values.dtype.itemsize <= 4 or np.array_equal(values.astype(np.float32), values, equal_nan=True):
        return np.dtype(np.float32), None
    return np.dtype(np.float64), None


def widen(current: np.dtype, needed: np.dtype, span: Span | None = None) -> np.dtype:
    """The dtype that holds both ``current`` and ``needed`` values losslessly.

    ``span``: the ``(min, max)`` of every value so far, where all are integers (responses); then
    the values decide, not their types: ``current`` if it holds the span, else the smallest
    integer type that does (a uint8 piece of 0..7 and an int8 piece of -3..2 fit int8, where
    their types promote to int16).
    """
    if span is not None and current.kind in "iu" and needed.kind in "iu":
        info = np.iinfo(current)
        return current if info.min <= span[0] and span[1] <= info.max else smallest_int(*span)
    out = np.promote_types(current, needed)
    if out.kind == "f" and out.itemsize < 4:
        out = np.dtype(np.float32)
    return out


def read_dtype(stored: np.dtype) -> np.dtype:
    """dtype of response tensors handed to users: float32 (float64 only if stored so)."""
    return np.dtype(np.float64) if np.dtype(stored) == np.float64 else np.dtype(np.float32)


def check_format(attrs: dict, url: str, expected: str | None = SOURCE_FORMAT,
                 supported: tuple[int, ...] = (SUPPORTED_MAJOR,)) -> None:
    """Refuse groups that are not deepstrf stores, or of an unknown major version."""
    fmt = attrs.get("format")
    if not isinstance(fmt, str) or not fmt.startswith("deepstrf."):
        raise StoreError(
            f"{url} is a zarr group but not a deepstrf store (no 'format' attribute starting "
            "with 'deepstrf.'); create it with deepstrf.save_dataset.")
    version = str(attrs.get("format_version", ""))
    major = version.split(".")[0]
    if not major.isdigit() or int(major) not in supported:
        raise FormatVersionError(
            f"{url} was written in deepstrf format version {version!r} ({fmt}); this reader "
            f"understands major version(s) {', '.join(map(str, supported))} only. Upgrade deepstrf to read it.")
    if expected is not None and fmt != expected:
        raise StoreError(f"{url} holds a {fmt!r} group, expected {expected!r}.")
