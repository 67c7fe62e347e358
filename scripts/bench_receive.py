#!/usr/bin/env python
"""What reading a received batch costs the main process; prints ONE JSON line.

    python scripts/bench_receive.py [--workers 0,2] [--epochs 3] [--repeat 2]
                                    [--scale 1] [--time-scale 1] [--workdir DIR]

The AA1+AA2-sized synthetic pool of ``scripts/bench_stream.py`` (built once
under ``--workdir``), compact batches of 8, ``loader(num_workers=K,
persistent_workers=True)`` for K > 0. The consumer copies every batch's tensors
once into a private buffer of the main process (the first thing moving a batch
to a device or pinning it does) and times only that copy: without workers the
batch was built in this process's own memory; with workers it was built in a
worker's shared memory and is read through this process's mapping of it, whose
pages fault in on first touch. Runs alternate the worker counts ``--repeat``
times in this process.

Reported per worker count (its run with the median read cost), by epoch:
``read_ms_per_gib`` (wall time: on a machine with fewer cores than busy
processes it includes time the consumer waits for a core),
``read_cpu_ms_per_gib`` (the consumer thread's CPU time), ``read_faults``
(page faults taken during the copies),
``read_bytes`` and ``items_per_s``; ``ratios``: the read cost with the most
workers over no workers, wall and CPU, in the first epoch and after it (the
median of the later epochs).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

BATCH = 8
# the copying thread's own page faults where the OS counts them per thread
RUSAGE = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)


class Sink:
    """A private buffer the consumer copies into, grown (and its pages mapped) outside the timed copy."""

    def __init__(self) -> None:
        self.buffer = torch.zeros(0, dtype=torch.uint8)

    def take(self, nbytes: int) -> torch.Tensor:
        if self.buffer.numel() < nbytes:
            self.buffer = torch.zeros(2 * nbytes, dtype=torch.uint8)
        return self.buffer[:nbytes]


def read_epoch(loader, sink: Sink) -> dict:
    """One pass, copying every tensor of every batch into ``sink``: the copy's cost per GiB (wall
    and this thread's CPU time), the page faults it took, and the pass's items/s."""
    read_s, cpu_s, nbytes, faults, items = 0.0, 0.0, 0, 0, 0
    start = time.perf_counter()
    for batch in loader:
        for key in batch.keys():
            tensor = batch[key]
            if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
                continue
            flat = tensor.reshape(-1).view(torch.uint8)
            into = sink.take(flat.numel())
            f0 = resource.getrusage(RUSAGE).ru_minflt
            t0, c0 = time.perf_counter(), time.thread_time()
            into.copy_(flat)
            read_s += time.perf_counter() - t0
            cpu_s += time.thread_time() - c0
            faults += resource.getrusage(RUSAGE).ru_minflt - f0
            nbytes += flat.numel()
        items += len(batch["stim_meta"])
    per_gib = (1 << 30) * 1e3 / max(nbytes, 1)
    return {"read_ms_per_gib": round(read_s * per_gib, 1), "read_cpu_ms_per_gib": round(cpu_s * per_gib, 1),
            "read_faults": faults,
            "items_per_s": round(items / (time.perf_counter() - start), 1), "read_bytes": nbytes}


def run(pool_url: str, workers: int, epochs: int, sink: Sink) -> dict:
    from deepstrf.stream import StreamingNeuralDataset

    ds = StreamingNeuralDataset(pool_url, batch_size=BATCH, collate="compact", shuffle=True, seed=0)
    kept = {"persistent_workers": True, "timeout": 600} if workers else {}
    loader = ds.loader(num_workers=workers, **kept)
    runs = [read_epoch(loader, sink) for _ in range(epochs)]
    del loader  # persistent workers exit
    return {key: [r[key] for r in runs] for key in runs[0]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="0,2", help="comma-separated worker counts")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeat", type=int, default=2, help="runs of every worker count, alternating")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "deepstrf-bench"))
    args = p.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_stream import build_stores

    torch.set_num_threads(1)  # the copy in one thread, as the DataLoader's pin thread or a .to() makes it
    pool_url, _, _ = build_stores(Path(args.workdir), args.scale, args.time_scale)
    counts = [int(w) for w in args.workers.split(",")]
    sink = Sink()
    results: dict[int, list[dict]] = {k: [] for k in counts}
    for _ in range(args.repeat):
        for k in counts:
            results[k].append(run(pool_url, k, args.epochs, sink))

    def median_run(runs: list[dict]) -> dict:
        order = sorted(runs, key=lambda r: statistics.median(r["read_ms_per_gib"]))
        return order[len(order) // 2]

    out: dict = {"bench": "receive", "scale": args.scale, "time_scale": args.time_scale, "batch": BATCH,
                 "epochs": args.epochs, "repeat": args.repeat}
    for k in counts:
        out[f"w{k}"] = median_run(results[k])
    most, fewest = f"w{max(counts)}", f"w{min(counts)}"
    if most != fewest:
        out["ratios"] = {}
        for key, name in (("read_ms_per_gib", "read"), ("read_cpu_ms_per_gib", "read_cpu")):
            first = out[most][key][0] / out[fewest][key][0]
            out["ratios"][f"{name}_{most}_over_{fewest}_first_epoch"] = round(first, 2)
            if args.epochs > 1:
                later = statistics.median(out[most][key][1:]) / statistics.median(out[fewest][key][1:])
                out["ratios"][f"{name}_{most}_over_{fewest}_later_epochs"] = round(later, 2)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
