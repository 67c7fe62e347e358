#!/usr/bin/env python
"""deepSTRF 0.1.0's trainer consumes the dense batches ``StreamingNeuralDataset`` builds; prints ONE JSON line.

Two stages, two environments (deepSTRF is GPL-3.0 and only run as a black box):

    .venv/bin/python scripts/check_fitter.py write /tmp/dense.pt       # this package: stream a pool's batches
    /path/to/ref-venv/bin/python scripts/check_fitter.py fit /tmp/dense.pt   # deepSTRF: Fitter.fit on them

``write`` streams a small AA1 + AA2 pool from local Zarr with ``collate="dense"`` through
``loader(num_workers=2)`` (train stims shuffled, held-out stims in order), checks that each batch is
``neural_collate`` of the map-style items it holds, and saves the batches as plain dicts.
``fit`` trains deepSTRF's ``Linear`` model with ``deepSTRF.training.fitter.Fitter`` on them.
"""

from __future__ import annotations

import json
import sys
import tempfile


def write(path: str) -> dict:
    import torch

    import deepstrf
    from deepstrf.datasets.splits import heldout_split
    from deepstrf.datasets.synthetic import SyntheticAudioDataset
    from deepstrf.utils.data import neural_collate

    root = tempfile.mkdtemp(prefix="check-fitter-")
    urls = []
    for preset, seed in (("aa1", 1), ("aa2", 2)):
        urls.append(f"{root}/{preset}")
        deepstrf.save_dataset(SyntheticAudioDataset(preset, scale=0.1, time_scale=0.05, seed=seed), urls[-1],
                              progress=False)
    pool = deepstrf.concat_neural_datasets([deepstrf.open_dataset(u) for u in urls], names=["AA1", "AA2"],
                                           store=f"{root}/pool")
    split = heldout_split(pool, 0.2, seed=0)
    out, checked = {}, 0
    for part, stims, shuffle in (("train", split.train, True), ("val", split.test, False)):
        stream = deepstrf.StreamingNeuralDataset(f"{root}/pool", batch_size=4, collate="dense", shuffle=shuffle,
                                                 subset=stims)
        by_uid = {pool.stim_meta[s]["uid"]: s for s in stims}
        view = stream.dataset()
        batches = []
        for batch in stream.loader(num_workers=2):
            items = [view[view.visible_stims().index(by_uid[m["uid"]])] for m in batch["stim_meta"]]
            expected = neural_collate(items)
            for key in ("stims", "responses", "valid_mask"):
                assert torch.equal(batch[key].nan_to_num(-1), expected[key].nan_to_num(-1)), key
            checked += 1
            batches.append({k: batch[k] for k in ("stims", "responses", "valid_mask", "stim_meta")})
        out[part] = batches
    torch.save({"batches": out, "F": pool.F, "N": pool.N_neurons}, path)
    return {"stage": "write", "batches": {k: len(v) for k, v in out.items()}, "equal_to_neural_collate": checked,
            "shape": list(out["train"][0]["responses"].shape)}


def fit(path: str) -> dict:
    import torch
    from deepSTRF.models.audio.audio_zoo import Linear
    from deepSTRF.training.fitter import Fitter

    saved = torch.load(path, weights_only=False)
    torch.manual_seed(0)
    model = Linear(n_frequency_bands=saved["F"], temporal_window_size=9, out_neurons=saved["N"])
    history = Fitter(model, saved["batches"]["train"], saved["batches"]["val"], max_epochs=2, patience=5,
                     log_fn=lambda epoch: None).fit()
    return {"stage": "fit", "epochs": len(history), "train_loss": [round(h["train_loss"], 4) for h in history],
            "val_keys": sorted(k for k in history[-1] if k.startswith("val_"))}


if __name__ == "__main__":
    stage, target = sys.argv[1], sys.argv[2]
    print(json.dumps((write if stage == "write" else fit)(target)))
