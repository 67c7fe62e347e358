"""Block-sparse coverage (pool format 2.0) agrees with the dense mask; the dense size guard;
format-1 pools; lazily opened sources."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import zarr

import deepstrf
from deepstrf.datasets import coverage as coverage_module
from deepstrf.datasets.coverage import Coverage, CoverageTooLargeError
from deepstrf.datasets.synthetic import SyntheticAudioDataset
from deepstrf.store import format as fmt
from deepstrf.utils.data import concat_neural_datasets
from toydata import ToyAudio


def random_coverage(rng: np.random.Generator) -> tuple[Coverage, np.ndarray]:
    """A random block-diagonal coverage (empty, full and partial blocks) and its dense mask."""
    K = int(rng.integers(1, 6))
    heights, widths = rng.integers(0, 5, K), rng.integers(0, 6, K)
    dense = np.zeros((heights.sum(), widths.sum()), dtype=bool)
    masks, s0, n0 = [], 0, 0
    for h, w in zip(heights, widths):
        kind = rng.integers(3)
        block = np.ones((h, w), bool) if kind == 0 else rng.random((h, w)) < (0.5 if kind == 1 else 0.05)
        dense[s0:s0 + h, n0:n0 + w] = block
        masks.append(None if kind == 0 else block)
        s0, n0 = s0 + h, n0 + w
    return Coverage(np.concatenate([[0], np.cumsum(heights)]), np.concatenate([[0], np.cumsum(widths)]), masks), dense


@pytest.mark.parametrize("seed", range(40))
def test_every_query_agrees_with_the_dense_mask(seed):
    rng = np.random.default_rng(seed)
    cov, dense = random_coverage(rng)
    S, N = dense.shape
    assert cov.shape == (S, N) and cov.count() == dense.sum()
    assert torch.equal(cov.to_dense(), torch.from_numpy(dense))
    assert (cov.stim_counts() == dense.sum(1)).all() and (cov.neuron_counts() == dense.sum(0)).all()
    for s in range(S):
        assert (cov.row(s) == np.flatnonzero(dense[s])).all()
    for n in range(N):
        assert (cov.column(n) == np.flatnonzero(dense[:, n])).all()
    stims, neurons = rng.integers(0, max(S, 1), 4) if S else [], rng.integers(0, max(N, 1), 5) if N else []
    assert (cov.cells(stims, neurons) == dense[np.ix_(stims, neurons)]).all()
    sel_n, sel_s = rng.random(N) < 0.4, rng.random(S) < 0.4
    assert (cov.stims_with_data(sel_n) == dense[:, sel_n].any(1)).all()
    assert (cov.neurons_with_data(sel_s) == dense[sel_s].any(0)).all()
    if S and N:
        a, (c, d) = sorted(rng.integers(0, S + 1, 2)), sorted(rng.integers(0, N + 1, 2))
        assert torch.equal(cov.to_dense(slice(*a), slice(c, d)), torch.from_numpy(dense[a[0]:a[1], c:d]))
    round_trip = Coverage.block_diagonal([cov, Coverage.dense(dense)])
    assert torch.equal(round_trip.to_dense(), torch.from_numpy(np.block(
        [[dense, np.zeros_like(dense)], [np.zeros_like(dense), dense]])))


def _masked_toy(seed: int, rng: np.random.Generator) -> ToyAudio:
    ds = ToyAudio(seed, S=int(rng.integers(2, 5)), N=int(rng.integers(2, 6)))
    for s in range(ds.get_S()):
        for n in range(ds.N_neurons):
            if rng.random() < 0.3:
                ds.responses[s][n] = torch.full((1, 1), float("nan"))
    ds._invalidate_nrn_masks()
    return ds


def _dense_selection(ds) -> tuple[list[int], list[int]]:
    """§3 visibility computed from the dense mask, as deepSTRF does."""
    masks = ds.nrn_masks
    base = list(ds.I) if ds.I else list(range(ds.N_neurons))
    stims = list(range(ds.get_S())) if ds.S_sel is None else list(ds.S_sel)
    selected = base if ds.S_sel is None else [n for n in base if stims and bool(masks[stims][:, n].any())]
    visible = [s for s in stims if selected and bool(masks[s, selected].any())]
    return selected, sorted(set(visible))


@pytest.mark.parametrize("seed", range(12))
def test_selections_on_random_pools_match_the_dense_rule(seed):
    rng = np.random.default_rng(100 + seed)
    parts = [_masked_toy(seed * 10 + k, rng) for k in range(int(rng.integers(1, 4)))]
    pool = concat_neural_datasets(parts) if len(parts) > 1 else parts[0]
    S, N = pool.get_S(), pool.N_neurons
    selections = [lambda d: None,
                  lambda d: d.select_stims(sorted(rng.choice(S, int(rng.integers(1, S + 1)), replace=False).tolist())),
                  lambda d: d.select_population(sorted(rng.choice(N, int(rng.integers(1, N + 1)), replace=False).tolist())),
                  lambda d: d.select_pop_by_stim_predicate(lambda m: m["uid"].endswith(("0", "2"))),
                  lambda d: (d.select_stim(int(rng.integers(S))), d.select_neuron(int(rng.integers(N))))]
    for select in selections:
        pool.reset_pop_selection()
        pool.reset_stim_selection()
        select(pool)
        selected, visible = _dense_selection(pool)
        assert pool.selected_neurons() == selected and pool.visible_stims() == visible
        assert len(pool) == len(visible)
        for i in range(len(pool)):
            item = pool[i]
            assert torch.equal(item["valid_mask"], pool.nrn_masks[visible[i], selected])


def test_dense_mask_guard_says_how_big_and_where_to_look(monkeypatch):
    ds = concat_neural_datasets([ToyAudio(1, S=3, N=4), ToyAudio(2, S=5, N=6)])
    monkeypatch.setattr(coverage_module, "MAX_DENSE_BYTES", 8 * 10 - 1)
    with pytest.raises(CoverageTooLargeError, match=r"8 stims x 10 neurons would take 80 B.*ds\.coverage"):
        ds.nrn_masks
    assert len(ds) == 8 and ds.coverage.to_dense(slice(0, 3)).shape == (3, 10)  # everything else still works


@pytest.fixture
def sources(tmp_path):
    urls = []
    for name, seed in (("aa1", 1), ("aa2", 2), ("aa2", 3)):
        urls.append(str(tmp_path / f"{name}-{seed}.zarr"))
        deepstrf.save_dataset(SyntheticAudioDataset(name, scale=0.05, time_scale=0.02, seed=seed), urls[-1],
                              progress=False)
    return urls


def _write_v1_pool(url: str, opened, names, refs=None) -> None:
    """A pool as deepstrf 0.1 wrote it (format 1.0): sources in the attributes, dense coverage."""
    from deepstrf.store.integrity import fingerprint

    memory = concat_neural_datasets(opened, names=names)
    refs = refs or [os.path.basename(d.store_url) for d in opened]
    sources = [{"name": n, "ref": ref, "fingerprint": d.fingerprint, "n_stims": d.get_S(),
                "n_neurons": d.N_neurons, "kind": "audio", "card": None} for d, n, ref in zip(opened, names, refs)]
    attrs = {"format": "deepstrf.pool", "format_version": "1.0", "kind": "audio", "class_name": "AudioNeuralDataset",
             "dt_ms": memory.dt, "n_stims": memory.get_S(), "n_neurons": memory.N_neurons, "sources": sources,
             "F": memory.F}
    attrs["fingerprint"] = fingerprint(attrs)
    group = zarr.create_group(url, attributes=attrs, zarr_format=3)
    group.create_array("coverage", data=memory.nrn_masks.numpy())
    with pytest.warns(UserWarning, match="Consolidated metadata"):
        zarr.consolidate_metadata(url)


def test_format_1_pools_still_open(sources, tmp_path):
    opened = [deepstrf.open_dataset(u) for u in sources]
    _write_v1_pool(str(tmp_path / "old.zarr"), opened, ["a", "b", "c"])
    old = deepstrf.open_dataset(str(tmp_path / "old.zarr"))
    new = concat_neural_datasets(opened, names=["a", "b", "c"], store=str(tmp_path / "new.zarr"))
    assert torch.equal(old.nrn_masks, new.nrn_masks) and old.stim_meta == list(new.stim_meta)
    assert len(old) == len(new)
    assert all(torch.equal(a.nan_to_num(-1), b.nan_to_num(-1)) for a, b in zip(old[2]["responses"], new[2]["responses"]))
    # rewriting it as format 2 is one concat of the opened old pool
    rewritten = concat_neural_datasets([old], store=str(tmp_path / "rewritten.zarr"))
    assert json.load(open(tmp_path / "rewritten.zarr" / "zarr.json"))["attributes"]["format_version"] == \
        fmt.POOL_FORMAT_VERSION
    assert rewritten.source_names == ["a", "b", "c"] and torch.equal(rewritten.nrn_masks, new.nrn_masks)


def test_verify_reads_no_source_outside_the_allowed_roots_of_a_format_1_pool(sources, tmp_path, http_server):
    """A format-1 pool opens every source at once: verify checks the references first."""
    import shutil

    from deepstrf.store.location import Location
    from deepstrf.store.pool_commands import verify_pool

    shutil.copytree(sources[0], http_server.root / "v1-source.zarr")
    _write_v1_pool(str(tmp_path / "old.zarr"), [deepstrf.open_dataset(sources[0])], ["a"],
                   refs=[http_server.url("v1-source.zarr")])
    before = len(http_server.requests)
    problems = verify_pool(Location.parse(str(tmp_path / "old.zarr")))
    assert len(problems) == 1 and "outside the pool's root" in problems[0], problems
    assert not [r for r in http_server.requests[before:] if "v1-source" in r[1]]


def test_a_lazy_pool_opens_no_source_and_streams(sources, tmp_path):
    from deepstrf.store.dataset import storage_io
    from deepstrf.stream import StreamingNeuralDataset
    from stream_helpers import loader_timeout

    url = str(tmp_path / "pool.zarr")
    concat_neural_datasets([deepstrf.open_dataset(u) for u in sources], names=["a", "b", "c"], store=url)
    pool = deepstrf.open_dataset(url, check_sources=False)  # as a pool of more than 64 sources opens
    assert not any(p.responses.handle.is_open() for p in pool.responses.sources)
    assert storage_io(pool) == (0, 0)
    pool.select_pop_by_nrn_attr("dataset", "b")
    assert pool.selected_neurons() == list(pool.source_blocks()[1][2])
    assert not any(p.responses.handle.is_open() for p in pool.responses.sources)  # selection reads no source
    pool.reset_pop_selection()
    ds = StreamingNeuralDataset(pool, batch_size=4, seed=1)  # workers receive it unopened and open what they read
    loader = ds.loader(num_workers=2, timeout=loader_timeout(2), read_while_starting=False)  # workers read all
    seen = [m["uid"] for batch in loader for m in batch.stim_meta]
    assert sorted(seen) == sorted(m["uid"] for m in deepstrf.open_dataset(url).stim_meta)
    assert not any(p.responses.handle.is_open() for p in pool.responses.sources)  # not in this process


def test_a_pool_makes_a_sources_objects_only_when_it_is_read(sources, tmp_path):
    import pickle

    url = str(tmp_path / "pool.zarr")
    concat_neural_datasets([deepstrf.open_dataset(u) for u in sources], names=["a", "b", "c"], store=url)
    pool = deepstrf.open_dataset(url, check_sources=False)
    parts = pool.responses.sources
    len(pool), pool.select_pop_by_nrn_attr("dataset", "b"), pool.reset_pop_selection(), pool.nrn_masks
    assert parts.made() == []  # opening, counting, selecting and the coverage make none
    _, stims_b, _ = pool.source_blocks()[1]
    item = pool[pool.visible_stims().index(stims_b.start)]
    assert [p.name for p in parts.made()] == ["b"]
    assert pool.stims[stims_b.start].shape == item["stims"].shape and len(parts.made()) == 1
    again = pickle.loads(pickle.dumps(pool))  # a pickled pool carries all its sources
    assert len(again.responses.sources.made()) == 3
    assert torch.equal(again.stims[0], deepstrf.open_dataset(url).stims[0])


def test_coverage_plot_needs_no_dense_mask(monkeypatch, tmp_path):
    from deepstrf.store import pool_commands

    rng = np.random.default_rng(7)
    ds = concat_neural_datasets([_masked_toy(k, rng) for k in range(4)])
    dense = ds.nrn_masks.numpy().astype(float)
    ds._invalidate_nrn_masks()
    monkeypatch.setattr(coverage_module, "MAX_DENSE_BYTES", 1)
    monkeypatch.setattr(pool_commands, "MAX_PIXELS", 3)
    image, fs, fn = pool_commands._reduce(ds.coverage)
    S, N = dense.shape
    padded = np.zeros((image.shape[0] * fs, image.shape[1] * fn))
    padded[:S, :N] = dense
    expected = padded.reshape(image.shape[0], fs, image.shape[1], fn).mean(axis=(1, 3))
    assert fs * fn > 1 and np.allclose(image, expected)
    pool_commands.plot_coverage(ds, str(tmp_path / "coverage.png"))
    assert (tmp_path / "coverage.png").stat().st_size > 0
