#!/usr/bin/env python
"""Training throughput on a device, against what it trains with free data; prints ONE JSON line.

    python scripts/bench_gpu.py [--device cuda] [--scale 1] [--time-scale 1] [--workers 2,4,8]
                                [--epochs 3] [--channels 16,16] [--pin default|on|off] [--threads N]
                                [--only bound,memory,...] [--host-peak] [--workdir DIR]

The AA1+AA2-sized synthetic pool of ``scripts/bench_stream.py`` (built once
under ``--workdir``), the demo's ``PooledEncodingModel`` (channels (16, 16), or ``--channels``),
Adam, batch 8. Configurations, run one after the other in this process:

- ``bound``: the model trained on one epoch's compact batches kept on the
  device (what the device trains if data were free);
- ``memory``: the pool in RAM, ``DataLoader(batch_size=8, shuffle=True,
  collate_fn=neural_collate)``, dense batches moved to the device and trained
  with ``poisson_loss_dense`` (what a deepSTRF user does);
- ``loader_wK``: ``StreamingNeuralDataset(..., device=...).loader(num_workers=K)``
  alone, compact batches moved to the device, the consumer only counts items;
- ``compact_wK``: training on those streamed compact batches;
- ``dense_device_wK``: ``collate="dense"`` with ``device``: the workers send
  compact batches, the dense batch is built on the device, trained as ``memory``.

Each reports items/s (the median of the epochs after the first, which pays the
workers' start-up; the only epoch with ``--epochs 1``) and its fraction of the
bound; a streamed one also the workers' start method. Device work is waited for
at the end of every epoch, not per step. ``--host-peak`` runs ``bound`` (the
device process alone, the baseline) and ``compact`` and ``dense_device`` with
the most workers again, each in a child process whose peak host memory (the
summed PSS of it and its workers, sampled every 50 ms) is added as
``host_peak_pss_mib``; sampling slows them, so their speed is not reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

BATCH = 8
CONFIGS = ("bound", "memory", "loader", "compact", "dense_device")


def train_step(model, opt, batch, neurons) -> torch.Tensor:
    """One Adam step on a compact batch (per-cell loss) or a dense dict (masked dense loss)."""
    from deepstrf.datasets.collate import CompactBatch
    from deepstrf.models import poisson_loss_compact, poisson_loss_dense

    if isinstance(batch, CompactBatch):
        loss = poisson_loss_compact(model.predict(batch), batch)
    else:
        loss = poisson_loss_dense(model(batch["stims"], neurons), batch["responses"], batch["valid_mask"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def to_device(batch, device: torch.device):
    """A host batch on ``device`` (a dense dict's tensors, or a compact batch)."""
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch.to(device)


def timed_epochs(epochs: int, run_epoch, sync) -> dict:
    """``run_epoch()`` -> items, ``epochs`` times; items/s of each and the median after the first."""
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        items = run_epoch()
        sync()
        rates.append(items / (time.perf_counter() - start))
    later = rates[1:] or rates
    return {"items_per_s": round(statistics.median(later), 2), "epochs_items_per_s": [round(r, 2) for r in rates]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--workers", default="2,4,8", help="comma-separated worker counts")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--channels", default="16,16", help="the backbone's layer widths (the demo's: 16,16)")
    p.add_argument("--only", default=",".join(CONFIGS), help=f"comma-separated subset of {CONFIGS}")
    p.add_argument("--threads", type=int, default=0, help="torch threads of this process (default: torch's)")
    p.add_argument("--pin", choices=("default", "on", "off"), default="default",
                   help="pin_memory of the streamed configurations (default: loader()'s own choice)")
    p.add_argument("--host-peak", action="store_true",
                   help="also the peak host memory of compact and dense_device with the most workers")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "deepstrf-bench"))
    args = p.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_stream import build_stores, run_child
    from torch.utils.data import DataLoader

    from deepstrf import open_dataset
    from deepstrf.models import PooledEncodingModel
    from deepstrf.stream import StreamingNeuralDataset
    from deepstrf.stream.workers import context_method
    from deepstrf.utils.data import neural_collate

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    only = set(args.only.split(","))
    workers = [int(w) for w in args.workers.split(",") if w != ""]
    channels = tuple(int(c) for c in args.channels.split(","))
    pool_url, _, build_s = build_stores(Path(args.workdir), args.scale, args.time_scale)
    pool = open_dataset(pool_url)
    neurons = torch.as_tensor(pool.selected_neurons())  # on the host: the model checks ids without a sync

    def new_model():
        torch.manual_seed(0)
        model = PooledEncodingModel(pool.N_neurons, n_freq=pool.F, channels=channels).to(device)
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)

    def stream(collate: str, on_device: bool = True) -> StreamingNeuralDataset:
        # a CPU run streams compact batches as built (no device: they are on the host already)
        where = {"device": device} if on_device and (device.type != "cpu" or collate == "dense") else {}
        return StreamingNeuralDataset(pool_url, batch_size=BATCH, collate=collate, shuffle=True, seed=0, **where)

    def train_on(batches_of_epoch) -> dict:
        model, opt = new_model()

        def epoch() -> int:
            items = 0
            for batch in batches_of_epoch():
                train_step(model, opt, batch, neurons)
                items += len(batch["stim_meta"])
            return items
        return timed_epochs(args.epochs, epoch, sync)

    results: dict[str, dict] = {}
    if "bound" in only:
        on_device = [b.to(device) for b in stream("compact", on_device=False)]  # one epoch's batches
        model, opt = new_model()

        def bound_epoch() -> int:
            for batch in on_device:
                train_step(model, opt, batch, neurons)
            return len(pool)
        results["bound"] = timed_epochs(args.epochs, bound_epoch, sync)
        del on_device
    if "memory" in only:
        start = time.perf_counter()
        in_ram = open_dataset(pool_url).to_memory()
        load_s = time.perf_counter() - start
        loader = DataLoader(in_ram, batch_size=BATCH, shuffle=True, collate_fn=neural_collate)
        results["memory"] = {**train_on(lambda: (to_device(b, device) for b in loader)), "load_s": round(load_s, 2)}
        del in_ram, loader
    for k in workers:
        loader_kw = {"timeout": 600} if k else {}
        if args.pin != "default":
            loader_kw["pin_memory"] = args.pin == "on"
        for name, collate in (("loader", "compact"), ("compact", "compact"), ("dense_device", "dense")):
            if name not in only:
                continue
            loader = stream(collate).loader(num_workers=k, **loader_kw)
            if name == "loader":
                r = timed_epochs(args.epochs, lambda: sum(len(b["stim_meta"]) for b in loader), sync)
            else:
                r = train_on(lambda: loader)
            if k:
                r["start_method"] = context_method(loader.multiprocessing_context)
            results[f"{name}_w{k}"] = {**r, "pin_memory": loader.pin_memory}
    if args.host_peak and workers:
        k = max(workers)
        for name in ("bound", "compact", "dense_device"):  # bound: the device process without workers
            child = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--only", name,
                     "--workers", str(k), "--epochs", "2", "--scale", str(args.scale), "--time-scale",
                     str(args.time_scale), "--channels", args.channels, "--pin", args.pin, "--workdir", args.workdir]
            if args.threads:
                child += ["--threads", str(args.threads)]
            peak = run_child(child, sample_memory=True)
            key = name if name == "bound" else f"{name}_w{k}"
            results.setdefault(key, {})["host_peak_pss_mib"] = peak.get("peak_pss_mib", peak.get("error"))
    bound = results.get("bound", {}).get("items_per_s")
    if bound:
        for name, r in results.items():
            if "items_per_s" in r:
                r["fraction_of_bound"] = round(r["items_per_s"] / bound, 3)
    out = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
           else "cpu", "torch_threads": torch.get_num_threads(), "scale": args.scale,
           "time_scale": args.time_scale, "items": len(pool), "batch": BATCH, "epochs": args.epochs,
           "channels": list(channels), "pin": args.pin,
           "stores_s": round(build_s, 2), "configs": results}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
