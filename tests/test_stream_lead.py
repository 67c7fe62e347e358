"""``StreamingDataLoader`` reads a pass's first batches in the main process while its workers start
(:mod:`deepstrf.stream.lead`): same batches, same order, same use of the global RNG, a stuck read
reported, and workers of other DataLoaders unaffected."""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch.utils.data import DataLoader

from deepstrf.datasets.views import LazySequence
from deepstrf.errors import StreamStalledError
from deepstrf.stream import StreamingNeuralDataset
from deepstrf.stream.loader import StreamingDataLoader
from deepstrf.stream.workers import worker_context

from stream_helpers import LOADER_TIMEOUT_S, batch_keys
from toydata import ToyAudio


class Paced(LazySequence):
    """Stimuli that take ``read_s`` each to read (stim ``stuck``: ``stuck_s``), and ``start_s`` to
    arrive in a worker process (unpickling them there): a worker slow to begin its pass."""

    def __init__(self, stims: list, read_s: float = 0.0, start_s: float = 0.0, stuck: int = -1,
                 stuck_s: float = 0.0) -> None:
        super().__init__(len(stims))
        self.stims, self.read_s, self.start_s, self.stuck, self.stuck_s = stims, read_s, start_s, stuck, stuck_s
        self.made_in = os.getpid()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if os.getpid() != self.made_in:
            time.sleep(self.start_s)

    def _get(self, i: int):
        time.sleep(self.stuck_s if i == self.stuck else self.read_s)
        return self.stims[i]


def paced_toy(S: int = 24, **kw) -> ToyAudio:
    ds = ToyAudio(seed=3, S=S, N=4)
    ds.stims = Paced(list(ds.stims), **kw)
    return ds


def in_process_keys(S: int, epoch: int = 0, **kw) -> list[str]:
    s = StreamingNeuralDataset(ToyAudio(seed=3, S=S, N=4), **kw)
    s.set_epoch(epoch)
    return [k for b in s for k in batch_keys(b)]


def test_main_process_reads_until_a_worker_begins_and_the_order_is_kept():
    # 12 batches of 2 stims, ~0.5 s each in the main process (two reading threads): 6 s for the
    # whole pass, while the workers begin within 3 s (the worker server's start included)
    s = StreamingNeuralDataset(paced_toy(read_s=0.5, start_s=0.5), batch_size=2, seed=7)
    loader = s.loader(num_workers=2, timeout=LOADER_TIMEOUT_S)
    keys = [k for b in loader for k in batch_keys(b)]
    assert keys == in_process_keys(24, batch_size=2, seed=7)
    assert 0 < loader.lead_batches < 12
    assert s.epoch == 1 and s.state_dict()["consumed"] == 0


def _marked(batch):
    return ("collated", batch_keys(batch))


def test_the_users_collate_fn_applies_to_the_batches_the_main_process_reads():
    s = StreamingNeuralDataset(paced_toy(S=6, start_s=2.0), batch_size=2, seed=1)
    loader = s.loader(num_workers=2, timeout=LOADER_TIMEOUT_S, collate_fn=_marked)
    got = list(loader)
    assert loader.lead_batches > 0 and all(b[0] == "collated" for b in got)
    assert [k for b in got for k in b[1]] == in_process_keys(6, batch_size=2, seed=1)


def test_main_process_reads_the_whole_pass_when_the_workers_are_late():
    s = StreamingNeuralDataset(paced_toy(S=6, start_s=2.0), batch_size=2, seed=1)
    loader = s.loader(num_workers=2, timeout=LOADER_TIMEOUT_S, persistent_workers=True)
    assert [k for b in loader for k in batch_keys(b)] == in_process_keys(6, batch_size=2, seed=1)
    assert loader.lead_batches == 3
    # later passes of persistent workers: the main process reads until one of them begins again
    for epoch in (1, 2):
        assert [k for b in loader for k in batch_keys(b)] == in_process_keys(6, epoch, batch_size=2, seed=1)
        assert 0 <= loader.lead_batches <= 3
    assert s.epoch == 3


def test_other_dataloaders_read_their_whole_share_after_a_pass_with_a_lead():
    s = StreamingNeuralDataset(paced_toy(S=8, start_s=1.0), batch_size=2, seed=2)
    first = [k for b in s.loader(num_workers=2, timeout=LOADER_TIMEOUT_S) for k in batch_keys(b)]
    plain = DataLoader(s, batch_size=None, num_workers=2, timeout=LOADER_TIMEOUT_S,
                       multiprocessing_context=worker_context())
    second = [k for b in plain for k in batch_keys(b)]
    assert first == in_process_keys(8, batch_size=2, seed=2)
    assert second == in_process_keys(8, epoch=1, batch_size=2, seed=2)


def test_resume_after_batches_read_by_the_main_process():
    s = StreamingNeuralDataset(paced_toy(start_s=1.0), batch_size=2, seed=4)
    loader = s.loader(num_workers=2, timeout=LOADER_TIMEOUT_S)
    seen = []
    for i, b in enumerate(loader):
        seen += batch_keys(b)
        if i == 1:
            break
    assert loader.lead_batches == 2
    t = StreamingNeuralDataset(ToyAudio(seed=3, S=24, N=4), batch_size=2, seed=4)
    t.load_state_dict(s.state_dict())
    assert seen + [k for b in t for k in batch_keys(b)] == in_process_keys(24, batch_size=2, seed=4)


def test_the_workers_seed_is_drawn_in_the_consumers_thread(monkeypatch):
    """As by a plain DataLoader, one draw from the global generator when the pass starts, before
    the first batch, however late the thread starting the workers is: a seeded run stays
    reproducible whatever the consumer draws meanwhile."""
    start_workers = StreamingDataLoader._start_workers

    def late(self, *args):
        time.sleep(0.5)
        return start_workers(self, *args)

    monkeypatch.setattr(StreamingDataLoader, "_start_workers", late)
    torch.manual_seed(0)
    torch.empty((), dtype=torch.int64).random_()
    after_one_draw = torch.get_rng_state()
    torch.manual_seed(0)
    s = StreamingNeuralDataset(ToyAudio(seed=3, S=8, N=4), batch_size=2)
    loader = s.loader(num_workers=2, timeout=LOADER_TIMEOUT_S)
    batches = iter(loader)
    first = next(batches)
    assert torch.equal(torch.get_rng_state(), after_one_draw) and loader.lead_batches == 1
    assert len(batch_keys(first)) + sum(len(batch_keys(b)) for b in batches) == 8


def test_a_stuck_read_in_the_main_process_is_reported():
    s = StreamingNeuralDataset(paced_toy(S=8, start_s=2.0, stuck=1, stuck_s=3.0), batch_size=2, shuffle=False)
    start = time.monotonic()
    with pytest.raises(StreamStalledError) as err:
        list(s.loader(num_workers=2, timeout=1))
    msg = str(err.value)
    assert "main process waited 1 s for its read of stims [0, 1]" in msg and "read_while_starting=False" in msg
    assert time.monotonic() - start < 30


def test_a_stuck_read_without_workers_is_reported_at_the_loader_timeout():
    # torch refuses a DataLoader timeout without workers: loader() bounds this process's reads with it
    toy = paced_toy(S=8, stuck=4, stuck_s=4.0)
    loader = StreamingNeuralDataset(toy, batch_size=2, shuffle=False).loader(num_workers=0, timeout=2)
    start = time.monotonic()
    with pytest.raises(StreamStalledError, match=r"a read of stims \[4, 5\] took longer than 2 s"):
        list(loader)
    assert time.monotonic() - start < 4
    toy.stims.stuck = -1
    time.sleep(max(0.0, start + 4.5 - time.monotonic()))  # the stuck read ends in its thread
    assert len([k for b in loader for k in batch_keys(b)]) == 8


def test_no_lead_with_forked_workers_or_when_turned_off():
    for kw in ({"multiprocessing_context": "fork"}, {"read_while_starting": False}):
        s = StreamingNeuralDataset(ToyAudio(seed=3, S=8, N=4), batch_size=2, seed=5)
        loader = s.loader(num_workers=2, timeout=LOADER_TIMEOUT_S, **kw)
        assert [k for b in loader for k in batch_keys(b)] == in_process_keys(8, batch_size=2, seed=5)
        assert loader.lead_batches == 0


def test_dense_batches_have_no_lead_unless_asked():
    """A dense batch is hundreds of MB on a real pool: the main process's would add to the workers'."""
    toy = ToyAudio(seed=3, S=8, N=4)
    assert StreamingNeuralDataset(toy, batch_size=2).loader(num_workers=2).read_while_starting
    dense = StreamingNeuralDataset(toy, batch_size=2, collate="dense", seed=6)
    assert not dense.loader(num_workers=2).read_while_starting
    loader = dense.loader(num_workers=2, timeout=LOADER_TIMEOUT_S, read_while_starting=True)
    assert [k for b in loader for k in batch_keys(b)] == in_process_keys(8, batch_size=2, seed=6)


@pytest.mark.parametrize("kw", [{}, {"multiprocessing_context": "fork"}], ids=["lead", "forked"])
def test_the_pass_after_one_left_early_waits_for_kept_workers_still_reading(kw):
    """Kept workers finish the reads of a pass the consumer left (torch drains them when the next
    pass starts): seconds, not the DataLoader's one-second check interval; the next pass is whole."""
    s = StreamingNeuralDataset(paced_toy(S=8, stuck=7, stuck_s=2.0), batch_size=2, shuffle=False)
    loader = s.loader(num_workers=2, timeout=LOADER_TIMEOUT_S, **kw)
    whole = in_process_keys(8, batch_size=2, shuffle=False)
    assert [k for b in loader for k in batch_keys(b)] == whole  # the workers are started and kept
    for _ in loader:  # they begin a pass at once, and one is in the 2 s read of stim 7 when the consumer leaves
        break
    assert [k for b in loader for k in batch_keys(b)] == whole


class StopInTheLoop(Exception):
    """Raised in a pass as Ctrl-C's KeyboardInterrupt would be (pytest stops on a real one)."""


def test_a_start_that_fails_after_the_consumer_left_raises_nothing(monkeypatch):
    def failing(self, *args):
        time.sleep(0.3)
        raise RuntimeError("the workers could not start")

    monkeypatch.setattr(StreamingDataLoader, "_start_workers", failing)
    s = StreamingNeuralDataset(ToyAudio(seed=3, S=8, N=4), batch_size=2)
    loader = s.loader(num_workers=2, timeout=LOADER_TIMEOUT_S)
    batches = iter(loader)
    next(batches)  # read by the main process
    batches.close()  # no one left to report the failure to

    def interrupted(self, timeout):  # Ctrl-C's KeyboardInterrupt, raised in the main process's read
        time.sleep(0.5)  # the start fails meanwhile
        raise StopInTheLoop
        yield

    monkeypatch.setattr(StreamingNeuralDataset, "_lead_batches", interrupted)
    with pytest.raises(StopInTheLoop):  # the error raised in the pass, not the start's
        list(loader)
    monkeypatch.undo()
    monkeypatch.setattr(StreamingDataLoader, "_start_workers", failing)
    with pytest.raises(RuntimeError, match="could not start"):  # a consumer still there hears of it
        list(loader)


def test_leaving_a_pass_does_not_wait_for_kept_workers_finishing_an_earlier_one():
    s = StreamingNeuralDataset(paced_toy(S=8, stuck=7, stuck_s=3.0), batch_size=2, shuffle=False)
    loader = s.loader(num_workers=2, timeout=LOADER_TIMEOUT_S)
    whole = in_process_keys(8, batch_size=2, shuffle=False)
    assert [k for b in loader for k in batch_keys(b)] == whole
    for i, _ in enumerate(loader):
        if i == 1:
            break  # worker 1 goes on to stim 7's 3 s read
    start = time.monotonic()
    for _ in loader:  # its first batch comes from the main process (the lead) while the workers finish
        break
    assert time.monotonic() - start < 1.5
    assert [k for b in loader for k in batch_keys(b)] == whole


@pytest.mark.parametrize("workers", [0, 2])
def test_a_new_pass_ends_one_still_open(workers):
    s = StreamingNeuralDataset(ToyAudio(seed=3, S=8, N=4), batch_size=2, seed=6)
    loader = s.loader(num_workers=workers, timeout=LOADER_TIMEOUT_S if workers else 0)
    peek = iter(loader)
    next(peek)
    assert [k for b in loader for k in batch_keys(b)] == in_process_keys(8, batch_size=2, seed=6)
    with pytest.raises(RuntimeError, match="ended when a new pass of it began"):
        next(peek)
    assert [k for b in loader for k in batch_keys(b)] == in_process_keys(8, epoch=1, batch_size=2, seed=6)


def test_kept_workers_stuck_in_a_pass_left_early_are_reported_when_the_next_begins():
    s = StreamingNeuralDataset(paced_toy(S=8, stuck=7, stuck_s=10.0), batch_size=2, shuffle=False)
    loader = s.loader(num_workers=2, timeout=2, multiprocessing_context="fork")
    for i, _ in enumerate(loader):  # a batch of each worker: both began the pass
        if i == 1:
            break  # worker 1 goes on to batch 3, and stim 7's read
    start = time.monotonic()
    with pytest.raises(StreamStalledError, match="no batch for 2 s") as err:
        next(iter(loader))
    msg = str(err.value)
    assert "reading stims [6, 7]" in msg and "of the pass before (which the consumer left early)" in msg
    assert "stuck in start-up" not in msg and time.monotonic() - start < 9
    assert loader._iterator is None  # stopped: the next pass starts new workers


def test_the_workers_take_over_the_pass_after_a_peek():
    """A peek (``next(iter(loader))``) leaves the first pass during its lead, while new workers
    start: the next pass is the workers' again, not read whole by the main process."""
    s = StreamingNeuralDataset(paced_toy(S=24, read_s=0.3), batch_size=2, seed=8)
    loader = s.loader(num_workers=2, timeout=LOADER_TIMEOUT_S)
    next(iter(loader))
    assert [k for b in loader for k in batch_keys(b)] == in_process_keys(24, batch_size=2, seed=8)
    assert loader.lead_batches < 12


@pytest.mark.parametrize("workers", [0, 2])
def test_a_pass_stopped_after_its_last_batch_still_moves_on_to_the_next_epoch(workers):
    """A trainer that takes ``len(loader)`` batches and never asks for more (Lightning) gets the
    next epoch's order next time, not the same one again."""
    import itertools

    s = StreamingNeuralDataset(ToyAudio(seed=3, S=8, N=4), batch_size=2, seed=9)
    loader = s.loader(num_workers=workers, timeout=LOADER_TIMEOUT_S if workers else 0)
    for epoch in range(3):
        got = [k for b in itertools.islice(loader, len(loader)) for k in batch_keys(b)]
        assert got == in_process_keys(8, epoch=epoch, batch_size=2, seed=9)
