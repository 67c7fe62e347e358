"""DataLoader workers started by ``loader()``: the safe default start method, and a stuck or dead
worker reported by name with what it was reading, instead of a silent wait."""

from __future__ import annotations

import gc
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from deepstrf.datasets.views import LazySequence
from deepstrf.errors import StreamStalledError
from deepstrf.stream import StreamReadError, StreamingNeuralDataset
from deepstrf.stream.dataset import begun
from deepstrf.stream.transfer import MAX_SHARED_TENSORS, count_tensors, for_new_process
from deepstrf.store import open_dataset, save_dataset
from deepstrf.stream import workers
from deepstrf.stream.workers import DEFAULT_TIMEOUT_S, context_method, worker_context

from stream_helpers import LOADER_TIMEOUT_S, batch_keys, item_key, small_pool, write_pool
from toydata import ToyAudio


class SlowStims(LazySequence):
    """A dataset's stimuli whose stim ``slow`` takes ``seconds`` to read (or kills the reader)."""

    def __init__(self, stims: list, slow: int, seconds: float = 0.0, die: bool = False) -> None:
        super().__init__(len(stims))
        self.stims, self.slow, self.seconds, self.die = stims, slow, seconds, die

    def _get(self, i: int):
        if i == self.slow:
            if self.die:
                os._exit(3)
            time.sleep(self.seconds)
        return self.stims[i]


class StimsThatBreak(LazySequence):
    """A dataset's stimuli whose every read raises once the file ``flag`` exists (kept workers, which
    hold their own copy of the dataset, see it appear)."""

    def __init__(self, stims: list, flag: str) -> None:
        super().__init__(len(stims))
        self.stims, self.flag = stims, flag

    def _get(self, i: int):
        if os.path.exists(self.flag):
            raise ValueError(f"stim {i} cannot be read now")
        return self.stims[i]


def toy_with_slow_stim(**kw) -> ToyAudio:
    ds = ToyAudio(seed=1, S=8, N=3)
    ds.stims = SlowStims(list(ds.stims), slow=5, **kw)
    return ds


def test_workers_that_run_user_code_are_not_forked():
    ctx = worker_context()
    assert context_method(ctx) in ("forkserver", "spawn")
    # a dataset object: its class and transforms are the user's code
    loader = StreamingNeuralDataset(small_pool(), batch_size=4).loader(num_workers=2)
    assert context_method(loader.multiprocessing_context) == context_method(ctx)
    assert loader.stall_timeout == DEFAULT_TIMEOUT_S and 0 < loader.timeout <= loader.stall_timeout


def test_workers_of_a_store_url_are_forked_unless_a_thread_of_the_users_runs(tmp_path, monkeypatch):
    url = write_pool(str(tmp_path / "stores"))
    monkeypatch.setattr(workers, "foreign_threads", lambda: [])  # whatever earlier tests left running
    loader = StreamingNeuralDataset(url, batch_size=4).loader(num_workers=2)
    assert context_method(loader.multiprocessing_context) == "fork"
    assert context_method(StreamingNeuralDataset(url, batch_size=4).loader(
        num_workers=2, worker_init_fn=print).multiprocessing_context) != "fork"
    monkeypatch.undo()
    stop = threading.Event()
    trainer = threading.Thread(target=stop.wait, name="my-trainer-thread")
    trainer.start()
    try:
        assert "my-trainer-thread" in workers.foreign_threads()
        assert workers.start_method(runs_user_code=False) in ("forkserver", "spawn")
        # chosen again at every start: the thread is alive now
        keys = [k for b in loader for k in batch_keys(b)]
        assert context_method(loader.multiprocessing_context) in ("forkserver", "spawn")
    finally:
        stop.set()
        trainer.join()
    assert len(keys) == len(open_dataset(url))


def test_forkserver_workers_read_every_item_once():
    pool = small_pool()
    s = StreamingNeuralDataset(pool, batch_size=3, seed=2)
    keys = [k for b in s.loader(num_workers=2) for k in batch_keys(b)]
    assert sorted(keys) == sorted(item_key(pool[i]) for i in range(len(pool)))
    assert s.epoch == 1


def test_a_lambda_selection_reaches_workers_that_are_not_forked():
    pool = small_pool()
    s = StreamingNeuralDataset(pool, batch_size=4, select=lambda d: d.select_pop_by_nrn_attr("dataset", "AA1"))
    keys = [k for b in s.loader(num_workers=2) for k in batch_keys(b)]
    pool.select_pop_by_nrn_attr("dataset", "AA1")
    assert sorted(keys) == sorted(item_key(pool[i]) for i in range(len(pool)))
    assert len(keys) < len(small_pool())


def test_an_in_memory_dataset_of_many_tensors_reaches_workers_that_are_not_forked():
    """deepSTRF keeps one tensor per stim and per cell: 80 stims x 4 neurons are 400 tensors, more
    than the forkserver passes as shared-memory descriptors; such a dataset is sent by value."""
    ds = ToyAudio(seed=3, S=80, N=4)
    assert count_tensors(ds) == 80 + 80 * 4 > MAX_SHARED_TENSORS
    assert for_new_process(ds) is ds  # outside the start of a process: untouched
    s = StreamingNeuralDataset(ds, batch_size=4, seed=1)
    keys = [k for b in s.loader(num_workers=2, timeout=LOADER_TIMEOUT_S) for k in batch_keys(b)]
    s.set_epoch(0)
    assert keys == [k for b in s for k in batch_keys(b)]


class SlowToSend:
    """Takes half a second to pickle: the workers start no sooner, so the main process reads."""

    def __reduce__(self) -> tuple:
        time.sleep(0.5)
        return SlowToSend, ()


class SharedAtRead(LazySequence):
    """Stimuli computed from a weight tensor through a numpy view, noting (in the reading process)
    whether the tensor's memory was already shared when the view was taken."""

    def __init__(self, stims: list) -> None:
        super().__init__(len(stims))
        self.slow = SlowToSend()  # pickled before the weight
        self.stims = stims
        self.weight = torch.ones(64)
        self.shared_at_read: list[bool] = []

    def _get(self, i: int):
        self.shared_at_read.append(self.weight.is_shared())
        view = self.weight.numpy()  # dangles if the storage is moved while it is in use
        return self.stims[i] * float(view.mean())


def test_tensors_of_a_dataset_object_are_shared_before_the_main_process_reads_beside_a_worker_start():
    """Pickling for started workers moves tensors into shared memory and frees the old memory: the
    main process's first batches, read meanwhile, must never hold a view of memory about to move."""
    ds = ToyAudio(seed=2, S=12, N=3)
    ds.stims = SharedAtRead(list(ds.stims))
    loader = StreamingNeuralDataset(ds, batch_size=2, seed=0).loader(num_workers=2, timeout=LOADER_TIMEOUT_S,
                                                                     read_while_starting=True)
    assert context_method(loader.multiprocessing_context) != "fork"
    assert len([b for b in loader]) == 6
    assert loader.lead_batches >= 1 and ds.stims.shared_at_read and all(ds.stims.shared_at_read)


class FreezeCounts(LazySequence):
    """Stimuli filled with the reading process's count of objects frozen out of the collector."""

    def __init__(self, stims: list) -> None:
        super().__init__(len(stims))
        self.stims = stims

    def _get(self, i: int):
        return torch.full_like(self.stims[i], gc.get_freeze_count())


def test_workers_freeze_their_long_lived_objects_and_the_main_process_does_not():
    ds = ToyAudio(seed=1, S=8, N=3)
    ds.stims = FreezeCounts(list(ds.stims))
    before = gc.get_freeze_count()
    s = StreamingNeuralDataset(ds, batch_size=2)
    counts = [int(b.stims.flatten()[0]) for b in s.loader(num_workers=2, timeout=LOADER_TIMEOUT_S,
                                                          read_while_starting=False)]
    assert min(counts) > 10_000  # torch's objects at least
    assert gc.get_freeze_count() == before


def test_stuck_worker_is_named_with_what_it_reads():
    s = StreamingNeuralDataset(toy_with_slow_stim(seconds=60), batch_size=2, shuffle=False)
    start = time.monotonic()
    with pytest.raises(StreamStalledError) as err:
        for _ in s.loader(num_workers=2, timeout=3, read_while_starting=False):
            pass
    msg = str(err.value)
    assert time.monotonic() - start < 30  # the stuck worker was stopped, not waited for
    # stims 4 and 5 are batch 2, which worker 0 reads (batches go round-robin)
    assert "worker 0" in msg and "reading stims [4, 5]" in msg and "worker 1" in msg
    assert "timeout" in msg and "3 s" in msg


def test_dead_worker_is_reported_with_what_it_was_reading():
    s = StreamingNeuralDataset(toy_with_slow_stim(die=True), batch_size=2, shuffle=False)
    with pytest.raises(StreamStalledError) as err:
        list(s.loader(num_workers=2, timeout=20, read_while_starting=False))
    msg = str(err.value)
    assert "dead: exit code 3" in msg and "reading stims [4, 5]" in msg


def test_a_worker_reads_its_first_batch_as_it_starts_and_raises_its_error_with_the_batch():
    taken = []

    def share():
        taken.append("first read")
        yield "a"
        yield "b"

    started = begun(share())
    assert taken == ["first read"] and list(started) == ["a", "b"]
    assert list(begun(iter(()))) == []

    def broken():
        raise ValueError("unreadable")
        yield

    started = begun(broken())  # not raised here: torch would lose it
    with pytest.raises(ValueError, match="unreadable"):
        next(started)


def test_a_kept_worker_whose_read_fails_in_a_later_pass_reports_the_error(tmp_path):
    ds = ToyAudio(seed=1, S=8, N=3)
    flag = tmp_path / "broken"
    ds.stims = StimsThatBreak(list(ds.stims), str(flag))
    s = StreamingNeuralDataset(ds, batch_size=2, shuffle=False)
    loader = s.loader(num_workers=2, timeout=LOADER_TIMEOUT_S, read_while_starting=False)
    assert sum(len(batch_keys(b)) for b in loader) == len(ds)
    flag.touch()  # the kept workers' first reads of the next pass fail: the error, not a dead worker
    with pytest.raises(StreamReadError, match=r"stim \d+ cannot be read now"):
        list(loader)


def test_a_kept_worker_killed_between_passes_is_replaced_by_the_next_pass(tmp_path):
    # torch's SIGCHLD handler raises in the consumer's own code, where the loader cannot answer; the
    # next pass reused the workers and failed (or waited forever on half a batch in the pipe)
    s = StreamingNeuralDataset(write_pool(str(tmp_path)), batch_size=4, shuffle=False)
    loader = s.loader(num_workers=2, timeout=LOADER_TIMEOUT_S)
    whole = [k for b in loader for k in batch_keys(b)]
    victim = loader._iterator._workers[0]
    os.kill(victim.pid, signal.SIGKILL)
    try:
        victim.join(10)
        time.sleep(0.2)  # torch's handler raises here, as it would in a training step
    except RuntimeError as e:
        assert "killed by signal" in str(e)
    assert [k for b in loader for k in batch_keys(b)] == whole


def test_kept_forked_workers_leave_ctrl_c_to_the_main_process(tmp_path):
    # a terminal sends Ctrl-C to the whole process group: forked workers took it, left their loop,
    # and the next pass found them gone
    s = StreamingNeuralDataset(write_pool(str(tmp_path)), batch_size=4, shuffle=False)
    # forked (the rule forks them too, unless a thread an earlier test left is alive)
    loader = s.loader(num_workers=2, timeout=LOADER_TIMEOUT_S, multiprocessing_context="fork")
    whole = [k for b in loader for k in batch_keys(b)]
    workers_before = list(loader._iterator._workers)
    for w in workers_before:
        os.kill(w.pid, signal.SIGINT)
    time.sleep(0.5)
    assert all(w.is_alive() for w in workers_before)
    assert [k for b in loader for k in batch_keys(b)] == whole
    assert loader._iterator._workers == workers_before


def test_loader_after_a_stall_starts_new_workers():
    ds = toy_with_slow_stim(seconds=60)
    s = StreamingNeuralDataset(ds, batch_size=2, shuffle=False)
    loader = s.loader(num_workers=2, timeout=3, persistent_workers=True, read_while_starting=False)
    with pytest.raises(StreamStalledError):
        list(loader)
    ds.stims.seconds = 0.0  # the next pass pickles the dataset again, now fast
    s.load_state_dict({**s.state_dict(), "consumed": 0})
    assert sum(len(batch_keys(b)) for b in loader) == len(ds)


def test_persistent_workers_alive_at_exit_leak_nothing(tmp_path):
    """Persistent workers still running when the interpreter exits are stopped before
    multiprocessing kills them, so what they registered (numcodecs' blosc semaphore, made when a
    worker first decodes) is released, not reported as leaked by the resource tracker."""
    url = write_pool(str(tmp_path))
    script = tmp_path / "train.py"
    script.write_text(
        "import sys\n"
        "from deepstrf.stream import StreamingNeuralDataset\n"
        "if __name__ == '__main__':\n"
        "    ds = StreamingNeuralDataset(sys.argv[1], batch_size=4)\n"
        "    loader = ds.loader(num_workers=2, persistent_workers=True)\n"
        "    for epoch in range(2):\n"
        "        n = sum(len(b.stim_meta) for b in loader)\n"
        "    print(n)\n")  # the loader is still alive when the interpreter exits
    out = subprocess.run([sys.executable, str(script), url], capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == len(small_pool())
    assert "leaked" not in out.stderr and "resource_tracker" not in out.stderr, out.stderr


def _require_marker(worker_id: int) -> None:
    if os.environ.get("DEEPSTRF_TEST_MARKER") != "set-after-the-server":
        raise RuntimeError("the worker does not see the environment of the process that started it")


def test_forkserver_workers_see_the_environment_of_the_process_now(tmp_path, monkeypatch):
    """Credentials put in os.environ after the worker server started reach the workers."""
    url = write_pool(str(tmp_path / "stores"))
    worker_context()  # the server runs from here on, with the environment of now
    monkeypatch.setenv("DEEPSTRF_TEST_MARKER", "set-after-the-server")
    loader = StreamingNeuralDataset(url, batch_size=4).loader(num_workers=2, worker_init_fn=_require_marker,
                                                               timeout=LOADER_TIMEOUT_S)
    assert context_method(loader.multiprocessing_context) in ("forkserver", "spawn")
    assert len([k for b in loader for k in batch_keys(b)]) == len(open_dataset(url))


def _nothing(worker_id: int) -> None:
    """A worker_init_fn of the user's: with one, workers start through the forkserver."""


@pytest.mark.parametrize("published_before", [0, 1])
def test_workers_that_are_not_forked_read_the_version_the_dataset_opened(tmp_path, published_before):
    """A version published between building the stream and iterating it does not reach workers that
    open the URL themselves: they read the version the epoch was planned over (the store's first
    content, pinned by fingerprint, or a published version, by its group), not a mix."""
    url = str(tmp_path / "src")
    for seed in range(1 + published_before):
        save_dataset(ToyAudio(seed=seed, S=6), url, overwrite=seed > 0)
    s = StreamingNeuralDataset(url, batch_size=2, shuffle=False)
    save_dataset(ToyAudio(seed=9, S=4), url, overwrite=True)  # another lab publishes meanwhile
    loader = s.loader(num_workers=2, worker_init_fn=_nothing, read_while_starting=False, timeout=LOADER_TIMEOUT_S)
    assert context_method(loader.multiprocessing_context) in ("forkserver", "spawn")
    keys = [k for b in loader for k in batch_keys(b)]
    assert sorted(keys) == sorted(f"a{published_before}-s{i}" for i in range(6))


def test_a_copy_of_a_stream_opens_the_version_its_tag_named_when_it_was_built(tmp_path):
    url = str(tmp_path / "src")
    save_dataset(ToyAudio(seed=0, S=6), url, tag="curated")
    s = StreamingNeuralDataset(url, batch_size=2, open_options={"version": "curated"})
    save_dataset(ToyAudio(seed=1, S=6), url, overwrite=True, tag="curated")  # the tag moves on
    assert pickle.loads(pickle.dumps(s)).dataset().fingerprint == s.dataset().fingerprint


def test_queue_feeder_threads_of_a_finished_pass_do_not_count_as_the_users():
    """A DataLoader's index queues flush in a feeder thread for a moment after its pass; counted as a
    thread of the user's, it made the next epoch's workers start through the forkserver."""
    import multiprocessing

    queue = multiprocessing.get_context("fork").Queue()
    queue.put(1)  # starts the queue's feeder thread
    try:
        assert any(t.name.startswith("QueueFeederThread") for t in threading.enumerate())
        assert not any(name.startswith("QueueFeederThread") for name in workers.foreign_threads())
    finally:
        assert queue.get(timeout=5) == 1
        queue.close()
        queue.join_thread()


def test_temporary_directories_of_ended_processes_are_removed_by_the_next_one(tmp_path, monkeypatch):
    """A notebook kernel stopped by its front end, or a killed script, runs no exit handler: the
    shard directory of its streaming datasets (and its workers' error directory) stayed in /tmp."""
    import socket
    import tempfile

    from deepstrf.tempdirs import process_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    dead = int(ended.stdout)
    here = f"{socket.gethostname()}~{os.stat('/proc/self/ns/pid').st_ino}"
    left = [tmp_path / f"deepstrf-shards-{here}~{dead}~abc1", tmp_path / f"deepstrf-worker-errors-{here}~{dead}"]
    kept = [tmp_path / f"deepstrf-shards-{here}~{os.getppid()}~abc2",  # a live process's
            tmp_path / f"deepstrf-shards-otherhost~{here.split('~')[1]}~{dead}~abc3",  # another machine's
            tmp_path / f"deepstrf-shards-{socket.gethostname()}~1~{dead}~abc4"]  # another pid namespace's
    for folder in left + kept:
        folder.mkdir()
        (folder / "f").write_bytes(b"x")
    stream = StreamingNeuralDataset(ToyAudio(1), batch_size=2)
    assert [p.exists() for p in left[:1] + kept] == [False, True, True, True]
    assert os.path.dirname(stream._shard_dir) == str(tmp_path)
    assert os.path.basename(stream._shard_dir).startswith(f"deepstrf-shards-{here}~{os.getpid()}~")
    monkeypatch.setattr(workers, "_CLEANING", False)
    monkeypatch.setattr(workers, "atexit", type("NoExit", (), {"register": staticmethod(lambda *a, **k: None)}))
    workers._clean_errors_at_exit()
    assert not left[1].exists() and process_dir("worker-errors") == workers.errors_dir(os.getpid())
