"""User story: stream a store from S3 into a PyTorch training loop, without loading it.

Writes a small pool to ``--root`` (an ``s3://bucket/prefix``; any fsspec URL
works) and streams it with :class:`deepstrf.StreamingNeuralDataset` and
DataLoader workers, printing what was read. Credentials come from the
environment (``AWS_ACCESS_KEY_ID`` ...); only the endpoint is passed. The bucket
must exist; the user guide shows how to run a local S3 server and make one.

    python examples/stream_from_s3.py --root s3://my-bucket/deepstrf --endpoint-url http://127.0.0.1:9000
"""

from __future__ import annotations

import time

import deepstrf
from deepstrf.datasets.resample import rebin_dataset, resample_frequency
from deepstrf.datasets.synthetic import SyntheticAudioDataset

from _common import join, parser, storage_options


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    if not args.root:
        p.error("--root is required (e.g. s3://bucket/prefix)")
    so = storage_options(args)
    scale, time_scale = (0.1, 0.02) if args.tiny else (0.3, 0.2)

    # AA1-like (1 ms, 32 bands) and NS1-like (5 ms, 34 bands): convert explicitly, then save
    aa1 = rebin_dataset(SyntheticAudioDataset("aa1", scale=scale, time_scale=time_scale, seed=0), 5.0)
    ns1 = resample_frequency(SyntheticAudioDataset("ns1", scale=scale, time_scale=time_scale, seed=1), 32)
    urls = [join(args.root, "aa1.zarr"), join(args.root, "ns1.zarr")]
    for ds, url in zip((aa1, ns1), urls):
        deepstrf.save_dataset(ds, url, storage_options=so, overwrite=True)
    opened = [deepstrf.open_dataset(u, storage_options=so) for u in urls]
    pool_url = join(args.root, "pool.zarr")
    deepstrf.concat_neural_datasets(opened, names=["AA1", "NS1"], store=pool_url, storage_options=so,
                                    overwrite=True)

    # every DataLoader worker opens the pool from its URL and reads its own share of each epoch
    stream = deepstrf.StreamingNeuralDataset(pool_url, storage_options=so, batch_size=4, collate="compact",
                                             shuffle=True, seed=0)
    expected = len(deepstrf.open_dataset(pool_url, storage_options=so))
    loader = stream.loader(num_workers=args.workers)  # its workers are kept from one epoch to the next
    for epoch in range(2):
        stream.set_epoch(epoch)
        t0, items, cells = time.perf_counter(), 0, 0
        for batch in loader:
            items += batch.batch_size
            cells += batch.n_cells
        seconds = time.perf_counter() - t0
        assert items == expected, (items, expected)  # every visible item exactly once per epoch
        stats = stream.stats(seconds)
        print(f"epoch {epoch}: {items} items, {cells} valid cells in {seconds:.2f} s; "
              f"{int(stats['requests'])} requests, {int(stats['bytes_fetched'])} bytes fetched")


if __name__ == "__main__":
    main()
