"""User story: pool two labs' recordings kept as Zarr stores, without copying data.

Lab A's set is shaped like CRCNS AA1, lab B's like AA2 (synthetic here). Each
is saved as a source store; a pool store then references both. Opening the
pool gives the block-diagonal concatenation: every (stim, neuron) pair that
was never recorded is the missing sentinel.

    python examples/pool_two_stores.py --root /tmp/pool-demo [--tiny]
"""

from __future__ import annotations

import tempfile

import torch

import deepstrf
from deepstrf.datasets.synthetic import SyntheticAudioDataset

from _common import join, parser, storage_options


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    root = args.root or tempfile.mkdtemp(prefix="deepstrf-pool-")
    so = storage_options(args)
    scale, time_scale = (0.1, 0.02) if args.tiny else (0.3, 0.2)

    # 1. each lab saves its own dataset as a source store (overwrite: a re-run replaces its own stores;
    #    without it, an existing store is never replaced)
    lab_a = SyntheticAudioDataset("aa1", scale=scale, time_scale=time_scale, seed=1)
    lab_b = SyntheticAudioDataset("aa2", scale=scale / 2, time_scale=time_scale, seed=2)
    urls = {"AA1": join(root, "aa1.zarr"), "AA2": join(root, "aa2.zarr")}
    deepstrf.save_dataset(lab_a, urls["AA1"], storage_options=so, overwrite=True)
    deepstrf.save_dataset(lab_b, urls["AA2"], storage_options=so, overwrite=True)

    # 2. open them lazily and write a pool of references (no response or stimulus data copied)
    sources = [deepstrf.open_dataset(urls[n], storage_options=so) for n in urls]
    pool_url = join(root, "pool.zarr")
    pool = deepstrf.concat_neural_datasets(sources, names=list(urls), store=pool_url, storage_options=so,
                                           overwrite=True)

    # 3. anyone can now open the pool with only its URL
    pool = deepstrf.open_dataset(pool_url, storage_options=so)
    print(pool.summary())
    S, N = pool.get_S(), pool.N_neurons
    assert (S, N) == (lab_a.get_S() + lab_b.get_S(), lab_a.N_neurons + lab_b.N_neurons)
    # block-diagonal coverage: lab A's stims were never played to lab B's neurons
    masks = pool.nrn_masks
    assert not masks[:lab_a.get_S(), lab_a.N_neurons:].any()
    assert torch.equal(masks[:lab_a.get_S(), :lab_a.N_neurons], lab_a.nrn_masks)
    # the same data as in-memory concatenation
    mem = lab_a + lab_b
    s, n = lab_a.get_S(), lab_a.N_neurons + int(lab_b.nrn_masks[0].nonzero()[0])
    assert torch.equal(pool.responses[s][n].float(), mem.responses[s][n].float())
    print(f"pool {pool_url}: {S} stims x {N} neurons, {float(masks.float().mean()) * 100:.1f}% recorded")


if __name__ == "__main__":
    main()
