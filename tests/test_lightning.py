"""deepstrf.lightning.PoolDataModule under a real lightning.Trainer (CPU): trains, resumes mid-epoch, DDP."""

import json
import os
import socket
import warnings
from pathlib import Path
from collections import Counter

import pytest
import torch

lightning = pytest.importorskip("lightning")

from deepstrf.datasets.splits import heldout_split  # noqa: E402
from deepstrf.lightning import PoolDataModule  # noqa: E402

from stream_helpers import batch_keys, small_pool  # noqa: E402


class Recorder(lightning.LightningModule):
    """Records the stims of every training batch, per epoch; a one-parameter model."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, list[str]]] = []
        self.evaluated: dict[str, list[str]] = {"val": [], "test": []}
        self.widths: set[int] = set()  # neurons of the dense batches, every part

    def on_before_batch_transfer(self, batch, dataloader_idx):
        if isinstance(batch, dict):
            self.widths.add(batch["responses"].shape[1])
        return batch

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch_keys(batch)))
        return ((self.w - batch["stims"].mean()) ** 2).sum()

    def validation_step(self, batch, batch_idx):
        self.evaluated["val"] += batch_keys(batch)

    def test_step(self, batch, batch_idx):
        self.evaluated["test"] += batch_keys(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(tmp_path, **kwargs) -> "lightning.Trainer":
    kwargs.setdefault("max_epochs", 2)
    return lightning.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=str(tmp_path), **kwargs)


def uids(ds, stims):
    return sorted(ds.stim_meta[s]["uid"] for s in stims)


def test_trains_validates_and_tests_on_per_source_heldout_stims(tmp_path):
    pool = small_pool()
    dm = PoolDataModule(pool, batch_size=2, collate="dense", seed=3)
    model = Recorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, enable_checkpointing=False).fit(model, dm)
        trainer(tmp_path).test(model, dm)
    split = dm.split
    assert set(split["test"]) == set(heldout_split(pool, 0.2, seed=0).test)  # the demo's held-out stims
    assert not set(split["train"]) & set(split["val"]) and not set(split["train"]) & set(split["test"])
    for epoch in (0, 1):
        seen = [k for e, keys in model.seen if e == epoch for k in keys]
        assert sorted(seen) == uids(pool, split["train"])  # every training stim once per epoch
    orders = [[k for e, keys in model.seen if e == epoch for k in keys] for epoch in (0, 1)]
    assert orders[0] != orders[1]
    assert sorted(set(model.evaluated["val"])) == uids(pool, split["val"])
    assert sorted(model.evaluated["test"]) == uids(pool, split["test"])
    assert model.widths == {pool.N_neurons}  # one neuron axis in every part: one model fits all
    with pytest.raises(TypeError, match="store URL or a NeuralDataset"):
        PoolDataModule(42)


def test_group_by_keeps_a_shared_stimulus_out_of_training_and_validation():
    pool = small_pool()
    for i, meta in enumerate(pool.stim_meta):
        meta["sound"] = f"s{i % 5}"  # five sounds, played in both sources
    dm = PoolDataModule(pool, batch_size=2, val_fraction=0.2, group_by="sound")
    dm.setup()
    sounds = {part: {pool.stim_meta[s]["sound"] for s in dm.split[part]} for part in ("train", "val", "test")}
    assert dm.split["train"] and dm.split["val"]
    assert not sounds["train"] & sounds["val"] and not sounds["train"] & sounds["test"]
    assert sorted(sum(dm.split.values(), [])) == list(range(pool.get_S()))  # the rest: "excluded"
    dm.load_state_dict({"split": {part: dm.split[part] for part in ("train", "val", "test")}})  # no "excluded"


def fit_saving_every_2_steps(tmp_path, pool, batch_size: int) -> tuple[Recorder, Path]:
    """A 2-epoch run with a checkpoint every 2 training steps: what it trained on, and where the
    checkpoints are."""
    ckpts = tmp_path / "ckpt"
    saver = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=str(ckpts), every_n_train_steps=2, save_top_k=-1)
    full = Recorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, callbacks=[saver]).fit(full, PoolDataModule(pool, batch_size=batch_size, seed=5))
    return full, ckpts


def test_resumes_mid_epoch_from_a_checkpoint_with_the_same_remaining_order(tmp_path):
    pool = small_pool()
    full, ckpts = fit_saving_every_2_steps(tmp_path, pool, batch_size=2)
    assert len([1 for e, _ in full.seen if e == 0]) > 3  # the checkpoint at step 2 is mid-epoch
    resumed = Recorder()
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=lightning.pytorch.utilities.warnings.PossibleUserWarning)
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|log_every_n).*")
        trainer(tmp_path).fit(resumed, PoolDataModule(pool, batch_size=2, seed=5),
                              ckpt_path=str(ckpts / "epoch=0-step=2.ckpt"))
    assert resumed.seen == full.seen[2:]


def test_a_checkpoint_resumed_with_another_batch_size_trains_the_rest_of_its_epoch(tmp_path):
    # Lightning counts the resumed epoch on from the checkpoint's batch index (2 batches of 1 here)
    # and read the length as a whole epoch of batches of 2: it stopped a batch before the rest's end
    pool = small_pool()
    full, ckpts = fit_saving_every_2_steps(tmp_path, pool, batch_size=1)
    resumed = Recorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path).fit(resumed, PoolDataModule(pool, batch_size=2, seed=5),
                              ckpt_path=str(ckpts / "epoch=0-step=2.ckpt"))
    epoch = [[k for e, keys in run.seen if e == 0 for k in keys] for run in (full, resumed)]
    assert len(epoch[0]) - 2 > 2 * 2  # the rest of epoch 0 takes more than two batches of 2
    assert epoch[1] == epoch[0][2:]  # the rest, in order, each once
    whole = sorted(k for e, keys in full.seen if e == 1 for k in keys)
    assert sorted(k for e, keys in resumed.seen if e == 1 for k in keys) == whole


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    # as torchrun would set them: Lightning then joins these processes instead of launching its own
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))
    warnings.simplefilter("ignore")
    model = Recorder()
    dm = PoolDataModule(small_pool(), batch_size=2, seed=7)
    lightning.Trainer(accelerator="cpu", devices=world, strategy="ddp", max_epochs=2, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=out_dir).fit(model, dm)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"seen": model.seen, "split": dm.split}))


def test_ddp_two_processes_read_every_training_item_once_per_epoch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    pool = small_pool()
    train = uids(pool, results[0]["split"]["train"])
    assert results[0]["split"] == results[1]["split"]
    for epoch in (0, 1):
        per_rank = [[keys for e, keys in r["seen"] if e == epoch] for r in results]
        assert len(per_rank[0]) == len(per_rank[1])  # equal batches per rank
        counts = Counter(k for batches in per_rank for keys in batches for k in keys)
        assert sorted(counts) == train
        assert sum(counts.values()) == len(train) + len(train) % 2  # padding: at most world - 1 repeats



