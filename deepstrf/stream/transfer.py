"""How a dataset object reaches DataLoader workers that are not forked.

A forkserver or spawn worker receives the dataset pickled by multiprocessing,
where torch moves every tensor into shared memory and sends one file
descriptor per tensor storage; the forkserver accepts at most 256 descriptors
per new process. An in-memory deepSTRF dataset keeps one tensor per stimulus
and per (stim, neuron) cell, so one of a few dozen stimuli already exceeds
that ("ValueError: too many fds"). Such a dataset is sent by value instead
(its bytes in the pickle: each worker holds a copy); one with fewer tensors
keeps the shared-memory path (no copy).

Objects plain pickle cannot send are sent with cloudpickle, by value: a lambda
(``smooth_responses`` records one), or a function or class defined in a
``__main__`` that a worker does not import (``python -c``, IPython, a Jupyter
cell, a script the workers must not run again:
:func:`~deepstrf.stream.main_module.main_not_rerun`), which plain pickle
would send by a name the worker cannot resolve.
"""

from __future__ import annotations

import io
import pickle
from multiprocessing.context import get_spawning_popen
from typing import Any

import torch
import torch.multiprocessing

from .main_module import workers_import_main

# descriptors left for the dataset's tensors: the forkserver's 256, less what the process object,
# the streaming dataset's own shared tables and the DataLoader's queues need
MAX_SHARED_TENSORS = 200


class _TensorCounter(pickle.Pickler):
    """Walks an object as pickle would, collecting its tensors (``found``) instead of writing their
    data and noting references to ``__main__`` (``uses_main``)."""

    def __init__(self) -> None:
        super().__init__(io.BytesIO(), protocol=pickle.HIGHEST_PROTOCOL)
        self.found: list[torch.Tensor | torch.UntypedStorage | torch.TypedStorage] = []
        self.uses_main = False

    @property
    def tensors(self) -> int:
        return len(self.found)

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, (torch.Tensor, torch.UntypedStorage, torch.TypedStorage)):
            self.found.append(obj)
            return self.tensors
        return None

    def by_descriptors(self) -> bool:
        """Whether torch would send the walked object's tensors as shared-memory descriptors."""
        return not (torch.multiprocessing.get_sharing_strategy() == "file_descriptor"
                    and self.tensors > MAX_SHARED_TENSORS)

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, type) or callable(obj) and hasattr(obj, "__qualname__"):
            self.uses_main = self.uses_main or getattr(obj, "__module__", None) == "__main__"
        return NotImplemented


def count_tensors(obj: Any) -> int:
    """Tensors and storages that pickling ``obj`` would send (each once per reference)."""
    counter = _TensorCounter()
    counter.dump(obj)
    return counter.tensors


class _ByValue:
    """An object pickled with the plain pickler (or cloudpickle): tensors travel as bytes, not
    descriptors."""

    def __init__(self, obj: Any, cloud: bool = False) -> None:
        if cloud:
            import cloudpickle

            self.blob = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        else:
            self.blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)

    def __reduce__(self) -> tuple:
        return pickle.loads, (self.blob,)  # cloudpickle's output loads with plain pickle


def _walk(obj: Any) -> tuple[_TensorCounter, str]:
    """``obj`` walked, and how a started process receives it: ``"cloudpickle"`` (by value, plain
    pickle cannot send it or its ``__main__`` cannot be imported there), ``"value"`` (too many
    tensors for descriptors) or ``"descriptors"`` (torch shares its tensors' memory)."""
    counter = _TensorCounter()
    try:
        counter.dump(obj)
    except (pickle.PicklingError, AttributeError, TypeError):
        return counter, "cloudpickle"  # a lambda or a local function, say
    if counter.uses_main and not workers_import_main():
        return counter, "cloudpickle"
    return counter, "descriptors" if counter.by_descriptors() else "value"


def for_new_process(obj: Any) -> Any:
    """``obj`` as it should be pickled now: when it is being sent to a process that is started
    (not forked), by value if it holds more tensors than descriptors can carry, with cloudpickle
    if plain pickle cannot send it (see module docstring); else itself."""
    if get_spawning_popen() is None:
        return obj
    way = _walk(obj)[1]
    return obj if way == "descriptors" else _ByValue(obj, cloud=way == "cloudpickle")


class UserCallable:
    """A callable of the user's given to the DataLoader (``worker_init_fn``, ``collate_fn``), sent
    to a started worker as :func:`for_new_process` sends the dataset: by value where the worker
    cannot find it by name (defined in a ``__main__`` the worker does not import)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __reduce__(self) -> tuple:
        return UserCallable, (for_new_process(self.fn),)


def share_before_sending(obj: Any) -> None:
    """Move the CPU tensors that pickling ``obj`` for a started worker would share into shared
    memory now, in the calling thread.

    Pickling does that move itself (torch's reductions): it copies each storage into shared
    memory, swaps the copy in and frees the old memory. A thread of this process that reads one
    of those tensors meanwhile (the main process reads a pass's first batches while another thread
    starts the workers, :mod:`deepstrf.stream.lead`), or any numpy view taken before, would read
    freed memory: garbage, or a crash.
    """
    counter, way = _walk(obj)
    if way == "descriptors":
        for tensor in counter.found:
            if tensor.device.type == "cpu" and not tensor.is_shared():
                tensor.share_memory_()
