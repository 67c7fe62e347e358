"""Streaming from Zarr stores by URL: local folder and S3 (moto on 127.0.0.1) with injected faults."""

import dataclasses
import os
import pickle
import time
import types
from collections import Counter

import numpy as np
import pytest
from torch.utils.data import DataLoader

from deepstrf.datasets.collate import compact_collate
from deepstrf.store import open_dataset, shards
from deepstrf.store.dataset import source_readers
from deepstrf.stream import RetryPolicy, StreamingNeuralDataset, StreamReadError, handover

from stream_helpers import batch_keys, compact_equal, item_key, items_equal, loader_timeout, write_pool

FAST = RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.05)


@pytest.fixture(scope="module")
def local_pool(tmp_path_factory):
    return write_pool(str(tmp_path_factory.mktemp("stores")), None)


@pytest.fixture(scope="module")
def s3(s3_server):
    return s3_server.sim


@pytest.fixture(scope="module")
def s3_pool(s3):
    # one botocore attempt: the streaming layer's own retries are what is tested
    options = s3.storage_options(botocore_attempts=1)
    return write_pool(s3.make_bucket("stream-test"), options), options


@pytest.fixture
def no_s3fs_retries(monkeypatch):
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)


def test_local_url_items_equal_map_style(local_pool):
    ref = open_dataset(local_pool)
    got = list(StreamingNeuralDataset(local_pool, shuffle=False))
    assert len(got) == len(ref)
    for i, item in enumerate(got):
        assert items_equal(item, ref[i])


def test_local_url_compact_batches_keep_integer_counts(local_pool):
    ref = open_dataset(local_pool)
    batches = list(StreamingNeuralDataset(local_pool, shuffle=False, batch_size=4))
    assert not batches[0].values.is_floating_point()
    for j, b in enumerate(batches):
        items = [ref[i] for i in range(4 * j, min(len(ref), 4 * j + 4))]
        assert compact_equal(b, compact_collate(items, neuron_index=ref.selected_neurons()))


def test_url_dataset_pickles_without_open_handles(local_pool):
    s = StreamingNeuralDataset(local_pool, batch_size=4)
    assert len(s) > 0  # opens in this process
    clone = pickle.loads(pickle.dumps(s))
    assert clone._opened is None and clone.url == local_pool
    assert len(list(clone)) == len(s)


@pytest.mark.parametrize("workers", [0, 2])
def test_s3_exactly_once(s3_pool, workers, no_cached_shards):
    url, options = s3_pool
    s = StreamingNeuralDataset(url, storage_options=options, batch_size=3, seed=1, retry=FAST)
    loader = DataLoader(s, batch_size=None, num_workers=workers, timeout=loader_timeout(workers))
    keys = [k for b in loader for k in batch_keys(b)]
    ref = open_dataset(url, storage_options=options)
    assert Counter(keys) == Counter(item_key(ref[i]) for i in range(len(ref)))
    stats = s.stats()
    assert stats["items"] == len(ref) and stats["bytes_fetched"] > 0


def test_s3_selection_and_cache(s3_pool, tmp_path):
    url, options = s3_pool
    s = StreamingNeuralDataset(url, storage_options=options, batch_size=2, retry=FAST,
                               select=_only_aa2, cache_dir=tmp_path, cache_bytes=50 << 20)
    first = sorted(k for b in s for k in batch_keys(b))
    second = sorted(k for b in s for k in batch_keys(b))
    assert first == second and all(k.startswith("AA2") for k in first)
    assert s.stats()["cache_hits"] == len(first)


def test_row_cache_hits_and_equal_batches(local_pool, tmp_path):
    s = StreamingNeuralDataset(local_pool, batch_size=4, shuffle=False, cache_dir=tmp_path, cache_bytes=10 << 20)
    first = list(s)
    second = list(s)
    assert s.stats()["cache_hits"] == len(s.dataset())
    for a, b in zip(first, second):
        assert compact_equal(a, b)


@pytest.mark.parametrize("transform", [lambda d: d.normalize_responses(), lambda d: d.smooth_responses(),
                                       lambda d: d.smooth_responses(window_ms=5.0)])
def test_row_cache_keeps_transformed_rows_apart(local_pool, tmp_path, transform):
    """A transform recorded on a store-backed dataset is part of the cache's key: its rows are not
    served from the untransformed store's cached rows (nor from another transform's)."""
    list(StreamingNeuralDataset(open_dataset(local_pool), shuffle=False, cache_dir=tmp_path))
    other = open_dataset(local_pool)
    other.smooth_responses(window_ms=30.0)
    list(StreamingNeuralDataset(other, shuffle=False, cache_dir=tmp_path))
    ds = open_dataset(local_pool)
    transform(ds)
    s = StreamingNeuralDataset(ds, shuffle=False, cache_dir=tmp_path)
    assert all(items_equal(item, ds[i]) for i, item in enumerate(s))
    hits = s.stats()["cache_hits"]
    assert all(items_equal(item, ds[i]) for i, item in enumerate(s))
    assert (hits, s.stats()["cache_hits"]) == (0, len(ds))  # its own rows are cached


def _only_aa2(ds):
    ds.select_pop_by_nrn_attr("dataset", "AA2")


@pytest.fixture
def no_cached_shards(monkeypatch):
    monkeypatch.setattr(shards, "SHARD_CACHE", shards.ShardCache(1 << 30))  # nothing cached by earlier tests


def test_s3_transient_failures_are_survived(s3, s3_pool, no_s3fs_retries, no_cached_shards):
    url, options = s3_pool
    s = StreamingNeuralDataset(url, storage_options=options, batch_size=4, retry=FAST, prefetch=1, read_threads=1)
    fault = s3.fail("/responses/values/c/", status=503, times=3)
    try:
        keys = [k for b in s for k in batch_keys(b)]
    finally:
        s3.clear_faults()
    assert fault.hits == 3
    assert s.stats()["retries"] >= 1
    assert len(keys) == len(set(keys)) == len(open_dataset(url, storage_options=options))


def test_a_stalled_s3_answer_is_given_up_and_retried(s3, s3_pool, no_cached_shards):
    """A connection that goes quiet fails after botocore's read_timeout (deepstrf sets 30 s, the
    caller's value wins) and the read is retried, instead of waiting on it for minutes."""
    url, options = s3_pool
    quick = {**options, "config_kwargs": {**options.get("config_kwargs", {}), "read_timeout": 0.5}}
    s = StreamingNeuralDataset(url, storage_options=quick, batch_size=4, prefetch=1, read_threads=1)
    fault = s3.stall("/responses/values/c/", seconds=20, times=1)
    started = time.monotonic()
    try:
        keys = [k for b in s for k in batch_keys(b)]
    finally:
        s3.clear_faults()
    assert fault.hits == 1 and time.monotonic() - started < 15
    assert len(keys) == len(set(keys)) == len(open_dataset(url, storage_options=options))


def test_s3_permanent_failure_is_a_clear_error(s3, s3_pool, no_s3fs_retries, no_cached_shards):
    url, options = s3_pool
    s = StreamingNeuralDataset(url, storage_options=options, batch_size=4, retry=FAST, shuffle=False)
    s3.fail("aa2/responses/values/c/0", status=403, times=None)
    try:
        with pytest.raises(StreamReadError, match=r"responses of stims \[\d+(, \d+)*\] from s3://stream-test/pool "
                                                  r"failed \(permanent error\).*s3://stream-test/aa2"):
            list(s)
    finally:
        s3.clear_faults()


def test_workers_fetch_each_s3_shard_once_between_them_and_across_epochs(s3_pool, monkeypatch):
    url, options = s3_pool
    requests = {}
    for workers in (0, 2):
        monkeypatch.setattr(shards, "SHARD_CACHE", shards.ShardCache(1 << 30))  # forked workers start empty
        s = StreamingNeuralDataset(url, storage_options=options, batch_size=2, retry=FAST)
        assert len([k for b in s.loader(num_workers=workers) for k in batch_keys(b)]) == len(s.dataset())
        requests[workers] = s.stats()["requests"]
    assert requests[2] == requests[0]  # a shard one worker fetched, the other read from the shared directory
    s.set_epoch(1)  # new worker processes, empty memory caches: the directory outlives them
    assert len([k for b in s.loader(num_workers=2) for k in batch_keys(b)]) == len(s.dataset())
    assert s.stats()["requests"] == 0


def test_the_shared_shard_directory_goes_with_the_dataset(local_pool):
    import gc

    from deepstrf.stream.dataset import _remove_owned_dir

    s = StreamingNeuralDataset(local_pool)
    path = s._shard_dir
    _remove_owned_dir(path, owner=-1)  # what a forked worker's copy of the finalizer does
    assert os.path.isdir(path)
    del s
    gc.collect()
    assert not os.path.exists(path)


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StreamReadError, match="store .*nowhere") as err:
        len(StreamingNeuralDataset(str(tmp_path / "nowhere"), retry=FAST))
    assert str(err.value).count("Check") == 1  # the store's own advice, not a generic one besides


def test_counters_are_storage_requests_and_stored_bytes(s3, s3_pool):
    """With a store URL, ``requests`` and ``bytes_fetched`` are what went over the wire."""
    url, options = s3_pool
    s = StreamingNeuralDataset(url, storage_options=options, batch_size=4, shuffle=False, retry=FAST)
    s.dataset()  # open first: opening is not counted
    before = s3.requests
    batches = list(s)
    served = s3.requests - before
    stats = s.stats()
    assert stats["batches"] == len(batches)
    assert 0 < stats["requests"] <= served  # every counted request reached the server
    assert 0 < stats["bytes_fetched"] < stats["bytes_used"]  # compressed on the wire, decoded in batches


def test_counters_for_a_local_store(local_pool):
    # one batch: every stored object is read once (smaller batches each read the whole chunks they
    # touch, and this pool's float32 stimuli barely compress, so the margin would be a few percent)
    s = StreamingNeuralDataset(local_pool, batch_size=16, shuffle=False)
    list(s)
    stats = s.stats()
    assert stats["requests"] > 0 and 0 < stats["bytes_fetched"] < stats["bytes_used"]


@pytest.mark.parametrize("neurons", [None, [7, 2, 5, 1]])
def test_worker_batches_are_built_in_shared_memory(local_pool, neurons):
    """In a worker, every tensor of a batch is allocated in shared memory (decoded straight into it
    when rows need no reordering) or, small, marked to travel inside the pickle: handing it to the
    main process copies nothing into shared memory."""
    s = StreamingNeuralDataset(local_pool, shuffle=False, batch_size=4, neurons=neurons)
    ref = s.dataset()
    n = min(4, len(ref))
    batch = s._read_batch(np.arange(n), s._buffer_pool(shared=True))
    tensors = [getattr(batch, k) for k in batch.keys() if k != "stim_meta"]
    assert all(t.is_shared() or handover.sent_by_value(t.untyped_storage()) for t in tensors)
    assert any(not t.is_shared() for t in tensors)  # the index arrays
    assert compact_equal(batch, compact_collate([ref[i] for i in range(n)], neuron_index=ref.selected_neurons()))


def test_url_is_opened_at_construction_and_reused_by_forked_workers(local_pool, monkeypatch):
    with pytest.raises(StreamReadError, match="nowhere"):
        StreamingNeuralDataset(local_pool + "-nowhere", retry=FAST)  # a bad URL fails at once
    s = StreamingNeuralDataset(local_pool, batch_size=4, shuffle=False)
    opened = s.dataset()
    monkeypatch.setattr("deepstrf.store.open_dataset", lambda *a, **k: pytest.fail("reopened"))
    s._opened.pid = -1  # as seen from a forked worker: same objects, another process
    assert s.dataset() is opened  # the parent's dataset (and its index) is reused...
    assert s._opened.pid == os.getpid()  # ...with this process's thread pool and counters
    assert compact_equal(next(iter(s)), compact_collate([opened[i] for i in range(4)],
                                                        neuron_index=opened.selected_neurons()))


def test_shard_indexes_survive_rebinding_in_another_process(local_pool):
    reader = open_dataset(local_pool).responses.sources[1].responses.handle.dataset().responses.reader
    reader.read_rows([0])
    requests = reader.io_counters()[0]
    reader.read_rows([0])
    per_read = reader.io_counters()[0] - requests  # data only: the shard index is cached
    sharded = reader._handles.sharded
    reader._handles = dataclasses.replace(reader._handles, pid=-1)  # as seen from a forked worker
    assert reader.sharded()["responses/values"].indexes.keys() == sharded["responses/values"].indexes.keys()
    reader.read_rows([0])
    assert reader._handles.pid == os.getpid()
    assert reader.io_counters()[0] == per_read  # data only: neither the group's metadata nor a shard index


def test_s3_open_learns_the_shard_layout(s3_pool):
    """Opening reads each data array's first shard index, so forked workers know at once that
    shards are fetched whole (small shards on an object store)."""
    url, options = s3_pool
    s = StreamingNeuralDataset(url, storage_options=options)
    arrays = [a for r in source_readers(s.dataset()) for a in r.sharded().values()]
    assert arrays and all(a.whole is True and 0 in a.indexes for a in arrays)


def test_open_reads_the_pools_stim_metadata_for_forked_workers_to_inherit(s3_pool):
    """Every batch carries its items' metadata rows: the pool's table is read once, at open (with the
    indexes), not by every worker before its first batch."""
    url, options = s3_pool
    s = StreamingNeuralDataset(url, storage_options=options, batch_size=4, shuffle=False)
    table = s.dataset().stim_meta
    assert table._columns is not None  # loaded
    expected = [table[i] for i in range(len(table))]

    def read_again():
        raise AssertionError("the stim metadata table was read again")
    table._load = read_again  # forked workers inherit this: a worker reading the table fails its pass
    got = [m for batch in s.loader(num_workers=2, timeout=loader_timeout(2), multiprocessing_context="fork")
           for m in batch.stim_meta]
    assert got == expected


def test_reading_defaults_follow_where_the_store_is(local_pool, s3_pool):
    """Local reads are CPU work: one reading thread, and the main process reads while workers
    start. Over a network two threads overlap round trips, and no lead: the main process's first
    reads would wait on round trips that the workers' first batches then wait behind."""
    url, options = s3_pool
    local = StreamingNeuralDataset(local_pool, batch_size=2)
    remote = StreamingNeuralDataset(url, storage_options=options, batch_size=2)
    assert local._state().read_threads == 1 and remote._state().read_threads == 2
    assert StreamingNeuralDataset(local_pool, batch_size=2, read_threads=3)._state().read_threads == 3
    assert local.loader(num_workers=2).read_while_starting
    assert not remote.loader(num_workers=2).read_while_starting


def test_workers_read_with_one_thread_each_where_two_would_oversubscribe_the_cores(s3_pool, monkeypatch):
    from deepstrf.stream import dataset as stream_dataset

    url, options = s3_pool
    remote = StreamingNeuralDataset(url, storage_options=options, batch_size=2)
    monkeypatch.setattr(stream_dataset, "get_worker_info", lambda: types.SimpleNamespace(id=0, num_workers=2))
    monkeypatch.setattr(stream_dataset, "usable_cpus", lambda: 2)
    assert remote._read_threads(remote=True) == 1
    monkeypatch.setattr(stream_dataset, "usable_cpus", lambda: 4)
    assert remote._read_threads(remote=True) == 2
    assert StreamingNeuralDataset(url, storage_options=options, batch_size=2, read_threads=3)._read_threads(True) == 3


def test_workers_decode_in_a_share_of_the_cores_each(local_pool, monkeypatch, tmp_path):
    from deepstrf.forksafe import usable_cpus

    calls = tmp_path / "calls"
    monkeypatch.setattr(shards, "set_decode_threads",  # forked workers inherit this
                        lambda n: calls.open("a").write(f"{n}\n"))
    s = StreamingNeuralDataset(local_pool, batch_size=2)
    assert sum(len(b.stim_meta) for b in s.loader(num_workers=2, timeout=loader_timeout(2),
                                                   multiprocessing_context="fork")) == len(s._state().visible)
    assert calls.read_text().split() == [str(max(1, usable_cpus() // 2))] * 2
    monkeypatch.undo()
    try:
        shards.set_decode_threads(1)
        assert shards._decode_pool()._max_workers == 1
    finally:
        shards.set_decode_threads(None)
    assert shards._decode_pool()._max_workers == usable_cpus()

def test_a_worker_fetches_the_shards_of_each_batch_after_the_second_as_it_takes_it(monkeypatch):
    from deepstrf.stream import dataset as stream_dataset

    warmed = []
    monkeypatch.setattr(stream_dataset, "warm_reads", lambda ds, stims: warmed.append(stims))
    st = types.SimpleNamespace(ds=None, visible=np.arange(100, 120))
    tasks = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5]), np.array([6, 7])]
    taken = []
    for positions in StreamingNeuralDataset._warming(st, iter(tasks)):
        taken.append(positions)
        stream_dataset.kept_pool("deepstrf-warm", 1).submit(lambda: None).result()  # warms so far are done
        assert len(warmed) == max(0, len(taken) - 2)
    assert [t.tolist() for t in taken] == [t.tolist() for t in tasks]
    assert warmed == [[104, 105], [106, 107]]


def test_loader_keeps_its_workers_over_a_network_by_default(s3_pool):
    """New workers over S3 start with empty shard caches: the loader keeps them across epochs there."""
    url, options = s3_pool
    s = StreamingNeuralDataset(url, storage_options=options, batch_size=3, seed=1, retry=FAST)
    loader = s.loader(num_workers=2, timeout=loader_timeout(2))
    assert loader.persistent_workers
    assert not s.loader(num_workers=2, persistent_workers=False).persistent_workers
    _the_same_workers_read_two_epochs(loader, open_dataset(url, storage_options=options))


def _the_same_workers_read_two_epochs(loader, ref) -> None:
    """Two epochs of ``loader`` each hold every item of ``ref`` once, read by the same processes."""
    expected = Counter(item_key(ref[i]) for i in range(len(ref)))
    first = Counter(k for b in loader for k in batch_keys(b))
    workers = list(loader._iterator._workers)
    second = Counter(k for b in loader for k in batch_keys(b))
    assert first == expected and second == expected
    assert list(loader._iterator._workers) == workers  # the same processes read the second epoch


def test_loader_keeps_its_workers_and_restarts_them_when_the_dataset_changes(local_pool):
    """A new worker maps and zeroes its buffers again: the loader keeps its workers across epochs by
    default. They hold a copy of the dataset, so a changed setting brings new ones, which read with it."""
    s = StreamingNeuralDataset(local_pool, batch_size=3, seed=1)
    loader = s.loader(num_workers=2, timeout=loader_timeout(2))
    assert loader.persistent_workers
    _the_same_workers_read_two_epochs(loader, open_dataset(local_pool))
    kept = [w.pid for w in loader._iterator._workers]
    s.shuffle = False
    got = [k for b in loader for k in batch_keys(b)]
    assert not set(kept) & {w.pid for w in loader._iterator._workers}
    assert got == [k for b in StreamingNeuralDataset(local_pool, batch_size=3, shuffle=False) for k in batch_keys(b)]
    restarted = [w.pid for w in loader._iterator._workers]
    assert len(list(loader)) == len(s) and [w.pid for w in loader._iterator._workers] == restarted


def test_loader_keeps_workers_that_build_dense_batches(local_pool):
    """A new worker building dense batches maps and zeroes its large buffers (about 1 GB on a pool of
    two AA-sized sources) again: the loader keeps them across epochs."""
    s = StreamingNeuralDataset(local_pool, batch_size=3, collate="dense", seed=2)
    loader = s.loader(num_workers=2, timeout=loader_timeout(2))
    assert loader.persistent_workers
    assert not s.loader(num_workers=2, persistent_workers=False).persistent_workers
    _the_same_workers_read_two_epochs(loader, open_dataset(local_pool))


def test_s3_reads_leave_botocore_checksums_to_the_chunks_own(s3_pool, monkeypatch, no_cached_shards):
    """botocore does not compute the CRC32 of what deepstrf reads (each chunk carries its CRC32C,
    checked on decoding) unless the caller asks for it; the objects do carry one."""
    import botocore.httpchecksum

    url, options = s3_pool
    checksummed = Counter()
    for name in ("Crc32Checksum", "CrtCrc32Checksum"):  # the latter where awscrt is installed
        kind = getattr(botocore.httpchecksum, name)
        monkeypatch.setattr(kind, "update", lambda self, chunk, update=kind.update:
                            (checksummed.update([len(chunk)]), update(self, chunk))[1])
    assert len(list(StreamingNeuralDataset(url, storage_options=options, batch_size=4))) > 0
    assert not checksummed
    asked = {**options, "config_kwargs": {**options.get("config_kwargs", {}),
                                          "response_checksum_validation": "when_supported"}}
    assert len(list(StreamingNeuralDataset(url, storage_options=asked, batch_size=4))) > 0
    assert checksummed


def test_stores_opened_with_the_same_options_share_one_s3_client_per_process(s3_pool):
    """A pool and its sources read through one S3 client of the process, whichever thread opens
    them (fsspec caches instances per thread); other options get their own; a forked process
    makes its own (a client belongs to its process's event loop)."""
    from concurrent.futures import ThreadPoolExecutor

    from deepstrf.store.location import Location

    url, options = s3_pool
    bucket = url.rsplit("/", 1)[0]
    fs = Location.parse(url, options).zarr_store().fs
    with ThreadPoolExecutor(2) as pool:
        others = list(pool.map(lambda u: Location.parse(u, options).zarr_store().fs,
                               [f"{bucket}/aa1", f"{bucket}/aa2"]))
    assert all(other is fs for other in others)
    assert Location.parse(url, {**options, "max_concurrency": 2}).zarr_store().fs is not fs
    ctx = __import__("multiprocessing").get_context("fork")
    with ctx.Pool(1) as child:
        assert child.apply(_client_in_child, (id(fs), url, options)) == "own, shared"


def _client_in_child(parent_fs_id: int, url: str, options: dict) -> str:
    from deepstrf.store.location import Location

    fs = Location.parse(url, options).zarr_store().fs
    own = "own" if id(fs) != parent_fs_id else "the parent's"
    return f"{own}, {'shared' if Location.parse(url, options).zarr_store().fs is fs else 'not shared'}"


def test_the_tls_context_is_built_once_and_forked_workers_inherit_it(s3_pool, monkeypatch, no_cached_shards):
    """Loading the CA bundle costs ~20 ms of CPU per client: one process tree loads it once."""
    import torch
    from aiobotocore.httpsession import AIOHTTPSession

    from deepstrf.store import s3clients

    builds = torch.zeros(1, dtype=torch.int64).share_memory_()  # counted in forked workers too
    build = AIOHTTPSession._build_ssl_contexts

    def counted(self, proxy_url):
        builds.add_(1)
        return build(self, proxy_url)

    monkeypatch.setattr(AIOHTTPSession, "_build_ssl_contexts", counted)
    monkeypatch.setattr(s3clients, "_TLS_CONTEXTS", {})
    url, options = s3_pool
    fresh = {**options, "config_kwargs": {**options.get("config_kwargs", {}), "connect_timeout": 9}}  # new clients
    s = StreamingNeuralDataset(url, storage_options=fresh, batch_size=4)
    # forked (this process runs the S3 server's threads: the rule would pick forkserver)
    loader = s.loader(num_workers=2, persistent_workers=False, timeout=loader_timeout(2),
                      multiprocessing_context="fork")
    assert sum(len(b["stim_meta"]) for b in loader) == len(open_dataset(url, storage_options=options))
    assert s.stats()["requests"] > 0  # the workers made clients of their own
    assert int(builds) == 1


def test_the_shared_tls_session_class_pickles_by_name():
    from deepstrf.store.s3clients import SharedTLSSession

    assert pickle.loads(pickle.dumps(SharedTLSSession)) is SharedTLSSession


def test_workers_stuck_opening_the_dataset_are_reported_as_such(s3, s3_pool, no_cached_shards):
    """A store that stops answering while the workers open the dataset (read its sources' shard
    indexes) stops them before their pass: the report says so, not "before any read"."""
    from deepstrf.errors import StreamStalledError

    url, options = s3_pool
    s = StreamingNeuralDataset(url, storage_options=options, batch_size=4)
    s3.stall("/responses/values/c/", seconds=6, times=None)
    try:
        with pytest.raises(StreamStalledError) as stalled:
            for _ in s.loader(num_workers=2, timeout=3, multiprocessing_context="forkserver"):
                pass
    finally:
        s3.clear_faults()
    message = str(stalled.value)
    assert "it is opening the dataset (reading its stores' indexes)" in message, message
    assert "before any read" not in message


def test_a_source_missing_a_shard_at_open_is_named(s3, s3_pool, no_s3fs_retries, no_cached_shards):
    url, options = s3_pool
    s3.fail("aa2/responses/values/c/0", status=404, times=None)
    try:
        with pytest.raises(StreamReadError, match=r"reading store s3://stream-test/pool failed \(permanent error\): "
                                                  r".*s3://stream-test/aa2: .*shard index of responses/values") as e:
            StreamingNeuralDataset(url, storage_options=options, batch_size=4, retry=FAST)
    finally:
        s3.clear_faults()
    assert "deepstrf verify s3://stream-test/aa2" in str(e.value)
