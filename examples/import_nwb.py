"""User story: import two labs' NWB sessions as source stores, pool them with a synthetic source,
stream the pool and fit one model.

Lab A published a session with sound waveforms and a trials table; lab B one with precomputed
spectrograms and its own intervals table (generated here with pynwb; pass --nwb to import your own
files, local paths or s3:// / https:// URLs). Each becomes one source store whose dataset card is
filled from the file and records every conversion choice.

    python examples/import_nwb.py --root /tmp/nwb-demo [--tiny] [--nwb FILE_OR_URL ...]
"""

from __future__ import annotations

import os
import tempfile

import deepstrf
from deepstrf.datasets.synthetic import SourceSpec, SyntheticAudioDataset
from deepstrf.demo.training import TrainConfig, build_model, fit
from deepstrf.io import import_sessions
from deepstrf.testing.nwb import SessionSpec, write_session

from _common import join, parser, storage_options

DT_MS = 10.0


def make_sessions(folder: str, tiny: bool) -> tuple[str, str]:
    """Two labs' NWB files, different layouts (what a download from an archive would give)."""
    n_units, n_stims, repeats = (4, 3, 3) if tiny else (40, 20, 10)
    a = os.path.join(folder, "lab-a-session.nwb")
    b = os.path.join(folder, "lab-b-session.nwb")
    write_session(a, SessionSpec(session_id="lab-a-2025-03-01", lab="Lab A", n_units=n_units, n_stims=n_stims,
                                 repeats=repeats, stim_kind="waveform", audio_fs=16000.0))
    write_session(b, SessionSpec(session_id="lab-b-0042", lab="Lab B", n_units=n_units, n_stims=n_stims,
                                 repeats=repeats, stim_kind="spectrogram", spec_bands=32,
                                 table="sound_presentations", stim_column="sound",
                                 unit_columns=("quality", "depth_um"), seed=1))
    return a, b


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--nwb", nargs="+", default=None, help="NWB files or URLs to import (trials + stim_name)")
    args = p.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="deepstrf-nwb-")
    so = storage_options(args)
    stores = join(root, "stores")

    # 1. import: one store per session; every conversion choice is an argument, recorded in the store
    #    (overwrite: a re-run replaces the stores it imported before, whose inputs were other files)
    if args.nwb:
        results = import_sessions(stores, args.nwb, dt_ms=DT_MS, storage_options=so, jobs=2, overwrite=True)
    else:
        with tempfile.TemporaryDirectory(prefix="nwb-files-") as folder:
            a, b = make_sessions(folder, args.tiny)
            results = import_sessions(stores, [a], dt_ms=DT_MS, license="CC-BY-4.0", storage_options=so,
                                      overwrite=True)
            results += import_sessions(stores, [b], dt_ms=DT_MS, presentations="sound_presentations",
                                       stim_column="sound", license="CC-BY-4.0", storage_options=so, overwrite=True)
    for r in results:
        if r.status == "failed":
            raise SystemExit(r.error)
        print(f"{r.status}: {r.source} -> {r.store} ({r.n_stims} stims x {r.n_neurons} units)")
    sources = [deepstrf.open_dataset(r.store, storage_options=so) for r in results]
    card = sources[0].card
    print(f"card: {card['name']} | {card['lab']}, {card['institution']} | {card['citation']} | {card['license']}")
    print(f"conversion: {card['nwb_import']['resolved']}")

    # 2. pool with a synthetic source of the same bin width and band count
    F = sources[0].F
    syn = SyntheticAudioDataset(SourceSpec("SYN", 3, 5, F, DT_MS, (40, 60), 3, 1.0, "mouse", ("A1",)), seed=3)
    deepstrf.save_dataset(syn, join(root, "syn.zarr"), storage_options=so, overwrite=True)
    sources.append(deepstrf.open_dataset(join(root, "syn.zarr"), storage_options=so))
    pool_url = join(root, "pool.zarr")
    names = [s.name for s in sources]
    deepstrf.concat_neural_datasets(sources, names=names, store=pool_url, storage_options=so, overwrite=True)
    pool = deepstrf.open_dataset(pool_url, storage_options=so)
    print(f"pool {pool.get_S()} stims x {pool.N_neurons} neurons from {names}")

    # 3. stream the pool and fit the demo's model a few epochs
    stream = deepstrf.StreamingNeuralDataset(pool_url, storage_options=so, batch_size=4, collate="compact")

    def batches(epoch):
        stream.set_epoch(epoch)
        return stream.loader()

    cfg = TrainConfig(epochs=2 if args.tiny else 10, batch_size=4, channels=(8,), kernel_f=(3,), kernel_t=(6,))
    hist = fit(build_model(pool.N_neurons, F, cfg), batches, cfg, progress=not args.tiny)
    print(f"trained {hist.steps} steps, loss {hist.train_loss[0]:.4f} -> {hist.train_loss[-1]:.4f}")


if __name__ == "__main__":
    main()
