#!/usr/bin/env python
"""Fork-safety stress: how often do DataLoader workers hang when a busy trainer starts them?

    python scripts/stress_fork.py [--epochs 100] [--start-method fork|forkserver|rule] [--trainer-threads 3]
                                  [--timeout 20]

Every epoch, over an in-memory synthetic pool and over the same pool as local Zarr stores:
``--trainer-threads`` threads of this process run torch matmul/conv (MKL) while an in-process
pass is left unfinished (its read-ahead threads still reading) and a ``DataLoader(num_workers=2)``
starts its workers with the given start method; ``rule`` is ``stream.loader(num_workers=2)``,
which chooses one itself (``methods`` counts what it chose). An epoch whose loader times out is a
hang; the loader is then shut down (its workers killed) and the next epoch starts. Prints ONE
JSON line with the hang counts.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections import Counter

from torch.utils.data import DataLoader

from deepstrf import concat_neural_datasets, open_dataset, save_dataset
from deepstrf.datasets.synthetic import SyntheticAudioDataset
from deepstrf.errors import StreamStalledError
from deepstrf.stream import StreamingNeuralDataset
from deepstrf.stream.workers import context_method
from deepstrf.testing.trainer import busy_blas_threads


def small_pool():
    return (SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.02, seed=1)
            + SyntheticAudioDataset("aa2", scale=0.1, time_scale=0.02, seed=2))


def store_pool(root: str) -> str:
    sources = small_pool().responses.sources
    for d in sources:
        save_dataset(d, f"{root}/{d.name.lower()}", progress=False)
    opened = [open_dataset(f"{root}/{d.name.lower()}") for d in sources]
    concat_neural_datasets(opened, names=[d.name for d in sources], store=f"{root}/pool")
    return f"{root}/pool"


def count_hangs(stream: StreamingNeuralDataset, epochs: int, method: str, timeout: float, trainer_threads: int) -> dict:
    hangs, start, methods = [], time.perf_counter(), Counter()
    for epoch in range(epochs):
        stop = threading.Event()
        threads = busy_blas_threads(stop, trainer_threads) if trainer_threads else []
        unfinished = iter(stream)
        next(unfinished)
        stream.set_epoch(epoch)
        if method == "rule":
            loader = stream.loader(num_workers=2, timeout=timeout)
        else:
            loader = DataLoader(stream, batch_size=None, num_workers=2, timeout=timeout, multiprocessing_context=method)
        batches = iter(loader)
        methods[context_method(loader.multiprocessing_context)] += 1
        try:
            for _ in batches:
                pass
        except (RuntimeError, StreamStalledError):
            hangs.append(epoch)
        finally:
            del batches, unfinished
            stop.set()
            for t in threads:
                t.join()
    return {"epochs": epochs, "hangs": len(hangs), "hung_epochs": hangs, "methods": dict(methods),
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--start-method", default="fork")
    p.add_argument("--trainer-threads", type=int, default=3, help="threads of torch BLAS running meanwhile")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds without a batch that count as a hang")
    args = p.parse_args()
    out = {"bench": "stress_fork", "start_method": args.start_method, "trainer_threads": args.trainer_threads}
    with tempfile.TemporaryDirectory() as root:
        for name, source in (("memory", small_pool()), ("store", store_pool(root))):
            stream = StreamingNeuralDataset(source, batch_size=3, seed=1, prefetch=4, read_threads=2)
            out[name] = count_hangs(stream, args.epochs, args.start_method, args.timeout, args.trainer_threads)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
