"""What fresh batch memory costs on this machine: private (the main process's batches) against
shared (a DataLoader worker's), mapped and zeroed by the kernel at first touch.

A worker builds its batches in shared memory, which gets no transparent huge pages unless the
administrator turned them on for shmem (``/sys/kernel/mm/transparent_hugepage/shmem_enabled``);
the main process builds them in numpy arrays, which ask for huge pages. A worker's first pass
pays the difference once per buffer it keeps. Prints one JSON line (milliseconds per GiB,
medians of ``--repeat`` fresh buffers of ``--mib`` MiB each).

On a virtual machine that hands freed memory back to its host (virtio-balloon free page
reporting), memory freed a moment ago costs far less at first touch than memory that sat free
for a few seconds: the ``*_after_idle_ms_per_gib`` figures are buffers touched after ``--idle``
seconds without allocating, against the others' buffers made one after the other (the memory of
the last one recycled).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from deepstrf.stream import buffers

PAGE = 4096


def touch_ms_per_gib(make, mib: int, repeat: int) -> float:
    """Median time to write one byte per page of a new buffer from ``make(nbytes)``, per GiB, over
    ``repeat`` buffers made one after the other (a single buffer when ``repeat`` is 0)."""
    nbytes = mib << 20
    times = []
    for _ in range(repeat + 1):
        start = time.perf_counter()
        buf = make(nbytes)
        buf[::PAGE] = 1
        times.append(time.perf_counter() - start)
        del buf
    return _ms_per_gib(times, mib, repeat)


def after_idle_ms_per_gib(make, mib: int, idle_s: float, repeat: int) -> float:
    """Median time to touch a new buffer from ``make`` after ``idle_s`` seconds of allocating nothing."""
    times = []
    for _ in range(repeat):
        time.sleep(idle_s)
        times.append(touch_ms_per_gib(make, mib, 0))
    return statistics.median(times)


def private(nbytes: int) -> np.ndarray:
    return np.empty(nbytes, dtype=np.uint8)


def private_torch(nbytes: int) -> np.ndarray:
    return torch.empty(nbytes, dtype=torch.uint8).numpy()


def shared(nbytes: int) -> np.ndarray:
    return torch.empty(0, dtype=torch.uint8).set_(buffers.shared_storage(nbytes)).numpy()


def shared_in_two_steps(mib: int, repeat: int) -> tuple[float, float] | None:
    """Shared memory's cost split in two, medians in ms per GiB over ``repeat`` memory files: the
    kernel allocating and zeroing the pages (``posix_fallocate``, nothing mapped), then this
    process mapping them by touching each. Whichever process or thread allocates, the one that
    writes a batch pays the second part in its own page tables. None without ``memfd_create``."""
    if not hasattr(os, "memfd_create"):
        return None
    nbytes = mib << 20
    allocate, map_ = [], []
    for _ in range(repeat + 1):
        fd = os.memfd_create("bench-pages", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, nbytes)
            start = time.perf_counter()
            os.posix_fallocate(fd, 0, nbytes)
            allocated = time.perf_counter()
            with mmap.mmap(fd, nbytes) as mapping:
                view = np.frombuffer(mapping, dtype=np.uint8)
                view[::PAGE] = 1
                del view
            allocate.append(allocated - start)
            map_.append(time.perf_counter() - allocated)
        finally:
            os.close(fd)
    return _ms_per_gib(allocate, mib, repeat), _ms_per_gib(map_, mib, repeat)


def _ms_per_gib(times: list[float], mib: int, repeat: int) -> float:
    """Median of ``times`` (seconds for ``mib`` MiB) in ms per GiB; with ``repeat`` > 0 the first
    is left out: it also paid for memory that sat free (see the module doc)."""
    return round(statistics.median(times[1:] if repeat else times) * 1e3 * 1024 / mib, 1)


def sysfs(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="size of each buffer (default 256)")
    ap.add_argument("--repeat", type=int, default=5, help="buffers of each kind (default 5)")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds without allocating before the after-idle "
                                                            "buffers (default 5; 0 skips them)")
    args = ap.parse_args(argv)
    numpy_ms = touch_ms_per_gib(private, args.mib, args.repeat)
    torch_private = touch_ms_per_gib(private_torch, args.mib, args.repeat)
    shm = touch_ms_per_gib(shared, args.mib, args.repeat)
    allocate_ms, map_ms = shared_in_two_steps(args.mib, args.repeat) or (None, None)
    idle = {name: after_idle_ms_per_gib(make, args.mib, args.idle, 3) if args.idle > 0 else None
            for name, make in (("private_numpy", private), ("shared", shared))}
    out = {
        "mib": args.mib, "repeat": args.repeat,
        "private_numpy_ms_per_gib": numpy_ms, "private_torch_ms_per_gib": torch_private,
        "shared_ms_per_gib": shm, "shared_vs_private_numpy": round(shm / numpy_ms, 2),
        "shared_allocate_ms_per_gib": allocate_ms, "shared_map_allocated_ms_per_gib": map_ms,
        "idle_s": args.idle, **{f"{name}_after_idle_ms_per_gib": ms for name, ms in idle.items()},
        "thp_enabled": sysfs("/sys/kernel/mm/transparent_hugepage/enabled"),
        "thp_shmem_enabled": sysfs("/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
