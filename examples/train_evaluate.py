"""User story: train one model on a pool and evaluate it per source, with the library pieces.

The ``deepstrf demo`` command does this end to end with a report; this script
shows the calls: held-out splits per source, a compact-batch loop with the
masked Poisson loss, per-neuron scores aggregated per source.

    python examples/train_evaluate.py [--root DIR] [--tiny]

Without ``--root`` the stores go to a temporary folder, removed at the end.
"""

from __future__ import annotations

import tempfile
from contextlib import nullcontext

import torch

import deepstrf
from deepstrf.datasets.resample import rebin_dataset, resample_frequency
from deepstrf.datasets.splits import heldout_split
from deepstrf.datasets.synthetic import SyntheticAudioDataset
from deepstrf.metrics import NeuronScores
from deepstrf.models import PooledEncodingModel, poisson_loss_compact

from _common import join, parser, storage_options


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None)
    args = p.parse_args()
    with nullcontext(args.root) if args.root else tempfile.TemporaryDirectory(prefix="deepstrf-train-") as root:
        train_and_evaluate(root, args)


def train_and_evaluate(root: str, args) -> None:
    so = storage_options(args)
    scale, time_scale, epochs = (0.12, 0.1, 8) if args.tiny else (0.3, 0.3, 15)
    epochs = args.epochs or epochs
    torch.manual_seed(0)

    # sources at a common dt (5 ms) and F (32), saved and pooled
    sources = {
        "AA1": rebin_dataset(SyntheticAudioDataset("aa1", scale=scale, time_scale=time_scale, seed=1), 5.0),
        "NS1": resample_frequency(SyntheticAudioDataset("ns1", scale=scale, time_scale=time_scale, seed=2), 32),
    }
    for name, ds in sources.items():
        deepstrf.save_dataset(ds, join(root, f"{name}.zarr"), storage_options=so, overwrite=True)
    opened = [deepstrf.open_dataset(join(root, f"{n}.zarr"), storage_options=so) for n in sources]
    pool_url = join(root, "pool.zarr")
    pool = deepstrf.concat_neural_datasets(opened, names=list(sources), store=pool_url, storage_options=so,
                                           overwrite=True)

    # stims held out within each source, reproducible from the seed
    split = heldout_split(pool, test_fraction=0.25, seed=0)
    model = PooledEncodingModel(pool.N_neurons, n_freq=pool.F, channels=(8,), kernel_t=12)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    train = deepstrf.StreamingNeuralDataset(pool_url, storage_options=so, batch_size=4, collate="compact",
                                            shuffle=True, seed=0, stims=split.train)
    for epoch in range(epochs):
        train.set_epoch(epoch)
        total = 0.0
        for batch in train.loader():
            loss = poisson_loss_compact(model.predict(batch), batch)  # valid cells only
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
        print(f"epoch {epoch + 1}/{epochs}: train loss {total / max(len(train), 1):.4f}")

    # per-neuron scores on the held-out stims, aggregated per source
    test = deepstrf.StreamingNeuralDataset(pool_url, storage_options=so, batch_size=8, collate="compact",
                                           shuffle=False, stims=split.test)
    scores = NeuronScores(pool.N_neurons)
    model.eval()
    with torch.no_grad():
        for batch in test.loader():
            scores.update_compact(batch, model.predict(batch))
    groups = [m["dataset"] for m in pool.nrn_meta]
    for name, agg in scores.aggregate(groups).items():
        print(f"{name}: {agg['n_neurons']} neurons, median raw CC {agg['cc_raw']['median']:.3f}, "
              f"normalised CC {agg['cc_norm']['median']:.3f}")
        assert agg["cc_raw"]["median"] > 0


if __name__ == "__main__":
    main()
