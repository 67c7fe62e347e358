"""What fresh batch memory costs on this machine: private (the main process's batches) against
shared (a DataLoader worker's), mapped and zeroed by the kernel at first touch.

A worker builds its batches in shared memory, which gets no transparent huge pages unless the
administrator turned them on for shmem (``/sys/kernel/mm/transparent_hugepage/shmem_enabled``);
the main process builds them in numpy arrays, which ask for huge pages. A worker's first pass
pays the difference once per buffer it keeps. Prints one JSON line (milliseconds per GiB,
medians of ``--repeat`` fresh buffers of ``--mib`` MiB each).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from deepstrf.stream import buffers

PAGE = 4096


def touch_ms_per_gib(make, mib: int, repeat: int) -> float:
    """Median time to write one byte per page of a new buffer from ``make(nbytes)``, per GiB."""
    nbytes = mib << 20
    times = []
    for _ in range(repeat + 1):  # the first one also pays for memory the host had taken back
        start = time.perf_counter()
        buf = make(nbytes)
        buf[::PAGE] = 1
        times.append(time.perf_counter() - start)
        del buf
    return round(statistics.median(times[1:]) * 1e3 * 1024 / mib, 1)


def shared(nbytes: int) -> np.ndarray:
    return torch.empty(0, dtype=torch.uint8).set_(buffers.shared_storage(nbytes)).numpy()


def sysfs(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="size of each buffer (default 256)")
    ap.add_argument("--repeat", type=int, default=5, help="buffers of each kind (default 5)")
    args = ap.parse_args()
    private = touch_ms_per_gib(lambda n: np.empty(n, dtype=np.uint8), args.mib, args.repeat)
    torch_private = touch_ms_per_gib(lambda n: torch.empty(n, dtype=torch.uint8).numpy(), args.mib, args.repeat)
    shm = touch_ms_per_gib(shared, args.mib, args.repeat)
    print(json.dumps({
        "mib": args.mib, "repeat": args.repeat,
        "private_numpy_ms_per_gib": private, "private_torch_ms_per_gib": torch_private,
        "shared_ms_per_gib": shm, "shared_vs_private_numpy": round(shm / private, 2),
        "thp_enabled": sysfs("/sys/kernel/mm/transparent_hugepage/enabled"),
        "thp_shmem_enabled": sysfs("/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
    }))


if __name__ == "__main__":
    main()
