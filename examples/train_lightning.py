"""User story: train one model on a pool with PyTorch Lightning, streaming it from its store.

``PoolDataModule`` splits the stims within each source (train / val / test),
streams batches built by ``StreamingNeuralDataset`` (compact: valid cells only),
shards them itself under DDP (``--devices 2``) and resumes mid-epoch from a
Lightning checkpoint (``--resume CKPT``). Needs ``pip install "deepstrf-pool[lightning]"``.

    python examples/train_lightning.py [--root DIR] [--tiny] [--devices 2] [--workers 2]
"""

from __future__ import annotations

import tempfile

import lightning
import torch

import deepstrf
from deepstrf.datasets.synthetic import SyntheticAudioDataset
from deepstrf.lightning import PoolDataModule
from deepstrf.models import PooledEncodingModel, poisson_loss_compact

from _common import join, parser, storage_options


class PoolModel(lightning.LightningModule):
    """A shared convolutional backbone with one output head per neuron of the pool."""

    def __init__(self, n_neurons: int, n_freq: int) -> None:
        super().__init__()
        self.model = PooledEncodingModel(n_neurons, n_freq=n_freq, channels=(8,), kernel_t=12)

    def training_step(self, batch, batch_idx):
        loss = poisson_loss_compact(self.model.predict(batch), batch)  # valid cells only
        self.log("train_loss", loss, batch_size=batch.batch_size, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", poisson_loss_compact(self.model.predict(batch), batch), batch_size=batch.batch_size,
                 sync_dist=True)

    def test_step(self, batch, batch_idx):
        self.log("test_loss", poisson_loss_compact(self.model.predict(batch), batch), batch_size=batch.batch_size,
                 sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=5e-3)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--devices", type=int, default=1, help="processes (CPU DDP on gloo when > 1)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes per device")
    p.add_argument("--resume", default=None, help="a checkpoint to resume from (mid-epoch works)")
    args = p.parse_args()
    if args.devices > 1 and not args.root:
        p.error("--devices > 1 needs --root: every process opens the same stores")
    root = args.root or tempfile.mkdtemp(prefix="deepstrf-lightning-")
    so = storage_options(args)
    scale, time_scale, epochs = (0.1, 0.05, 2) if args.tiny else (0.3, 0.3, 10)
    epochs = args.epochs or epochs
    lightning.seed_everything(0)

    pool_url = join(root, "pool.zarr")
    if lightning.fabric.utilities.rank_zero.rank_zero_only.rank == 0 and not args.resume:
        urls = []
        for preset, seed in (("aa1", 1), ("aa2", 2)):  # same dt and F: they pool as they are
            urls.append(join(root, f"{preset}.zarr"))
            deepstrf.save_dataset(SyntheticAudioDataset(preset, scale=scale, time_scale=time_scale, seed=seed),
                                  urls[-1], storage_options=so, overwrite=True)
        deepstrf.concat_neural_datasets([deepstrf.open_dataset(u, storage_options=so) for u in urls],
                                        names=["AA1", "AA2"], store=pool_url, storage_options=so, overwrite=True)

    pool = deepstrf.open_dataset(pool_url, storage_options=so)
    data = PoolDataModule(pool_url, storage_options=so, batch_size=4, collate="compact", num_workers=args.workers)
    trainer = lightning.Trainer(accelerator="cpu", devices=args.devices, max_epochs=epochs,
                                strategy="ddp" if args.devices > 1 else "auto", default_root_dir=root,
                                enable_progress_bar=not args.tiny, logger=False)
    model = PoolModel(pool.N_neurons, pool.F)
    trainer.fit(model, data, ckpt_path=args.resume)
    result = trainer.test(model, data, verbose=False)
    if trainer.is_global_zero:
        print(f"trained {epochs} epochs on {len(data.split['train'])} stims, validated on "
              f"{len(data.split['val'])}, tested on {len(data.split['test'])}: test loss "
              f"{result[0]['test_loss']:.4f}; checkpoints in {root}")


if __name__ == "__main__":
    main()
