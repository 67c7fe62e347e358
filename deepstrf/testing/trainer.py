"""A stand-in for a busy trainer: threads running torch BLAS, for fork-safety tests and scripts."""

from __future__ import annotations

import threading

import torch


def busy_blas_threads(stop: threading.Event, n: int = 3) -> list[threading.Thread]:
    """Start ``n`` daemon threads running torch matmul and conv1d (MKL) until ``stop`` is set.

    Their inputs are made here, before the threads start: a thread inside torch's RNG at a fork
    hangs the forked child in torch's own DataLoader worker start-up, which no dataset can avoid.
    """
    x, w, a = torch.rand(1, 32, 400), torch.rand(64, 32, 60), torch.rand(256, 256)

    def work() -> None:
        while not stop.is_set():
            torch.nn.functional.conv1d(x, w)
            a @ a

    threads = [threading.Thread(target=work, daemon=True, name=f"busy-blas-{i}") for i in range(n)]
    for t in threads:
        t.start()
    return threads
