"""``deepstrf demo``: pool three synthetic "labs", stream the pool, fit one model, evaluate per source.

Steps (each shown with a progress bar):

1. generate synthetic LN-Poisson sources shaped like AA1, AA2 and NS1 and
   convert them explicitly to a common dt (5 ms) and F (32 bands);
2. save each as a Zarr source store, open them, write a pool store that
   references them (:func:`deepstrf.concat_neural_datasets` with ``store=``);
3. hold out stims within each source (seeded);
4. stream the pool's training stims with :class:`deepstrf.StreamingNeuralDataset`
   and train one model (shared causal conv backbone, per-neuron heads,
   masked Poisson loss on compact batches);
5. score it per source on the held-out stims (CC vs ground truth, raw CC,
   normalised CC, bits/spike over a mean-rate baseline);
6. train the same model on the smaller source alone and compare;
7. write ``report.md``, ``report.json`` and PNG figures to ``--out``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..datasets.neural_dataset import NeuralDataset
from ..datasets.splits import StimSplit, heldout_split
from . import DEFAULTS
from .evaluation import per_neuron_table, score
from .report import write_report
from .sources import COMMON_F, DemoSource, TruthLookup, make_sources
from .training import TrainConfig, build_model, fit, mean_counts

COMPARE_SOURCE = "AA1"  # the smaller source: trained alone vs in the pool
TEST_FRACTION = 0.2
BATCH_SIZE = 4
EVAL_BATCH_SIZE = 8


def log(msg: str) -> None:
    print(f"[deepstrf demo] {msg}", file=sys.stderr, flush=True)


# -- data access: the one place that knows where the data lives -------------------------
@dataclass
class DemoData:
    """The pool and the comparison source, opened lazily from their stores."""

    pool: NeuralDataset
    pool_url: str
    source_urls: dict[str, str]
    single: NeuralDataset
    single_url: str
    storage_options: dict | None

    def batches(self, which: str, stims: list[int], *, shuffle: bool, seed: int, batch_size: int,
                workers: int):
        """``epoch -> iterable of CompactBatch`` streaming ``stims`` of the pool or the single source."""
        from ..stream import StreamingNeuralDataset

        url = self.pool_url if which == "pool" else self.single_url
        sds = StreamingNeuralDataset(url, storage_options=self.storage_options, batch_size=batch_size,
                                     collate="compact", shuffle=shuffle, seed=seed, stims=stims)
        self.streams.append(sds)

        def epoch_batches(epoch: int):
            sds.set_epoch(epoch)
            return sds.loader(num_workers=workers)

        return epoch_batches

    def __post_init__(self) -> None:
        self.streams: list = []


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if "://" in root else os.path.join(root, name)


def prepare_data(sources: list[DemoSource], store_root: str, storage_options: dict | None,
                 overwrite: bool) -> DemoData:
    """Save the converted sources as Zarr stores, open them and write the pool store."""
    import deepstrf
    from ..errors import StoreExistsError, command_line_words

    urls = {}
    try:
        for src in sources:
            url = _join(store_root, f"{src.name.lower()}.zarr")
            log(f"saving {src.name} ({src.converted.get_S()} stims x {src.converted.N_neurons} neurons) -> {url}")
            deepstrf.save_dataset(src.converted, url, storage_options=storage_options, overwrite=overwrite,
                                  progress=True)
            urls[src.name] = url
        opened = [deepstrf.open_dataset(urls[s.name], storage_options=storage_options) for s in sources]
        pool_url = _join(store_root, "pool.zarr")
        log(f"writing pool -> {pool_url} (references only, no data copied)")
        pool = deepstrf.concat_neural_datasets(opened, names=[s.name for s in sources], store=pool_url,
                                               storage_options=storage_options, overwrite=overwrite)
    except StoreExistsError as e:
        said = command_line_words(str(e))
        raise SystemExit(f"deepstrf demo: {said}\nRe-run with --overwrite to replace the stores of an earlier run, "
                         "or choose another --out/--store.") from e
    single = deepstrf.open_dataset(urls[COMPARE_SOURCE], storage_options=storage_options)
    return DemoData(pool, pool_url, urls, single, urls[COMPARE_SOURCE], storage_options)


# -- the job ---------------------------------------------------------------------------------------
def _setting(args: Any, name: str) -> Any:
    v = getattr(args, name, None)
    return DEFAULTS[name] if v is None else v


def command_line(argv: list[str]) -> str:
    """The command as typed, with storage option values redacted (they may hold secrets)."""
    out, redact_next = ["deepstrf"], False
    for a in argv:
        if redact_next:
            a, redact_next = a.partition("=")[0] + "=<redacted>", False
        elif a in ("-S", "--storage-option"):
            redact_next = True
        elif a.startswith("--storage-option=") or (a.startswith("-S") and len(a) > 2):
            a = a.partition("=")[0] + "=<redacted>"
        out.append(shlex.quote(a))
    if len(out) == 1 or out[1] != "demo":
        out.insert(1, "demo")
    return " ".join(out)


def source_groups(ds: NeuralDataset) -> list[str]:
    """Source name of every neuron of ``ds`` (global id order)."""
    groups = [""] * ds.N_neurons
    for name, _, neurons in ds.source_blocks():
        for n in neurons:
            groups[n] = name
    return groups


def main(args: Any) -> int:
    t_start = time.perf_counter()
    phases: dict[str, float] = {}
    threads = max(1, min(2, os.cpu_count() or 1))
    torch.set_num_threads(threads)
    scale, time_scale = float(_setting(args, "scale")), float(_setting(args, "time_scale"))
    epochs, workers, seed = int(_setting(args, "epochs")), int(_setting(args, "workers")), int(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store_root = args.store or str(out / "stores")
    storage_options = getattr(args, "storage_options", None)
    cfg = TrainConfig(epochs=epochs, batch_size=BATCH_SIZE, seed=seed)

    def phase(name: str, t0: float) -> float:
        phases[name] = time.perf_counter() - t0
        return time.perf_counter()

    t = time.perf_counter()
    log(f"1/7 generating synthetic AA1/AA2/NS1-like sources (scale {scale}, time scale {time_scale}, seed {seed})")
    sources = make_sources(scale, time_scale, seed)
    for src in sources:
        log(f"    {src.name}: " + ("; ".join(src.conversions) or "no conversion needed"))
    t = phase("generate", t)

    log(f"2/7 writing Zarr sources and a pool under {store_root}")
    data = prepare_data(sources, store_root, storage_options, bool(getattr(args, "overwrite", False)))
    pool = data.pool
    t = phase("save + pool", t)

    log("3/7 holding out stims within each source")
    split = heldout_split(pool, TEST_FRACTION, seed=seed)
    single_split = heldout_split(data.single, TEST_FRACTION, seed=seed, names=[COMPARE_SOURCE])
    offset = dict((n, s.start) for n, s, _ in pool.source_blocks())[COMPARE_SOURCE]
    if [s + offset for s in single_split.test] != split.by_source[COMPARE_SOURCE]["test"]:
        raise RuntimeError("held-out stims of the single source differ from the pool's: the split is not per source")
    truth = TruthLookup(sources)
    groups = source_groups(pool)
    pool_uids = [m["uid"] for m in pool.nrn_meta]
    single_uids = [m["uid"] for m in data.single.nrn_meta]

    log(f"4/7 training one model on the pool ({len(split.train)} training stims, {pool.N_neurons} neurons)")
    train_pool = data.batches("pool", split.train, shuffle=True, seed=seed, batch_size=cfg.batch_size,
                              workers=workers)
    test_pool = data.batches("pool", split.test, shuffle=False, seed=seed, batch_size=EVAL_BATCH_SIZE,
                             workers=workers)
    baseline = mean_counts(train_pool(0), pool.N_neurons)
    model = build_model(pool.N_neurons, COMMON_F, cfg, baseline)
    hist = fit(model, train_pool, cfg, heldout=test_pool, desc="pool")
    stream_stats = data.streams[0].stats()
    t = phase("train pooled", t)

    log("5/7 scoring the pooled model per source on held-out stims")
    scores = score(model, test_pool(cfg.epochs), neuron_uids=pool_uids, baseline=baseline, truth=truth, seed=seed)
    per_source = scores.aggregate(groups)
    for name, a in per_source.items():
        log(f"    {name}: CC vs truth {a['cc_truth']['median']:.3f}, raw CC {a['cc_raw']['median']:.3f}, "
            f"CCnorm {a['cc_norm']['median']:.3f}, {a['bits_per_spike']:.3f} bits/spike over baseline")
    t = phase("evaluate pooled", t)

    log(f"6/7 training the same model on {COMPARE_SOURCE} alone")
    train_one = data.batches("single", single_split.train, shuffle=True, seed=seed, batch_size=cfg.batch_size,
                             workers=workers)
    test_one = data.batches("single", single_split.test, shuffle=False, seed=seed, batch_size=EVAL_BATCH_SIZE,
                            workers=workers)
    base_one = mean_counts(train_one(0), data.single.N_neurons)
    steps_per_epoch = math.ceil(len(single_split.train) / cfg.batch_size)
    variants = {
        "single_same_steps": (f"{COMPARE_SOURCE} alone, same gradient steps",
                              dataclasses.replace(cfg, epochs=max(1, math.ceil(hist.steps / steps_per_epoch)))),
        "single_same_epochs": (f"{COMPARE_SOURCE} alone, same epochs", cfg),
    }
    singles = {}
    for key, (label, vcfg) in variants.items():
        m = build_model(data.single.N_neurons, COMMON_F, vcfg, base_one)
        h = fit(m, train_one, vcfg, heldout=test_one, desc=key.replace("_", " "))
        sc = score(m, test_one(vcfg.epochs), neuron_uids=single_uids, baseline=base_one, truth=truth, seed=seed)
        singles[key] = (label, m, h, sc)
    t = phase("train + evaluate single source", t)

    log("7/7 writing the report and figures")
    rep = build_report(args, cfg, sources, data, split, model, hist, scores, per_source, groups, singles,
                       truth, stream_stats)
    rep["runtime"] = {"total_s": time.perf_counter() - t_start, "threads": threads, "workers": workers,
                      "phases": phases}
    rep = write_report(rep, out)
    phases["report"] = time.perf_counter() - t
    log(f"done in {time.perf_counter() - t_start:.0f} s: {out / 'report.md'}")
    return 0


def build_report(args, cfg, sources, data, split: StimSplit, model, hist, scores, per_source, groups, singles,
                 truth, stream_stats) -> dict:
    pool = data.pool
    mask = pool.nrn_masks
    blocks = [{"name": n, "stims": [s.start, s.stop], "neurons": [r.start, r.stop]} for n, s, r in pool.source_blocks()]
    table = per_neuron_table(scores, groups)
    lo, hi = next((b["neurons"] for b in blocks if b["name"] == COMPARE_SOURCE))
    pooled_res = scores.result()
    pooled_cmp = scores.aggregate(groups)[COMPARE_SOURCE]
    variants = {"pooled": {"label": "the pool (AA1 + AA2 + NS1)", "steps": hist.steps, "scores": pooled_cmp}}
    per_neuron = {"pooled": pooled_res["cc_truth"][lo:hi]}
    curves = {"pooled": {"label": "pool", **hist.to_dict()}}
    for key, (label, _, h, sc) in singles.items():
        variants[key] = {"label": label, "steps": h.steps,
                         "scores": sc.aggregate([COMPARE_SOURCE] * sc.n_neurons)[COMPARE_SOURCE]}
        per_neuron[key] = sc.result()["cc_truth"]
        curves[key] = {"label": label, **h.to_dict()}
    med = {k: v["scores"]["cc_truth"]["median"] for k, v in variants.items()}
    paired = {}
    for key in singles:
        a, b = np.asarray(per_neuron["pooled"], float), np.asarray(per_neuron[key], float)
        ok = np.isfinite(a) & np.isfinite(b)
        paired[key] = {"pooled_better": int((a[ok] > b[ok]).sum()), "n": int(ok.sum())}
    cmd = command_line(sys.argv[1:])
    return {
        "version": 1,
        "command": cmd,
        "config": {"scale": float(_setting(args, "scale")), "time_scale": float(_setting(args, "time_scale")),
                   "epochs": cfg.epochs, "seed": cfg.seed, "batch_size": cfg.batch_size, "lr": cfg.lr,
                   "test_fraction": TEST_FRACTION, "store_root": args.store or str(Path(args.out) / "stores")},
        "sources": [{"name": s.name, "S": s.converted.get_S(), "N": s.converted.N_neurons,
                     "native_dt_ms": s.synthetic.dt, "native_F": s.synthetic.F, "conversions": s.conversions,
                     "url": data.source_urls[s.name]} for s in sources],
        "pool": {"url": data.pool_url, "S": pool.get_S(), "N": pool.N_neurons, "dt_ms": pool.dt,
                 "F": getattr(pool, "F", None), "valid_fraction": float(mask.float().mean())},
        "coverage": {"rows": ["".join("1" if v else "0" for v in row) for row in mask.tolist()],
                     "blocks": blocks, "valid_fraction": float(mask.float().mean())},
        "split": split.to_dict(),
        "model": {"class": type(model).__name__, "params": model.count_trainable_params(), **model.config},
        "scores": {"per_source": per_source, "per_neuron": table},
        "pooling": {"source": COMPARE_SOURCE, "variants": variants, "per_neuron": per_neuron, "paired": paired,
                    "delta": {**med, "pooled_minus_same_steps": med["pooled"] - med["single_same_steps"],
                              "pooled_minus_same_epochs": med["pooled"] - med["single_same_epochs"]}},
        "learning_curves": curves,
        "example": example_neuron(data, split, model, singles, pooled_res, truth, lo, hi),
        "streaming": {"mode": "store URLs, compact batches", "train_epoch_stats": stream_stats},
    }


@torch.no_grad()
def example_neuron(data: DemoData, split: StimSplit, model, singles, pooled_res, truth: TruthLookup,
                   lo: int, hi: int) -> dict:
    """The comparison source's median neuron (pooled CC vs truth) on its first recorded held-out stim."""
    pool = data.pool
    cc = pooled_res["cc_truth"][lo:hi]
    finite = np.flatnonzero(np.isfinite(cc))
    n_local = int(finite[np.argsort(cc[finite])[len(finite) // 2]])
    n = lo + n_local
    mask = pool.nrn_masks
    stim = next(s for s in split.by_source[COMPARE_SOURCE]["test"] if bool(mask[s, n]))
    cell = pool.responses[stim][n].double()
    x = pool.stims[stim][None]
    uid_s, uid_n = pool.stim_meta[stim]["uid"], pool.nrn_meta[n]["uid"]
    src, s_local = truth.stim[uid_s]
    gt = truth.sources[src].truth(s_local)[truth.neuron[uid_n][1]]
    T = cell.shape[1]
    model.eval()
    pred = {"pooled": model(x, neuron_index=[n])[0, 0, 0, :T]}
    labels = {"pooled": "trained on the pool"}
    for key, (label, m, _, _) in singles.items():
        m.eval()
        pred[key] = m(x, neuron_index=[n_local])[0, 0, 0, :T]
        labels[key] = label
    return {"source": COMPARE_SOURCE, "neuron": n, "neuron_uid": uid_n, "stim": stim, "stim_uid": uid_s,
            "dt_ms": pool.dt, "repeats": int(cell.shape[0]), "psth": cell.mean(0).tolist(),
            "truth": gt[:T].tolist(), "pred": {k: v.tolist() for k, v in pred.items()}, "labels": labels,
            "cc_truth_pooled": float(cc[n_local])}
