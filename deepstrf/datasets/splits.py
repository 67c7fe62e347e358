"""Held-out stimulus splits, per source, reproducible from a seed.

Stims are held out *within each source* of a pool, so every source is
evaluated on stimuli the model never saw. A source's split depends only on
``(seed, source name, number of stims of that source)``: the same source
gets the same held-out stims whether it is split alone or inside any pool,
which makes "trained on the source alone" vs "trained on the pool" a fair
comparison.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .neural_dataset import NeuralDataset


def source_test_indices(n_stims: int, name: str, seed: int = 0, test_fraction: float = 0.2,
                        min_test: int = 1) -> list[int]:
    """Local indices (``0..n_stims-1``) held out for one source, sorted.

    ``round(test_fraction * n_stims)`` stims, at least ``min_test``, and at
    most ``n_stims - 1`` so that one stim is left to train on. ``seed`` is a whole number >= 0.
    """
    if int(seed) < 0:
        raise ValueError(f"seed must be a whole number of at least 0 (it seeds numpy's generator), got {seed!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if n_stims < 2:
        raise ValueError(f"source {name!r} has {n_stims} stim(s); a held-out split needs at least 2")
    n_test = min(max(min_test, round(test_fraction * n_stims)), n_stims - 1)
    rng = np.random.default_rng([int(seed), zlib.crc32(str(name).encode())])
    return sorted(rng.permutation(n_stims)[:n_test].tolist())


@dataclass(frozen=True)
class StimSplit:
    """Global stim indices for training and testing, with the per-source detail.

    ``excluded`` lists stims left out of training because they share a
    ``group_by`` value with a held-out stim (same sound in two sources).
    """

    train: list[int]
    test: list[int]
    by_source: dict[str, dict[str, list[int]]]
    seed: int
    test_fraction: float
    excluded: list[int] = field(default_factory=list)

    def select(self, ds: NeuralDataset, part: str) -> NeuralDataset:
        """Restrict ``ds`` to the ``"train"`` or ``"test"`` stims (its stim selection); returns ``ds``."""
        if part not in ("train", "test"):
            raise ValueError(f"part must be 'train' or 'test', got {part!r}")
        ds.select_stims(self.train if part == "train" else self.test)
        return ds

    def to_dict(self) -> dict:
        return {"train": self.train, "test": self.test, "by_source": self.by_source, "seed": self.seed,
                "test_fraction": self.test_fraction, "excluded": self.excluded}


def heldout_split(ds: NeuralDataset, test_fraction: float = 0.2, seed: int = 0, *, min_test: int = 1,
                  names: Sequence[str] | None = None, group_by: str | None = None) -> StimSplit:
    """Hold out stims within each source of ``ds`` (one source for a plain dataset).

    Sources are ``ds.source_blocks()``; ``names`` overrides their names (e.g.
    to split a single opened source exactly as it is split inside a pool).
    ``group_by`` names a ``stim_meta`` key identifying the same stimulus
    across sources: a training stim whose group also occurs among the test
    stims is excluded from training, so nothing leaks across the split.
    """
    blocks = ds.source_blocks()
    if names is not None:
        names = list(names)
        if len(names) != len(blocks):
            raise ValueError(f"names has {len(names)} entries, the dataset has {len(blocks)} source(s)")
        blocks = [(n, s, nr) for n, (_, s, nr) in zip(names, blocks)]
    seen = set()
    test, by_source = [], {}
    for name, stims, _ in blocks:
        if name in seen:
            raise ValueError(f"two sources are named {name!r}; pass distinct names")
        seen.add(name)
        local_test = set(source_test_indices(len(stims), name, seed, test_fraction, min_test))
        s_test = [stims.start + i for i in sorted(local_test)]
        s_train = [stims.start + i for i in range(len(stims)) if i not in local_test]
        by_source[name] = {"train": s_train, "test": s_test}
        test += s_test
    excluded = _drop_shared(ds, group_by, test, by_source)
    train = [s for part in by_source.values() for s in part["train"]]
    return StimSplit(train=train, test=test, by_source=by_source, seed=seed,
                     test_fraction=test_fraction, excluded=excluded)


def _drop_shared(ds: NeuralDataset, group_by: str | None, held: list[int],
                 by_source: dict[str, dict[str, list[int]]]) -> list[int]:
    """Remove from every source's ``"train"`` the stims whose ``group_by`` value occurs among the
    ``held`` stims (in place); returns the removed stims. Nothing is removed without ``group_by``."""
    if group_by is None:
        return []
    keys = {_key(ds.stim_meta[s], group_by) for s in held} - {None}
    removed = []
    for part in by_source.values():
        shared = {s for s in part["train"] if _key(ds.stim_meta[s], group_by) in keys}
        removed += [s for s in part["train"] if s in shared]
        part["train"] = [s for s in part["train"] if s not in shared]
    return removed


def _key(meta: dict, key: str):
    v = meta.get(key)
    try:
        hash(v)
    except TypeError:
        return repr(v)
    return v


def train_val_test_split(ds: NeuralDataset, test_fraction: float = 0.2, val_fraction: float = 0.1,
                         seed: int = 0, *, group_by: str | None = None) -> dict[str, list[int]]:
    """Global stim indices ``{"train", "val", "test", "excluded"}``, all held out within each source.

    ``test`` is :func:`heldout_split` (the demo's split: the same stims for the same
    ``seed``); ``val`` is ``val_fraction`` of each source's remaining training stims (at
    least one, while one is left to train on; none from a source with fewer than 2), chosen
    the same way; ``train`` is the rest. ``val_fraction=0`` gives an empty ``val``. With
    ``group_by``, a stim sharing its group with a test or a validation stim is left out of
    ``train`` too; ``excluded`` lists the stims so left out.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1) (0: no validation stims), got {val_fraction!r}")
    split = heldout_split(ds, test_fraction, seed=seed, group_by=group_by)
    by_source = {name: {"train": list(part["train"])} for name, part in split.by_source.items()}
    val: list[int] = []
    if val_fraction:
        for name, part in by_source.items():
            if len(part["train"]) >= 2:
                local = set(source_test_indices(len(part["train"]), f"{name}/val", seed, val_fraction))
                val += [s for i, s in enumerate(part["train"]) if i in local]
                part["train"] = [s for i, s in enumerate(part["train"]) if i not in local]
    excluded = split.excluded + _drop_shared(ds, group_by, val, by_source)
    train = [s for part in by_source.values() for s in part["train"]]
    return {"train": train, "val": val, "test": split.test, "excluded": excluded}
