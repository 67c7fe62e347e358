"""Retries, permanent failures, the row cache and prefetch bounds, on in-memory data."""

import errno
import re
import warnings

import numpy as np
import pytest

from deepstrf.datasets.views import ResponseGrid
from deepstrf.stream import RetryPolicy, StreamingNeuralDataset, StreamReadError
from deepstrf.stream.cache import RowCache
from deepstrf.stream.prefetch import Prefetcher
from deepstrf.stream.retry import TransientError, is_transient

from stream_helpers import batch_keys, item_key, items_equal, small_pool

FAST = RetryPolicy(attempts=4, base_delay=0.001, max_delay=0.01)


class _Flaky(ResponseGrid):
    """Wraps a grid; the first ``fail`` batched reads raise ``error``."""

    def __init__(self, inner, error, fail):
        super().__init__(inner.n_stims, inner.n_neurons)
        self.inner, self.error, self.fail, self.calls = inner, error, fail, 0

    def read_raw_rows(self, stims, neurons=None):
        self.calls += 1
        if self.calls <= self.fail:
            raise self.error
        return self.inner.read_raw_rows(stims, neurons)

    def _read_row(self, s, neurons):
        return self.inner.row(s, neurons)

    def _mask(self):
        return self.inner.mask()


def _flaky_pool(error, fail):
    pool = small_pool()
    pool.responses = _Flaky(pool.responses, error, fail)
    return pool


class _HTTPError(Exception):
    def __init__(self, status):
        super().__init__(f"HTTP {status}")
        self.status = status


@pytest.mark.parametrize("exc,transient", [
    (TimeoutError("read timed out"), True), (ConnectionResetError(), True),
    (OSError(errno.ECONNRESET, "reset"), True), (_HTTPError(503), True), (_HTTPError(429), True),
    (OSError("SlowDown: please reduce your request rate"), True), (TransientError("x"), True),
    (FileNotFoundError("no such key"), False), (PermissionError("denied"), False), (_HTTPError(404), False),
    (ValueError("corrupt chunk"), False),
])
def test_classification(exc, transient):
    assert is_transient(exc) is transient


def test_cause_chain_is_followed():
    try:
        try:
            raise TimeoutError("socket")
        except TimeoutError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert is_transient(outer)


def test_transient_failures_are_survived():
    pool = _flaky_pool(TimeoutError("simulated timeout"), fail=3)
    s = StreamingNeuralDataset(pool, batch_size=4, retry=FAST)
    keys = [k for b in s for k in batch_keys(b)]
    assert sorted(keys) == sorted(item_key(pool[i]) for i in range(len(pool)))
    assert s.stats()["retries"] == 3


def test_permanent_failure_is_a_clear_error():
    pool = _flaky_pool(FileNotFoundError("chunk responses/values/c/17 not found"), fail=1)
    s = StreamingNeuralDataset(pool, batch_size=4, retry=FAST, shuffle=False, prefetch=1, read_threads=1)
    with pytest.raises(StreamReadError, match=r"responses of stims \[0, 1, 2, 3\].*permanent.*c/17"):
        list(s)
    assert pool.responses.calls == 1  # not retried


def test_retry_budget_exhausted():
    pool = _flaky_pool(TimeoutError("simulated timeout"), fail=100)
    s = StreamingNeuralDataset(pool, batch_size=4, retry=FAST)
    with pytest.raises(StreamReadError, match="transient error persisted after 4 attempts"):
        list(s)


def test_row_cache_is_not_used_for_data_in_memory(tmp_path):
    """Rows of an in-memory dataset have no stable description (its cells can change in place,
    under the same path): caching them could serve one dataset another's rows."""
    from toydata import ToyAudio

    raw, smoothed = ToyAudio(seed=3, S=6, N=5), ToyAudio(seed=3, S=6, N=5)
    smoothed.smooth_responses()  # in place, same path as raw
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for ds in (raw, smoothed):
            got = list(StreamingNeuralDataset(ds, shuffle=False, cache_dir=tmp_path))
            assert all(items_equal(item, ds[i]) for i, item in enumerate(got))
    assert not list(tmp_path.iterdir())
    said = [str(w.message) for w in caught if "cache_dir" in str(w.message)]
    assert len(said) == 2 and re.search(r"is not used for toy-audio-3.*data in memory", said[0])


def test_row_cache_is_bounded(tmp_path):
    pool = small_pool()
    rows = pool.responses.read_raw_rows(list(range(pool.get_S())))
    cache = RowCache(tmp_path, max_bytes=20_000, namespace="x", neurons=None)
    for row in rows:
        cache.put(row)
        assert cache.size() <= 20_000
    assert cache.get(rows[-1].stim) is not None  # the most recent entry survives
    assert cache.get(rows[0].stim) is None


def test_cached_rows_own_their_memory(tmp_path):
    """A row read back from the cache is writable memory of its own: items built on it may be edited."""
    pool = small_pool()
    row = pool.responses.read_raw_rows([0])[0]
    cache = RowCache(tmp_path, max_bytes=1 << 20, namespace="x", neurons=None)
    cache.put(row)
    got = cache.get(row.stim)
    assert got.values.flags.writeable and np.array_equal(got.values, row.values)


def test_prefetch_bound_and_order():
    fetch = Prefetcher(lambda x: x * 2, depth=3, threads=2)
    assert list(fetch.map(range(50))) == [2 * x for x in range(50)]
    assert fetch.max_outstanding <= 3


def test_a_failed_batch_leaves_no_stimulus_read_behind():
    """When a batch's responses fail, its stimulus read (running alongside) is finished before
    the error is raised: nothing of the failed pass reads on in the background."""
    import threading
    import time

    from toydata import ToyAudio

    from deepstrf.datasets.views import LazySequence

    class SlowStims(LazySequence):
        def __init__(self, stims):
            super().__init__(len(stims))
            self.stims, self.done = stims, threading.Event()

        def _get(self, i):
            time.sleep(0.3)
            self.done.set()
            return self.stims[i]

    class Broken(Exception):
        pass

    ds = ToyAudio(seed=2, S=4, N=3)
    ds.stims = SlowStims(list(ds.stims))
    s = StreamingNeuralDataset(ds, batch_size=2, shuffle=False, prefetch=1,
                               retry=RetryPolicy(attempts=1))

    def fail(*args, **kwargs):
        raise Broken("responses unreadable")

    s._read_rows = fail
    with pytest.raises(Exception, match="responses unreadable"):
        next(iter(s))
    assert ds.stims.done.is_set()  # the stimulus read had finished when the error came out
