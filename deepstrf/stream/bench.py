"""``deepstrf bench``: stream a store for a few epochs and report throughput and I/O counters."""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from tqdm.auto import tqdm

from .dataset import StreamingNeuralDataset


def synthetic_pool(root: str) -> str:
    """A small AA1 + AA2-shaped synthetic pool written under ``root``; returns its URL."""
    from .. import concat_neural_datasets
    from ..datasets.synthetic import SyntheticAudioDataset
    from ..store import open_dataset, save_dataset

    urls = []
    for preset, seed in (("aa1", 1), ("aa2", 2)):
        url = f"{root}/{preset}"
        save_dataset(SyntheticAudioDataset(preset, scale=0.25, time_scale=0.5, seed=seed), url, progress=False)
        urls.append(url)
    concat_neural_datasets([open_dataset(u) for u in urls], names=["AA1", "AA2"], store=f"{root}/pool")
    return f"{root}/pool"


def run(url: str, *, storage_options: dict | None = None, batch_size: int = 8, workers: int = 0,
        epochs: int = 1, progress: bool = True, open_options: dict | None = None) -> list[dict]:
    """Stream ``url`` for ``epochs`` epochs; one dict of counters and rates per epoch. ``open_options``
    go to :func:`~deepstrf.open_dataset` (a pool's ``allowed_roots``, say)."""
    ds = StreamingNeuralDataset(url, storage_options=storage_options, batch_size=batch_size, shuffle=True,
                                open_options=open_options)
    loader = ds.loader(num_workers=workers)
    report = []
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        start = time.perf_counter()
        first = None
        with tqdm(total=len(ds), unit="batch", desc=f"epoch {epoch}", disable=not progress) as bar:
            for _ in loader:
                first = first if first is not None else time.perf_counter() - start
                bar.update(1)
                stats = ds.stats()
                bar.set_postfix(items=stats["items"], MB=f"{stats['bytes_fetched'] / 1e6:.0f}",
                                requests=stats["requests"])
        stats = ds.stats(seconds=time.perf_counter() - start)
        report.append({"epoch": epoch, "first_batch_s": round(first or 0.0, 3),
                       **{k: round(v, 3) if isinstance(v, float) else v for k, v in stats.items()}})
    return report


def main(args: argparse.Namespace) -> int:
    """Entry point of ``deepstrf bench [URL] --batch-size --workers --epochs --allow-root``."""
    from ..store.pool_commands import open_kw

    with tempfile.TemporaryDirectory(prefix="deepstrf-bench-") as tmp:
        url = args.url or synthetic_pool(tmp)
        report = run(url, storage_options=args.storage_options, batch_size=args.batch_size,
                     workers=args.workers, epochs=args.epochs,
                     open_options=open_kw(args, url) if args.allow_root else None)
    for epoch in report:
        print(f"epoch {epoch['epoch']}: {epoch['items']} items in {epoch['seconds']:.2f} s "
              f"= {epoch['items_per_s']:.1f} items/s; first batch {epoch['first_batch_s']:.2f} s; "
              f"{epoch['requests']} requests, {epoch['bytes_fetched'] / 1e6:.1f} MB fetched, "
              f"{epoch['bytes_used'] / 1e6:.1f} MB used")
    print(json.dumps({"url": args.url or "synthetic", "epochs": report}))
    return 0
