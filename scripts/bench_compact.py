#!/usr/bin/env python
"""The cost of one compact batch's operations, against one pass over its bytes; prints ONE JSON line.

    python scripts/bench_compact.py [--items 8] [--neurons 494] [--repeats 10] [--bins 2000]
                                    [--rate 0.05] [--threads 1] [--device cpu]

One AA2-sized compact batch (by default 8 items x 494 neurons x 10 repeats x
~2,000 bins, the bins of each item drawn within +-10 %, uint8 Poisson counts)
is built in memory. Timed (best of ``--runs`` rounds, in which every
operation runs once in turn): ``repeat_sum()``, the compact
Poisson loss (forward, on predictions that require a gradient), its
backward, ``to_dense()``, and one training step of the demo's model
(``--channels``; predict, loss, backward, Adam); baselines: one numpy pass over the batch's
counts (``counts.sum()``) and one pass writing the dense batch's bytes
(``np.full`` of its responses and valid_mask). Ratios: each operation over
its baseline (``*_over_counts_pass``, ``to_dense_over_dense_pass``); the
backward is given over the counts pass too. Every timed operation starts from
the host batch, so its copy to the device is included; on a CUDA device the
copy alone is timed too, from pageable and from pinned memory (``to_device_ms``,
``to_device_pinned_ms``). ``step_operations``: the tensor operations one training step
dispatches (views excluded: they launch no kernel), by phase; on an accelerator each costs a
launch. ``--accelerator-path`` counts them for the code an accelerator runs, on any device.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def compact_batch(items: int, neurons: int, repeats: int, bins: int, rate: float, seed: int = 0):
    """A CompactBatch of ``items`` x ``neurons`` cells, uint8 Poisson counts."""
    from deepstrf.datasets.collate import CompactBatch

    rng = np.random.default_rng(seed)
    lengths = np.repeat(rng.integers(int(bins * 0.9), int(bins * 1.1) + 1, size=items), neurons)
    sizes = repeats * lengths
    values = rng.poisson(rate, size=int(sizes.sum())).astype(np.uint8)
    n = items * neurons
    return CompactBatch(
        stims=torch.zeros((items, 1, 32, int(lengths.max()))), values=torch.from_numpy(values),
        offsets=torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)])),
        repeats=torch.full((n,), repeats, dtype=torch.int64), lengths=torch.from_numpy(lengths),
        item_index=torch.arange(items).repeat_interleave(neurons), neuron_index=torch.arange(neurons).repeat(items),
        stim_lengths=torch.from_numpy(lengths[::neurons].copy()), stim_meta=[{} for _ in range(items)])


def best_of(fns: dict, runs: int) -> dict[str, float]:
    """Best wall time in ms of each of ``fns`` over ``runs`` rounds (after one warm-up), the
    functions taking turns within each round, so that a shared machine's load varies alike for all."""
    times = {name: [] for name in fns}
    for round_ in range(runs + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: min(t) for name, t in times.items()}


def train_step(host, device: torch.device, channels: tuple[int, ...]):
    """One training step of the demo's model on the batch as it arrives (moved, planned, predicted,
    compact loss, backward, Adam)."""
    from deepstrf.models import PooledEncodingModel, poisson_loss_compact

    torch.manual_seed(0)
    n_neurons = int(host.neuron_index.max()) + 1
    model = PooledEncodingModel(n_neurons, n_freq=host.stims.shape[2], channels=channels).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        batch = host.to(device)
        loss = poisson_loss_compact(model.predict(batch), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


VIEWS = {"view", "_unsafe_view", "as_strided", "reshape", "_reshape_alias", "slice", "select", "unsqueeze", "squeeze",
         "t", "transpose", "expand", "permute", "detach", "alias", "unfold", "split", "narrow", "lift_fresh"}


def step_operations(host, device: torch.device, channels: tuple[int, ...]) -> dict[str, int]:
    """Non-view operations dispatched by each phase of a training step (after one warm-up step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from deepstrf.models import PooledEncodingModel, poisson_loss_compact

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.__name__.split(".")[0] not in VIEWS
            return func(*args, **(kwargs or {}))

    model = PooledEncodingModel(int(host.neuron_index.max()) + 1, n_freq=host.stims.shape[2],
                                channels=channels).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    counts: dict[str, int] = {}

    def phase(name, fn):
        with Count() as c:
            out = fn()
        counts[name] = c.n
        return out

    for _ in range(2):  # the first step creates Adam's state
        batch = host.to(device)
        pred = phase("predict", lambda: model.predict(batch))
        loss = phase("loss", lambda: poisson_loss_compact(pred, batch))
        phase("backward", loss.backward)
        phase("optimizer", lambda: (opt.step(), opt.zero_grad(set_to_none=True)))
    return {**counts, "total": sum(counts.values())}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=8)
    p.add_argument("--neurons", type=int, default=494)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--bins", type=int, default=2000)
    p.add_argument("--rate", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1, help="torch threads (numpy's passes use one)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--channels", default="16,16", help="backbone widths of the model of train_step_ms")
    p.add_argument("--accelerator-path", action="store_true",
                   help="run the code an accelerator runs (fewer, larger operations) on --device")
    args = p.parse_args(argv)
    if not args.accelerator_path:
        return measure(args)
    from unittest import mock

    from deepstrf.datasets import cells

    with mock.patch.object(cells, "launch_bound", lambda device: True):
        return measure(args)


def measure(args: argparse.Namespace) -> dict:
    from deepstrf.models import poisson_loss_compact
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    host = compact_batch(args.items, args.neurons, args.repeats, args.bins, args.rate)
    counts = host.values.numpy()
    plan = host.plan()
    dense_shape = (args.items * args.neurons, plan.max_repeats, plan.max_length)
    pred = (torch.rand((host.n_cells, plan.max_length), device=device) + 0.01).requires_grad_()

    def fresh():  # a batch as it arrives: moved to the device, not planned yet
        return host.to(device)

    def loss_forward():
        return poisson_loss_compact(pred, fresh())

    def loss_backward():
        pred.grad = None
        poisson_loss_compact(pred, fresh()).backward()

    neurons = range(args.neurons)
    channels = tuple(int(c) for c in args.channels.split(","))
    step = train_step(host, device, channels)
    copies = {}
    if device.type == "cuda":
        pinned = host.pin_memory()
        copies = {"to_device_ms": lambda: (host.to(device), sync()),
                  "to_device_pinned_ms": lambda: (pinned.to(device), sync())}
    ms = best_of({
        **copies,
        "counts_pass_ms": lambda: counts.sum(),
        "dense_pass_ms": lambda: (np.full(dense_shape, np.nan, np.float32), np.full(dense_shape, False)),
        "repeat_sum_ms": lambda: (fresh().repeat_sum(), sync()),
        "loss_forward_ms": lambda: (loss_forward(), sync()),
        "loss_forward_backward_ms": lambda: (loss_backward(), sync()),
        "to_dense_ms": lambda: (fresh().to_dense(neurons), sync()),
        "train_step_ms": lambda: (step(), sync()),
    }, args.runs)
    out = {
        "batch": {"items": args.items, "neurons": args.neurons, "repeats": args.repeats,
                  "bins": args.bins, "rate": args.rate, "cells": host.n_cells,
                  "count_bytes": counts.nbytes, "dense_bytes": int(np.prod(dense_shape)) * 5},
        "device": str(device), "accelerator_path": args.accelerator_path or device.type != "cpu",
        "torch_threads": args.threads, **ms, "step_operations": step_operations(host, device, channels),
    }
    base = out["counts_pass_ms"]
    out["repeat_sum_over_counts_pass"] = out["repeat_sum_ms"] / base
    out["loss_forward_over_counts_pass"] = out["loss_forward_ms"] / base
    out["loss_backward_over_counts_pass"] = (out["loss_forward_backward_ms"] - out["loss_forward_ms"]) / base
    out["to_dense_over_dense_pass"] = out["to_dense_ms"] / out["dense_pass_ms"]
    out = {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
