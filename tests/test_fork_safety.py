"""Fork safety: no deepstrf thread straddles a fork, and forked workers survive a busy trainer.

The stress tests reproduce what hung DataLoader workers before: a trainer whose other threads
run torch BLAS (matmul, conv) while workers are forked, and an in-process pass left unfinished
(its read-ahead threads still reading) when the next loader forks its workers.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from deepstrf import forksafe
from deepstrf.stream import StreamingNeuralDataset
from deepstrf.testing.trainer import busy_blas_threads

from stream_helpers import batch_keys, item_key, small_pool, write_pool

EPOCHS = 50
LOADER_TIMEOUT_S = 20


def _child_exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_fork_waits_for_running_tasks_and_holds_new_ones():
    started, release = threading.Event(), threading.Event()
    order: list[str] = []

    def task():
        started.set()
        release.wait(10)
        order.append("task done")

    t = threading.Thread(target=forksafe.run_gated, args=(task,))
    t.start()
    assert started.wait(10) and forksafe.GATE.running() == 1
    threading.Timer(0.3, release.set).start()
    pid = os.fork()
    if pid == 0:  # the child: no task of the parent counts here, new ones run at once
        code = 0 if forksafe.GATE.running() == 0 and forksafe.run_gated(lambda: 7) == 7 else 1
        os._exit(code)
    order.append("forked")
    assert _child_exit_code(pid) == 0
    t.join(10)
    assert order == ["task done", "forked"]  # the fork happened only once the task had finished


def test_a_task_waiting_for_a_task_it_submitted_does_not_block_a_fork():
    """A batch read waits for its stimulus read, submitted to another pool: a fork that held new
    tasks back as soon as it started waiting would deadlock with them."""
    from concurrent.futures import ThreadPoolExecutor

    inner_pool = ThreadPoolExecutor(1)
    outer_started = threading.Event()

    def outer():
        outer_started.set()
        time.sleep(0.2)  # the fork starts waiting now
        return inner_pool.submit(forksafe.run_gated, lambda: "inner").result(timeout=10)

    with ThreadPoolExecutor(1) as outer_pool:
        fut = outer_pool.submit(forksafe.run_gated, outer)
        assert outer_started.wait(10)
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        assert _child_exit_code(pid) == 0
        assert fut.result(timeout=10) == "inner"
        assert time.monotonic() - start < 5
    inner_pool.shutdown()


def test_a_task_that_forks_does_not_wait_for_itself():
    def fork_inside():
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        return _child_exit_code(pid)

    start = time.monotonic()
    assert forksafe.run_gated(fork_inside) == 0
    assert time.monotonic() - start < 5


def test_a_stuck_task_delays_a_fork_only_so_long_and_warns(monkeypatch):
    monkeypatch.setattr(forksafe, "FORK_WAIT_SECONDS", 0.3)
    release = threading.Event()
    t = threading.Thread(target=forksafe.run_gated, args=(lambda: release.wait(10),))
    t.start()
    while forksafe.GATE.running() == 0:
        time.sleep(0.01)
    try:
        # the warning says where the busy thread is
        where = r"Where they are: thread .*test_fork_safety.py:\d+ <lambda>"
        with pytest.warns(RuntimeWarning, match=r"forkserver.*" + where):
            pid = os.fork()
            if pid == 0:
                os._exit(0)
        assert _child_exit_code(pid) == 0
    finally:
        release.set()
        t.join(10)


def test_thread_map_keeps_order_and_runs_gated():
    seen = []

    def f(x):
        seen.append(forksafe.GATE.running())
        return x * x

    assert forksafe.thread_map(f, range(6), max_workers=3) == [x * x for x in range(6)]
    assert all(n >= 1 for n in seen)


# -- stress: a busy trainer forking workers --------------------------------------------------
def _stress(stream: StreamingNeuralDataset, expected: list[str]) -> None:
    for epoch in range(EPOCHS):
        stop = threading.Event()
        threads = busy_blas_threads(stop)
        try:
            unfinished = iter(stream)  # a pass broken off: its read-ahead threads are still reading
            next(unfinished)
            stream.set_epoch(epoch)
            loader = DataLoader(stream, batch_size=None, num_workers=2, timeout=LOADER_TIMEOUT_S,
                                multiprocessing_context="fork")
            keys = [k for b in loader for k in batch_keys(b)]
            assert sorted(keys) == expected, f"epoch {epoch}"
            del unfinished
        finally:
            stop.set()
            for t in threads:
                t.join(10)


@pytest.fixture
def short_fork_wait(monkeypatch):
    """A fork that waits for a busy read gives up (and warns, saying where the read is) within
    this test's time limit: the workers must then still deliver every item."""
    monkeypatch.setattr(forksafe, "FORK_WAIT_SECONDS", 15.0)


def test_forked_workers_of_an_in_memory_pool_survive_a_busy_trainer(short_fork_wait):
    pool = small_pool()
    _stress(StreamingNeuralDataset(pool, batch_size=3, seed=1, prefetch=4, read_threads=2),
            sorted(item_key(pool[i]) for i in range(len(pool))))


def test_forked_workers_of_a_store_pool_survive_a_busy_trainer(tmp_path, short_fork_wait):
    url = write_pool(str(tmp_path))
    pool = small_pool()
    _stress(StreamingNeuralDataset(url, batch_size=3, seed=1, prefetch=4),
            sorted(item_key(pool[i]) for i in range(len(pool))))


BLAS_OPS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::matmul", "aten::convolution",
            "aten::_convolution", "aten::mkldnn_convolution", "aten::dot", "aten::mv", "aten::addmv"}


class _OpLog(TorchDispatchMode):
    """Records the aten operators torch runs while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_the_op_log_sees_blas():
    with _OpLog() as log:
        torch.nn.functional.conv1d(torch.rand(1, 2, 9), torch.rand(3, 2, 4))
        torch.rand(4, 4) @ torch.rand(4, 4)
    assert {"aten::convolution", "aten::mm"} <= log.ops


def test_worker_read_path_makes_no_torch_blas_call():
    """What a worker runs to read synthetic data (rates from receptive fields), smoothed responses
    and batches makes no torch BLAS call: torch's MKL is what a fork can copy half-way. (The op
    log is thread-local, so the read path is called here, in this thread.)"""
    from deepstrf.datasets import views
    from deepstrf.datasets.synthetic import SyntheticAudioDataset
    from deepstrf.utils.data import compact_collate, neural_collate

    ds = SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.02, seed=1)
    ds.smooth_responses(window_ms=5.0)
    with _OpLog() as log:
        ds.true_rate(1)
        rows = views.read_raw_rows(ds.responses, [1, 2])
        items = [ds[0], ds[1]]
        compact_collate(items)
        neural_collate(items)
    assert sum(r.values.size for r in rows) > 0 and "aten::add_" in log.ops  # smoothing ran here
    assert not log.ops & BLAS_OPS


def test_a_task_that_forks_goes_on_in_the_child():
    def fork_inside():
        return os.fork()

    pid = forksafe.run_gated(fork_inside)
    if pid == 0:  # the child finishes the task with a fresh gate, which counts nothing
        os._exit(0 if forksafe.GATE.running() == 0 and forksafe.run_gated(lambda: 1) == 1 else 1)
    assert _child_exit_code(pid) == 0 and forksafe.GATE.running() == 0


DEADLOCK_SCRIPT = '''
import gc, os, sys, threading, time, weakref
from deepstrf.forksafe import where_threads_are
from deepstrf.stream.main_module import _main_line

def release_the_gil():  # as a streaming dataset's finalizer does (it removes its directory)
    os.lstat("/")

class Garbage:
    def __init__(self):
        self.me = self
        weakref.finalize(self, release_the_gil)

stop = False
def churn():  # threads starting and ending need CPython's lock on the list of threads
    while not stop:
        t = threading.Thread(target=lambda: None)
        t.start()
        t.join()

churners = [threading.Thread(target=churn) for _ in range(2)]
for t in churners:
    t.start()
gc.set_threshold(50)
main = sys.modules["__main__"]
deadline = time.monotonic() + 3
while time.monotonic() < deadline:
    for _ in range(30):
        Garbage()
    LOOK
stop = True
for t in churners:
    t.join()
gc.collect()
print("done")
'''


def test_looking_at_threads_frames_never_deadlocks_with_a_collection():
    """sys._current_frames() holds CPython's lock on the list of threads while it builds its dict; a
    collection there ran a finalizer that released the GIL, and a thread that took the GIL then
    waited for that lock: the test suite hung in StreamingNeuralDataset() (checking the script's
    __main__ guard). Without the fix this script hangs within a second or two."""
    import subprocess
    import sys

    for look in ("_main_line(main)", "where_threads_are([threading.main_thread().ident])"):
        script = DEADLOCK_SCRIPT.replace("LOOK", look)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and done.stdout.strip() == "done", (look, done.stderr[-2000:])
