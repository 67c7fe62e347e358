"""Reads that bypass zarr's codec pipeline: small arrays decoded by deepstrf, local files read in
the calling thread; each must give exactly what zarr gives, and leave other layouts to zarr."""

import asyncio
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr
from zarr.abc.store import RangeByteRequest
from zarr.core.sync import sync
from zarr.storage import LocalStore, MemoryStore

import deepstrf
from deepstrf.datasets.synthetic import SourceSpec, SyntheticAudioDataset
from deepstrf.errors import IntegrityError
from deepstrf.store import format as fmt
from deepstrf.store import localfiles
from deepstrf.store.direct import SmallArray
from deepstrf.store.integrity import StrictStore
from deepstrf.store.localfiles import InlineLocalStore
from deepstrf.store.shards import ShardedArray

def small_source(n_stims=4, n_neurons=5):
    spec = SourceSpec(name="s", n_stims=n_stims, n_neurons=n_neurons, F=8, dt_ms=1.0, T_range=(30, 30), repeats=2,
                      coverage=1.0, species="zebra finch", areas=("MLd",))
    return SyntheticAudioDataset(spec, seed=0)


SHAPES = [((5,), 5, np.uint8), ((10, 3), 10, np.int64), ((1000,), 64, np.float32), ((201,), 1000, np.int64),
          ((0,), 1, np.uint8), ((7, 2), 3, np.uint16)]


def write(store, name, data, chunk, **codecs):
    group = zarr.open_group(store, mode="a", zarr_format=3)
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=(chunk, *data.shape[1:]),
                             **(codecs or fmt.codecs(data.dtype)))
    if data.size:
        arr[...] = data
    return arr


@pytest.mark.parametrize("shape,chunk,dtype", SHAPES)
def test_small_arrays_read_as_zarr_reads_them(tmp_path, shape, chunk, dtype):
    data = (np.arange(int(np.prod(shape))) * 7 % 251).astype(dtype).reshape(shape)
    local = str(tmp_path / "g.zarr")
    arr = write(local, "a", data, chunk)
    meta = arr.metadata.to_dict()
    for store in (StrictStore(InlineLocalStore(local, read_only=True)), StrictStore(LocalStore(local, read_only=True))):
        reader = SmallArray.of(store, "a", json.loads(json.dumps(meta)))
        assert reader is not None
        got = sync(reader.read())
        assert got.dtype == data.dtype and np.array_equal(got, data)
        if store.reads_here:
            assert np.array_equal(reader.read_here(), data)


def test_other_layouts_are_left_to_zarr(tmp_path):
    from zarr.codecs import BytesCodec

    store = MemoryStore()
    data = np.arange(12, dtype=np.int32)
    plain = write(store, "plain", data, 4, serializer=BytesCodec(endian="little"), compressors=None)
    big = write(store, "big", data, 4, serializer=BytesCodec(endian="big"),
                compressors=fmt.codecs(data.dtype)["compressors"])
    group = zarr.open_group(store, mode="a", zarr_format=3)
    by_columns = group.create_array("by_columns", shape=(4, 6), dtype=np.int32, chunks=(4, 3), **fmt.codecs(np.int32))
    v2_keys = group.create_array("v2_keys", shape=(12,), dtype=np.int32, chunks=(4,), chunk_key_encoding={"name": "v2"},
                                 **fmt.codecs(np.int32))
    for arr in (plain, big, by_columns, v2_keys):
        assert SmallArray.of(store, arr.path, arr.metadata.to_dict()) is None
        assert ShardedArray.of(store, arr.path, arr.metadata.to_dict()) is None  # none of them is sharded


def test_missing_and_damaged_small_chunks_are_named(tmp_path):
    url = str(tmp_path / "s.zarr")
    deepstrf.save_dataset(small_source(), url)
    chunk = os.path.join(url, fmt.REPEATS, "c", "0", "0")
    blob = bytearray(open(chunk, "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    open(chunk, "wb").write(bytes(blob))
    with pytest.raises(IntegrityError, match="responses/repeats.*corrupt.*deepstrf verify"):
        deepstrf.open_dataset(url).responses.reader.index()
    os.remove(chunk)
    with pytest.raises(IntegrityError, match="responses/repeats.*missing"):
        deepstrf.open_dataset(url).responses.reader.index()


def test_small_sources_get_data_chunks_of_their_own_length(tmp_path):
    url = str(tmp_path / "s.zarr")
    src = small_source()
    deepstrf.save_dataset(src, url)
    reader = deepstrf.open_dataset(url).responses.reader
    for name in fmt.SHARDED:
        layout = reader.sharded()[name].layout
        assert layout.chunk == layout.length < fmt.data_chunk_elems(name, layout.dtype)
    again = deepstrf.open_dataset(url)
    assert all(np.array_equal(again.stims[s].numpy(), src.stims[s].numpy()) for s in range(4))


def test_inline_local_store_reads_like_zarrs_local_store(tmp_path, monkeypatch):
    folder = tmp_path / "st"
    (folder / "d").mkdir(parents=True)
    payload = bytes(range(256)) * 40
    (folder / "d" / "obj").write_bytes(payload)
    inline, plain = InlineLocalStore(str(folder), read_only=True), LocalStore(str(folder), read_only=True)
    assert inline.read_here("d/obj").tobytes() == payload
    assert inline.read_here("d/obj", RangeByteRequest(10, 300)).tobytes() == payload[10:300]
    assert inline.read_here("d/none") is None
    for limit in (1 << 20, 100):  # read in the loop's thread, then through zarr's thread
        monkeypatch.setattr(localfiles, "INLINE_BYTES", limit)
        for key, rng in (("d/obj", None), ("d/obj", RangeByteRequest(5, 2000)), ("d/none", None)):
            async def both():
                return await asyncio.gather(inline.get(key, byte_range=rng), plain.get(key, byte_range=rng))
            a, b = sync(both())
            assert (a is None and b is None) or a.to_bytes() == b.to_bytes()


def test_a_dataset_starts_the_worker_server_from_a_top_level_process_only(tmp_path):
    """Building a StreamingNeuralDataset whose workers would use the forkserver (a dataset object:
    the user's code) starts it (its imports overlap the caller's work), but not from a process
    another process started (whose parent has one), nor for a store URL (its workers are forked)."""
    url = str(tmp_path / "s.zarr")
    deepstrf.save_dataset(small_source(3, 4), url)
    code = f"""
import multiprocessing, multiprocessing.forkserver as fs
from deepstrf import open_dataset
from deepstrf.stream import StreamingNeuralDataset

def child(q):
    StreamingNeuralDataset(open_dataset({url!r}))
    q.put(fs._forkserver._forkserver_pid)

if __name__ == "__main__":
    q = multiprocessing.get_context("spawn").Queue()
    p = multiprocessing.get_context("spawn").Process(target=child, args=(q,))
    p.start(); in_child = q.get(timeout=60); p.join(60)
    StreamingNeuralDataset({url!r})
    assert fs._forkserver._forkserver_pid is None
    StreamingNeuralDataset(open_dataset({url!r}))
    print(in_child, fs._forkserver._forkserver_pid is not None)
"""
    script = tmp_path / "script.py"  # a spawned child imports the parent's main module: a file
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "True"]
