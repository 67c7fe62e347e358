"""How a dataset object reaches DataLoader workers that are not forked.

A forkserver or spawn worker receives the dataset pickled by multiprocessing,
where torch moves every tensor into shared memory and sends one file
descriptor per tensor storage; the forkserver accepts at most 256 descriptors
per new process. An in-memory deepSTRF dataset keeps one tensor per stimulus
and per (stim, neuron) cell, so one of a few dozen stimuli already exceeds
that ("ValueError: too many fds"). Such a dataset is sent by value instead
(its bytes in the pickle: each worker holds a copy); one with fewer tensors
keeps the shared-memory path (no copy).
"""

from __future__ import annotations

import io
import pickle
from multiprocessing.context import get_spawning_popen
from typing import Any

import torch
import torch.multiprocessing

# descriptors left for the dataset's tensors: the forkserver's 256, less what the process object,
# the streaming dataset's own shared tables and the DataLoader's queues need
MAX_SHARED_TENSORS = 200


class _TensorCounter(pickle.Pickler):
    """Walks an object as pickle would, counting its tensors instead of writing their data."""

    def __init__(self) -> None:
        super().__init__(io.BytesIO(), protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors = 0

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, (torch.Tensor, torch.UntypedStorage, torch.TypedStorage)):
            self.tensors += 1
            return self.tensors
        return None


def count_tensors(obj: Any) -> int:
    """Tensors and storages that pickling ``obj`` would send (each once per reference)."""
    counter = _TensorCounter()
    counter.dump(obj)
    return counter.tensors


class _ByValue:
    """An object pickled with the plain pickler: tensors travel as bytes, not descriptors."""

    def __init__(self, obj: Any) -> None:
        self.blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)

    def __reduce__(self) -> tuple:
        return pickle.loads, (self.blob,)


def for_new_process(obj: Any) -> Any:
    """``obj`` as it should be pickled now: by value when it is being sent to a process that is
    started (not forked) and holds more tensors than descriptors can carry; else itself."""
    if get_spawning_popen() is None or torch.multiprocessing.get_sharing_strategy() != "file_descriptor":
        return obj
    return _ByValue(obj) if count_tensors(obj) > MAX_SHARED_TENSORS else obj
