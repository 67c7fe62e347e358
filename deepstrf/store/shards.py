"""Range reads of the sharded data arrays of format 1.1: one GET per shard a range touches.

zarr 3.1 reads part of a shard as one request for the shard index, then one
request per inner chunk, awaited one after the other. deepstrf's data arrays
have a fixed layout (``docs/format.md``): 1-D, shard index first (``bytes`` ->
``crc32c``), inner chunks ``bytes`` -> ``blosc`` -> ``crc32c``. For such an
array :class:`ShardedArray` reads ``[a, b)`` with the shard indexes cached per
process: per shard, range GETs of the needed inner chunks (gaps of up to
``MAX_GAP_BYTES`` read along) or, on an object store, the whole shard object,
kept in a per-process cache (and in a directory that the DataLoader workers of
a streaming dataset share: :class:`ShardDirectory`); it decodes the inner chunks in a worker thread
straight into the caller's arrays (:meth:`ShardedArray.read_into`: a streamed
batch decodes into its own buffer).
Arrays laid out any other way are left to zarr (:meth:`ShardedArray.of` is None).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import mmap
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from numcodecs import blosc
from zarr.abc.store import RangeByteRequest
from zarr.core.buffer import default_buffer_prototype

from ..forksafe import kept_pool, process_alive, usable_cpus
from .integrity import MissingChunk
from .layout import check_crc, chunk_shape, codec_names, compressed_chunks, native_bytes, plain_dtype, slash_chunk_keys

_EMPTY = np.uint64(2**64 - 1)  # shard index entry of an absent inner chunk

Target = tuple[int, int, np.ndarray]  # (x, y, dest): elements [x, y) of the array go into dest

# Needed chunks of a shard further apart than this are fetched by separate GETs. Reading
# 1 MiB more costs about what a request does (the default of Rust's object_store too).
MAX_GAP_BYTES = 1 << 20
# Remote shards up to this size are fetched whole and cached (compressed, per process, LRU up to
# SHARD_CACHE_BYTES): on object stores a request costs about what a few MiB of transfer do.
WHOLE_SHARD_BYTES = 8 << 20
SHARD_CACHE_BYTES = 256 << 20
# Compressed inner chunks up to this size in all are decoded in the event loop's thread.
INLINE_DECODE_BYTES = 64 << 10
# Whole shards shared between the processes of one machine (see ShardDirectory), on disk: at
# most this much, and at most a quarter of the free space where the directory is.
SHARED_SHARD_BYTES = 1 << 30


_decode_threads: int | None = None  # None: one per core this process may use


def set_decode_threads(threads: int | None) -> None:
    """Decode in at most ``threads`` threads in this process (None: one per usable core). More
    threads than cores only contend: asyncio's default of cores + 4 per process, in each of 2
    DataLoader workers on 2 cores, ran a first epoch over S3 at 165 items/s, one thread each at
    175; one process with 2 threads at 168 against 157."""
    global _decode_threads
    _decode_threads = threads


def _decode_pool() -> ThreadPoolExecutor:
    threads = _decode_threads or usable_cpus()
    return kept_pool(f"deepstrf-decode-{threads}", threads)


def _span(table: np.ndarray) -> tuple[int, int]:
    """Bytes ``[lo, hi)`` of a shard holding the inner chunks listed in ``table``."""
    return int(table[:, 0].min()), int((table[:, 0] + table[:, 1]).max())


def _stored_end(table: np.ndarray) -> int:
    """Byte where the last inner chunk listed in a shard index ends (0 if it lists none)."""
    present = table[table[:, 0] != _EMPTY]
    return int((present[:, 0] + present[:, 1]).max()) if len(present) else 0


@dataclass(frozen=True)
class ShardLayout:
    """Element counts of a 1-D sharded array: per inner chunk, per shard (in chunks), in all."""

    chunk: int
    per_shard: int
    length: int
    dtype: np.dtype

    @property
    def index_bytes(self) -> int:
        return 16 * self.per_shard + 4

    def shards_of(self, a: int, b: int) -> range:
        """Shards holding elements ``[a, b)``."""
        if b <= a:
            return range(0)
        return range(a // self.chunk // self.per_shard, (b - 1) // self.chunk // self.per_shard + 1)

    def by_shard(self, targets: Iterable[Target]) -> list[tuple[int, int, list[Target]]]:
        """Targets split at shard boundaries and grouped per shard, as ``(a, b, targets)`` spans
        for :meth:`ShardedArray.read_into`."""
        size = self.chunk * self.per_shard
        groups: dict[int, list[Target]] = {}
        for x, y, dest in targets:
            while x < y:
                end = min(y, (x // size + 1) * size)
                groups.setdefault(x // size, []).append((x, end, dest[:end - x]))
                x, dest = end, dest[end - x:]
        return [(min(t[0] for t in g), max(t[1] for t in g), g) for _, g in sorted(groups.items())]

    def chunks_in(self, shard: int, a: int, b: int) -> range:
        """Inner chunks (global numbers) of ``shard`` holding elements of ``[a, b)``."""
        lo, hi = shard * self.per_shard, (shard + 1) * self.per_shard - 1
        return range(max(lo, a // self.chunk), min(hi, (b - 1) // self.chunk) + 1)


class ShardDirectory:
    """Whole shards as files in a directory that several processes share (the DataLoader workers
    of one streaming dataset), so that a shard one worker fetched is not fetched again by
    another. A process about to fetch a shard claims it first (a lock file), and the others
    wait for its file instead of fetching it too (up to ``wait_s``; a failed fetch drops the
    claim). At most ``max_bytes``, the oldest files removed first; files appear whole (written
    aside, then renamed, never changed in place) and are read mapped: their pages are the page
    cache every process shares, not fresh private memory of each. A directory that is gone (its
    owner cleaned it up) is not recreated.
    """

    POLL_S = 0.005
    LIVENESS_LOOKS = 20  # every this many looks, a waiter checks that the claim's process is alive

    def __init__(self, path: str, max_bytes: int = SHARED_SHARD_BYTES, wait_s: float = 30.0) -> None:
        self.path, self.max_bytes, self.wait_s = path, max_bytes, wait_s

    def _file(self, key: str) -> str:
        return os.path.join(self.path, hashlib.sha1(key.encode()).hexdigest())

    def get(self, key: str) -> np.ndarray | None:
        """The file of ``key``, mapped read-only (None: there is none)."""
        try:
            with open(self._file(key), "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:  # mmap refuses empty files
                    return np.empty(0, np.uint8)
                return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
        except FileNotFoundError:
            return None

    def claim(self, key: str) -> bool:
        """Take the right to fetch ``key`` (False: another process holds it). The claim names
        this process, so that a waiter can tell a claim whose process has died."""
        try:
            fd = os.open(self._file(key) + ".claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        except OSError:  # no directory: nobody to share with
            return True
        try:
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)
        return True

    def unclaim(self, key: str) -> None:
        with contextlib.suppress(OSError):
            os.remove(self._file(key) + ".claim")

    async def wait(self, key: str) -> np.ndarray | None:
        """The file of ``key`` once the process that claimed it wrote it; None if that process
        dropped its claim, died holding it (a worker stopped in the middle of a fetch: its
        claim is removed), or took longer than ``wait_s``. Polls with ``stat`` in the event
        loop: a thread hop per look cost a busy worker more than the look."""
        final = self._file(key)
        claim = final + ".claim"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        for look in itertools.count():
            if loop.time() >= deadline:
                return None
            claimed = os.path.exists(claim)  # before looking: a fetcher writes, then drops its claim
            if os.path.exists(final) or not claimed:
                return self.get(key)
            if look % self.LIVENESS_LOOKS == self.LIVENESS_LOOKS - 1 and self._claimer_died(claim):
                with contextlib.suppress(OSError):
                    os.remove(claim)
                return None
            await asyncio.sleep(self.POLL_S)

    @staticmethod
    def _claimer_died(claim: str) -> bool:
        try:
            with open(claim, "rb") as f:
                pid = int(f.read() or b"0")
        except (OSError, ValueError):
            return False  # gone (looked at next) or still being written
        return pid > 0 and not process_alive(pid)

    def put(self, key: str, blob: np.ndarray) -> np.ndarray:
        """Write ``blob`` as the file of ``key``; returns that file mapped (``blob`` itself when
        it could not be written), so that the caller can let its private copy go."""
        final = self._file(key)
        if not os.path.isdir(self.path):
            return blob
        if not os.path.exists(final):
            aside = f"{final}.{os.getpid()}.{threading.get_ident()}.part"
            try:
                blob.tofile(aside)
                os.replace(aside, final)
            except OSError:  # disk full, directory removed: sharing is an optimisation only
                with contextlib.suppress(OSError):
                    os.remove(aside)
                return blob
            self._trim()
        mapped = self.get(key)
        return blob if mapped is None or len(mapped) != len(blob) else mapped

    def _trim(self) -> None:
        with contextlib.suppress(OSError):
            files = [(e.stat().st_mtime, e.stat().st_size, e.path) for e in os.scandir(self.path)
                     if "." not in e.name]
            total = sum(size for _, size, _ in files)
            for _, size, path in sorted(files):
                if total <= self.max_bytes:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                total -= size


class ShardCache:
    """Least recently used whole shards, compressed, at most ``max_bytes`` in all (one per process),
    backed by a :class:`ShardDirectory` once :meth:`share` names one."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.blobs: OrderedDict[str, np.ndarray] = OrderedDict()
        self.lock = threading.Lock()
        self.directory: ShardDirectory | None = None

    def share(self, path: str | None) -> None:
        """Look up and keep fetched shards in the directory ``path`` too (None: stop sharing)."""
        if path is None:
            self.directory = None
            return
        try:
            free = shutil.disk_usage(path).free
        except OSError:  # gone: nothing to share
            free = 0
        self.directory = ShardDirectory(path, min(SHARED_SHARD_BYTES, free // 4))

    def get(self, key: str) -> np.ndarray | None:
        with self.lock:
            blob = self.blobs.get(key)
            if blob is not None:
                self.blobs.move_to_end(key)
            return blob

    def put(self, key: str, blob: np.ndarray) -> None:
        with self.lock:
            if key in self.blobs or blob.nbytes > self.max_bytes:
                return
            self.blobs[key] = blob
            self.nbytes += blob.nbytes
            while self.nbytes > self.max_bytes:
                self.nbytes -= self.blobs.popitem(last=False)[1].nbytes


SHARD_CACHE = ShardCache(SHARD_CACHE_BYTES)


class ShardedArray:
    """Reads ``[a, b)`` of a sharded 1-D array written the deepstrf way (see the module doc).

    ``url`` names the array (cache keys, messages). For a ``remote`` store, once a
    shard index shows shards of at most ``WHOLE_SHARD_BYTES``, shards are fetched
    whole in one GET (their index included) and kept in :data:`SHARD_CACHE`: a
    shard holds several rows, read at different times of an epoch.
    """

    def __init__(self, store, path: str, layout: ShardLayout, url: str = "", remote: bool = False) -> None:
        self.store = store
        self.prefix = path
        self.url = url or path
        self.layout = layout
        self.indexes: dict[int, np.ndarray] = {}  # shard -> (per_shard, 2) uint64 (offset, nbytes)
        self.loading: dict[int, asyncio.Future] = {}  # shard -> its index read in flight
        self.fetching: dict[int, asyncio.Future] = {}  # shard -> its whole-object read in flight
        self.whole: bool | None = None if remote else False  # fetch whole shards? decided on the first index

    @classmethod
    def of(cls, store, path: str, meta: dict, url: str = "", remote: bool = False) -> "ShardedArray | None":
        """A reader of the array at ``path`` of ``store``, described by ``meta`` (its ``zarr.json``),
        if it has the deepstrf shard layout, else None."""
        dtype, shape, codecs = plain_dtype(meta), meta.get("shape") or (), meta.get("codecs") or []
        if (dtype is None or len(shape) != 1 or codec_names(codecs) != ["sharding_indexed"]
                or not slash_chunk_keys(meta)):
            return None
        conf = codecs[0].get("configuration") or {}
        index_codecs = conf.get("index_codecs") or []
        shard = chunk_shape(meta)
        if (conf.get("index_location", "end") != "start" or not compressed_chunks(conf.get("codecs") or [], dtype)
                or codec_names(index_codecs) != ["bytes", "crc32c"]
                or not native_bytes(index_codecs[0], np.dtype("<u8"))
                or shard is None or len(conf.get("chunk_shape") or ()) != 1):
            return None
        chunk = int(conf["chunk_shape"][0])
        return cls(store, path, ShardLayout(chunk, shard[0] // chunk, int(shape[0]), dtype), url, remote)

    def key(self, shard: int) -> str:
        return f"{self.prefix}/c/{shard}"

    def chunk_name(self, k: int) -> str:
        """Where inner chunk ``k`` lives, for error messages."""
        return f"c/{k // self.layout.per_shard} (inner chunk {k % self.layout.per_shard})"

    async def _get(self, shard: int, lo: int, hi: int) -> np.ndarray:
        buf = await self.store.get(self.key(shard), default_buffer_prototype(), RangeByteRequest(lo, hi))
        return self._received(shard, lo, hi, None if buf is None else buf.as_numpy_array())

    def _get_here(self, shard: int, lo: int, hi: int) -> np.ndarray:
        return self._received(shard, lo, hi, self.store.read_here(self.key(shard), RangeByteRequest(lo, hi)))

    def _received(self, shard: int, lo: int, hi: int, data: np.ndarray | None) -> np.ndarray:
        if data is None:
            raise MissingChunk(self.key(shard))
        data = np.asarray(data).view(np.uint8)
        if len(data) != hi - lo:
            raise ValueError(f"{self.key(shard)}: truncated (bytes {lo}-{hi} requested, {len(data)} returned)")
        return data

    async def shard_index(self, shard: int) -> np.ndarray:
        """The ``(per_shard, 2)`` (offset, nbytes) table of ``shard``, read once per process
        (concurrent callers share one request; a failed read is not cached)."""
        if shard in self.indexes:
            return self.indexes[shard]
        if self.whole:
            await self._whole_shard(shard)
        else:
            await self._once(self.loading, shard, self._load_index)
        return self.indexes[shard]

    @staticmethod
    async def _once(in_flight: dict[int, asyncio.Future], shard: int, load):
        """``await load(shard)``, one run shared by concurrent callers (a failure is not kept)."""
        task = in_flight.get(shard)
        if task is None:
            task = in_flight[shard] = asyncio.ensure_future(load(shard))
            task.add_done_callback(lambda _: in_flight.pop(shard, None))
        return await task

    def _parse_index(self, shard: int, blob: np.ndarray) -> np.ndarray:
        body = check_crc(blob[:self.layout.index_bytes], f"{self.key(shard)} shard index")
        # a copy: a view would keep the whole blob the index came with alive as long as the index
        self.indexes[shard] = table = np.frombuffer(body, dtype="<u8").reshape(self.layout.per_shard, 2).copy()
        if self.whole is None:
            self.whole = 0 < _stored_end(table) <= WHOLE_SHARD_BYTES
        return table

    async def _load_index(self, shard: int) -> None:
        self._parse_index(shard, await self._get(shard, 0, self.layout.index_bytes))

    async def _load_whole(self, shard: int) -> np.ndarray:
        """Shard ``shard`` whole, kept in :data:`SHARD_CACHE`: from the directory shared with
        other processes when one is set (see :meth:`_through_directory`), else fetched here."""
        key, shared = self._cache_key(shard), SHARD_CACHE.directory
        blob = None if shared is None else await self._through_directory(shard, key, shared)
        if blob is None:
            blob = await self._fetch_whole(shard)
        SHARD_CACHE.put(key, blob)
        return blob

    async def _through_directory(self, shard: int, key: str, shared: ShardDirectory) -> np.ndarray | None:
        """Shard ``shard`` as the shared directory's file: there already, written by the process
        that is fetching it, or fetched here and written there. None when the file is damaged."""
        blob = shared.get(key)  # opens and maps a local file: no thread hop
        if blob is None and not shared.claim(key):
            blob = await shared.wait(key)  # another process is fetching it
        elif blob is None:
            try:  # look again: its fetcher may have written it and dropped its claim since we looked
                blob = shared.get(key)
                if blob is None:
                    # written in this thread (the event loop's): under load a hop to a worker thread
                    # kept the file from the processes waiting for it 5-50 ms a shard, the write itself 1-3
                    return shared.put(key, await self._fetch_whole(shard))
            finally:
                shared.unclaim(key)
        return blob if blob is not None and self._is_whole(shard, blob) else None

    async def _fetch_whole(self, shard: int) -> np.ndarray:
        """Shard ``shard`` in one GET, its index parsed."""
        buf = await self.store.get(self.key(shard), default_buffer_prototype())
        if buf is None:
            raise MissingChunk(self.key(shard))
        blob = np.asarray(buf.as_numpy_array()).view(np.uint8)
        if len(blob) < _stored_end(self._parse_index(shard, blob)):
            raise ValueError(f"{self.key(shard)}: truncated ({len(blob)} bytes, its index needs more)")
        return blob

    def _is_whole(self, shard: int, blob: np.ndarray) -> bool:
        """Does ``blob`` (from a shared directory) hold shard ``shard`` whole? Parses its index if so."""
        try:
            return len(blob) >= _stored_end(self._parse_index(shard, blob))
        except ValueError:  # its index fails its checksum: fetch the shard instead
            return False

    def _cache_key(self, shard: int) -> str:
        return f"{self.url}/c/{shard}"

    async def _whole_shard(self, shard: int) -> np.ndarray:
        """The whole shard object, from :data:`SHARD_CACHE` or one GET."""
        blob = SHARD_CACHE.get(self._cache_key(shard))
        if blob is None:
            return await self._once(self.fetching, shard, self._load_whole)
        if shard not in self.indexes:  # cached by another reader of the same array in this process
            self._parse_index(shard, blob)
        return blob

    async def warm(self, a: int, b: int) -> None:
        """Have the whole shards holding elements ``[a, b)`` cached (fetched, not decoded), where
        this array's shards are fetched whole; nothing otherwise (range reads need their targets)."""
        if self.whole:
            await asyncio.gather(*(self._whole_shard(s) for s in self.layout.shards_of(a, b)))

    async def read(self, a: int, b: int) -> np.ndarray:
        """Elements ``[a, b)``, decoded into one new array (see :meth:`read_into`)."""
        out = np.empty(max(b - a, 0), dtype=self.layout.dtype)
        await self.read_into(a, b, [(a, b, out)])
        return out

    async def read_into(self, a: int, b: int, targets: Sequence[Target]) -> None:
        """Decode elements ``[a, b)`` into ``targets`` (sorted by start): ``(x, y, dest)`` puts
        ``[x, y)`` into ``dest`` (``y - x`` elements). Per shard, the whole object when shards are
        fetched whole, else the inner chunks the targets need, in range GETs that span gaps of up
        to ``MAX_GAP_BYTES``; an inner chunk that one target covers whole is decoded straight into
        it, others once into a scratch buffer."""
        await asyncio.gather(*(self._read_shard(s, a, b, targets) for s in self.layout.shards_of(a, b)))

    def read_into_here(self, a: int, b: int, targets: Sequence[Target]) -> None:
        """:meth:`read_into` in the calling thread, for a store that reads there (local files:
        no event loop, no thread hop)."""
        for shard in self.layout.shards_of(a, b):
            if shard not in self.indexes:
                self._parse_index(shard, self._get_here(shard, 0, self.layout.index_bytes))
            for table, chunks in self._runs(shard, a, b, targets):
                lo, hi = _span(table)
                self._decode(self._get_here(shard, lo, hi), lo, table, chunks, a, b, targets)

    async def _read_shard(self, shard: int, a: int, b: int, targets: Sequence[Target]) -> None:
        await self.shard_index(shard)
        if self.whole:
            ((table, chunks),) = self._runs(shard, a, b, targets, whole=True)
            blob = await self._whole_shard(shard)
            await self._decode_soon(int(table[:, 1].sum()), blob, 0, table, chunks, a, b, targets)
            return
        await asyncio.gather(*(self._read_run(shard, table, chunks, a, b, targets)
                               for table, chunks in self._runs(shard, a, b, targets)))

    def _runs(self, shard: int, a: int, b: int, targets: Sequence[Target], whole: bool = False
              ) -> list[tuple[np.ndarray, range]]:
        """The inner chunks of ``shard`` to fetch for ``targets``, as runs fetched by one GET each
        (``whole``: all of them in one), each as its rows of the shard index and its chunks."""
        chunks = self.layout.chunks_in(shard, a, b)
        first = chunks.start - shard * self.layout.per_shard
        table = self.indexes[shard][first:first + len(chunks)]
        if (table == _EMPTY).any():
            raise MissingChunk(f"{self.key(shard)}: an inner chunk is absent from the shard index")
        if whole:
            return [(table, chunks)]
        C = self.layout.chunk
        starts = np.arange(chunks.start, chunks.stop, dtype=np.int64) * C
        xs = np.array([t[0] for t in targets], dtype=np.int64)
        ys = np.array([t[1] for t in targets], dtype=np.int64)
        needed = ((xs[None, :] < starts[:, None] + C) & (ys[None, :] > starts[:, None])).any(axis=1)
        runs: list[list[int]] = []  # positions in `chunks`, fetched by one GET each
        for i in np.flatnonzero(needed).tolist():
            if runs and int(table[i, 0]) - int(table[runs[-1][-1]].sum()) <= MAX_GAP_BYTES:
                runs[-1].append(i)
            else:
                runs.append([i])
        return [(table[run[0]:run[-1] + 1], chunks[run[0]:run[-1] + 1]) for run in runs]

    async def _read_run(self, shard: int, table: np.ndarray, chunks: range, a: int, b: int,
                        targets: Sequence[Target]) -> None:
        lo, hi = _span(table)
        data = await self._get(shard, lo, hi)
        await self._decode_soon(hi - lo, data, lo, table, chunks, a, b, targets)

    async def _decode_soon(self, nbytes: int, *args) -> None:
        """:meth:`_decode` here when its input is small (a thread hop would cost more than the
        decoding), else in this process's decoding threads (:func:`set_decode_threads`), not to
        hold the event loop up."""
        if nbytes <= INLINE_DECODE_BYTES:
            self._decode(*args)
        else:
            await asyncio.get_running_loop().run_in_executor(_decode_pool(), functools.partial(self._decode, *args))

    def _decode(self, data: np.ndarray, lo: int, table: np.ndarray, chunks: range, a: int, b: int,
                targets: Sequence[Target]) -> None:
        C = self.layout.chunk
        first = 0  # targets (sorted by start) before this one end before the current chunk
        for k, (offset, nbytes) in zip(chunks, table.tolist()):
            cx, cy = max(k * C, a), min((k + 1) * C, b)
            while first < len(targets) and targets[first][1] <= cx:
                first += 1
            pieces = []
            for x, y, dest in itertools.takewhile(lambda t: t[0] < cy, itertools.islice(targets, first, None)):
                if y > cx:
                    pieces.append((max(x, cx), min(y, cy), x, dest))
            if not pieces:  # a gap between targets, fetched with them but not needed
                continue
            body = check_crc(data[offset - lo:offset - lo + nbytes], f"{self.key(k // self.layout.per_shard)} "
                                                                    f"inner chunk {k % self.layout.per_shard}")
            if len(pieces) == 1 and pieces[0][:2] == (k * C, (k + 1) * C) and pieces[0][3].dtype == self.layout.dtype:
                px, py, x, dest = pieces[0]
                blosc.decompress(body, dest[px - x:py - x])
                continue
            whole = np.frombuffer(blosc.decompress(body), dtype=self.layout.dtype)
            for px, py, x, dest in pieces:
                dest[px - x:py - x] = whole[px - k * C:py - k * C]
