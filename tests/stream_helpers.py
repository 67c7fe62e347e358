"""Shared small data and helpers for the streaming tests."""

from __future__ import annotations

import torch

from deepstrf.datasets.collate import CompactBatch
from deepstrf import concat_neural_datasets
from deepstrf.datasets.synthetic import SyntheticAudioDataset
from deepstrf.store import open_dataset, save_dataset


# every DataLoader with worker processes in the tests waits at most this long for a batch: a stuck
# worker fails its test instead of hanging the suite
LOADER_TIMEOUT_S = 60


def loader_timeout(workers: int) -> float:
    """``DataLoader(timeout=...)`` for ``workers`` processes (0 without: torch refuses a timeout then)."""
    return LOADER_TIMEOUT_S if workers else 0


def small_pool(scale: float = 0.1, time_scale: float = 0.02):
    """An AA1 + AA2-shaped synthetic pool, tiny: ~3 + ~12 stims, ~10 + ~49 neurons, T ~ 40."""
    a = SyntheticAudioDataset("aa1", scale=scale, time_scale=time_scale, seed=1)
    b = SyntheticAudioDataset("aa2", scale=scale, time_scale=time_scale, seed=2)
    return a + b


def write_pool(root: str, storage_options: dict | None = None) -> str:
    """``small_pool()``'s sources saved under ``root`` and pooled at ``root/pool`` (returned)."""
    pool = small_pool()
    for d in pool.responses.sources:
        save_dataset(d, f"{root}/{d.name.lower()}", storage_options=storage_options)
    opened = [open_dataset(f"{root}/{d.name.lower()}", storage_options=storage_options)
              for d in pool.responses.sources]
    concat_neural_datasets(opened, names=pool.source_names, store=f"{root}/pool", storage_options=storage_options)
    return f"{root}/pool"


def item_key(item: dict) -> str:
    return item["stim_meta"]["uid"]


def batch_keys(batch) -> list[str]:
    metas = batch.stim_meta if isinstance(batch, CompactBatch) else batch["stim_meta"]
    return [m["uid"] for m in metas]


def tensors_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.to(b.dtype).nan_to_num(-7.0), b.nan_to_num(-7.0))


def items_equal(a: dict, b: dict) -> bool:
    return (a.keys() == b.keys() and tensors_equal(a["stims"], b["stims"])
            and torch.equal(a["valid_mask"], b["valid_mask"]) and a["stim_meta"] == b["stim_meta"]
            and len(a["responses"]) == len(b["responses"])
            and all(tensors_equal(x, y) and x.dtype == y.dtype for x, y in zip(a["responses"], b["responses"])))


def compact_equal(a: CompactBatch, b: CompactBatch) -> bool:
    """Equal up to the dtype of ``values``."""
    return all(tensors_equal(getattr(a, k), getattr(b, k)) for k in a.keys() if k != "stim_meta") \
        and a.stim_meta == b.stim_meta


def crossed_without_copy(batch, tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` of a batch received from a DataLoader worker is that worker's memory: a
    pooled buffer the batch leases (mapped once in this process, plain memory to torch), or fresh
    shared memory when every buffer of the worker's pool was in use."""
    leased = {lease.tensor.untyped_storage().data_ptr() for lease in batch._leases}
    return tensor.untyped_storage().data_ptr() in leased or tensor.is_shared()
