"""User story: share a pool with another lab, without copying anyone's data or credentials.

Lab A writes its sources and a pool under one root (a folder or a bucket
prefix). References inside the pool are relative to that root, so the whole
root can be moved, copied or published: lab B opens the pool with only its
URL (and its own credentials). When lab A publishes a source again, the
pool keeps reading the version it pinned; ``update_pool`` (``deepstrf
pool-update``) re-pins a copy to the latest versions, and once lab A prunes
the old version the old pool is refused, naming the source and its pin.

    python examples/share_pool.py --root /tmp/lab-a [--tiny]
    python examples/share_pool.py --root s3://bucket/lab-a --endpoint-url http://127.0.0.1:9000
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import deepstrf
from deepstrf.datasets.synthetic import SyntheticAudioDataset
from deepstrf.errors import VersionNotFoundError
from deepstrf.store import prune_versions, update_pool
from deepstrf.utils.data import NeuralDataset

from _common import join, parser, storage_options


def same_pool(shared: NeuralDataset, pool: NeuralDataset) -> None:
    """Lab B's copy holds what lab A pooled."""
    assert shared.summary()["sources"] == pool.summary()["sources"]
    assert bool((shared.nrn_masks == pool.nrn_masks).all())
    print(f"lab B opened {shared.get_S()} stims x {shared.N_neurons} neurons from the shared pool")


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    root = args.root or tempfile.mkdtemp(prefix="deepstrf-lab-a-")
    so = storage_options(args)
    scale, time_scale = (0.1, 0.02) if args.tiny else (0.3, 0.2)

    # lab A: two sources and a pool under one root
    a1 = SyntheticAudioDataset("aa1", scale=scale, time_scale=time_scale, seed=11)
    a2 = SyntheticAudioDataset("aa2", scale=scale / 2, time_scale=time_scale, seed=12)
    urls = [join(root, "sources/aa1.zarr"), join(root, "sources/aa2.zarr")]
    for ds, url in zip((a1, a2), urls):
        deepstrf.save_dataset(ds, url, storage_options=so, overwrite=True)
    pool_url = join(root, "pool.zarr")
    opened = [deepstrf.open_dataset(u, storage_options=so) for u in urls]
    deepstrf.concat_neural_datasets(opened, names=["AA1", "AA2"], store=pool_url, storage_options=so,
                                    overwrite=True)

    # what a pool holds: names, relative references and fingerprints; no data, no credentials
    pool = deepstrf.open_dataset(pool_url, storage_options=so)
    refs = [{k: e[k] for k in ("name", "ref", "fingerprint")} for e in pool.pool_sources]
    print(json.dumps(refs, indent=1))
    assert all(not e["ref"].startswith(("/", "s3://", "file://")) for e in refs), "references are relative"

    # lab B: receives the root (copied to another place) and opens the pool with only the URL
    if "://" not in root:
        with tempfile.TemporaryDirectory(prefix="deepstrf-lab-b-") as lab_b_root:
            shutil.copytree(root, lab_b_root, dirs_exist_ok=True)
            same_pool(deepstrf.open_dataset(os.path.join(lab_b_root, "pool.zarr")), pool)
    else:
        same_pool(deepstrf.open_dataset(pool_url, storage_options=so), pool)  # lab B's own credentials

    # lab A publishes a new version of a source: the pool still reads the version it pinned
    before = pool.stims[0]
    changed = SyntheticAudioDataset("aa1", scale=scale, time_scale=time_scale, seed=99)
    deepstrf.save_dataset(changed, urls[0], storage_options=so, overwrite=True, tag="resorted")
    assert bool((deepstrf.open_dataset(pool_url, storage_options=so).stims[0] == before).all())
    _, changes = update_pool(pool_url, join(root, "pool-latest.zarr"), storage_options=so, overwrite=True)
    for change in changes:
        print(f"pool-update: {change.describe()}")

    # lab A prunes the old version: the old pool names the source and its pin; the updated one opens
    prune_versions(urls[0], 1, storage_options=so)
    try:
        deepstrf.open_dataset(pool_url, storage_options=so)
    except VersionNotFoundError as e:
        print(f"refused as expected: {e}")
    else:
        raise AssertionError("a pool whose pinned version was pruned must not open silently")
    deepstrf.open_dataset(join(root, "pool-latest.zarr"), storage_options=so)

if __name__ == "__main__":
    main()
