"""Conformance suite of the Zarr source store, over memory://, a local folder and S3 (moto)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from deepstrf.datasets.concat import DuplicateUIDWarning
from deepstrf.cli import main as cli_main
from deepstrf.datasets.audio import AudioNeuralDataset
from deepstrf.datasets.neural_dataset import NeuralDataset
from deepstrf.datasets.synthetic import SyntheticAudioDataset
from deepstrf.datasets.video import VideoNeuralDataset
from deepstrf.datasets import views
from deepstrf.datasets.views import ResponseGrid, is_missing, missing_sentinel
from deepstrf.errors import (FormatVersionError, IncompleteStoreError, IntegrityError, ReadOnlyStoreError,
                             SourceUnreadableError, StoreError, StoreExistsError, StoreNotFoundError)
from deepstrf.store import ZarrResponseGrid, ZarrStims, format as fmt, open_dataset, save_dataset, shards
from deepstrf.store.jsonmeta import encode_columns
from deepstrf.store.dataset import load_indexes, source_readers, storage_io, warm_reads
from deepstrf.store.location import Location
from deepstrf.store.s3clients import SharedTLSSession, shared_s3_session
from deepstrf.store.reader import SourceReader
from deepstrf.utils.data import concat_neural_datasets, neural_collate

from stream_helpers import LOADER_TIMEOUT_S, write_pool


# -- small sources made here ------------------------------------------------------------
def audio_source() -> NeuralDataset:
    """3 x 10 AA1-shaped synthetic counts, in memory, with mixed-schema metadata."""
    ds = SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.02, seed=3).to_memory()
    ds.stim_meta[0].update(tags=("song", 2), weights=np.arange(3, dtype=np.int16),
                           gain=torch.tensor([1.5, -2.0]), level=float("nan"), by_id={1: "x", "2": [None, True]})
    ds.stim_meta[1] = {"uid": "odd-one", "nested": {"deep": [1, 2.5, {"k": "v"}]}}
    ds.nrn_meta[2]["depth_um"] = 1250.5
    ds.responses[1][3] = missing_sentinel()  # one more missing pair
    ds._invalidate_nrn_masks()
    return ds


class TinyVideo(VideoNeuralDataset):
    """3 stims of (3, 4, 5, T) uint8 frames x 4 neurons of non-integral responses."""

    def __init__(self) -> None:
        super().__init__("tiny-video", dt_ms=16.7)
        self.H, self.W = 4, 5
        g = torch.Generator().manual_seed(0)
        lengths = [6, 9, 7]
        self.stims = [torch.randint(0, 255, (3, 4, 5, t), dtype=torch.uint8, generator=g) for t in lengths]
        self.responses = [[missing_sentinel() if (s + n) % 4 == 3 else torch.rand(1 + n, t, generator=g)
                           for n in range(4)] for s, t in enumerate(lengths)]
        self.stim_meta = [{"movie": f"m{s}"} for s in range(3)]
        self.nrn_meta = [{"cell": n, "layer": "L4" if n % 2 else "L2/3"} for n in range(4)]
        self.N_neurons = 4
        self.validate()


class LegacyDataset:
    """Duck-typed object shaped like a deepSTRF 0.1.0 dataset (not a deepstrf class)."""

    def __init__(self, big_later: bool = False, float_later: bool = False) -> None:
        self.dt = 5
        self.F = 2
        self.N_neurons = 2
        self.stims = [torch.ones(1, 2, 4), torch.zeros(1, 2, 3)]
        second = torch.full((2, 3), 300.0) if big_later else torch.ones(2, 3)
        if float_later:
            second = second + 0.25
        self.responses = [[torch.ones(3, 4), torch.zeros(1, 4)], [second, missing_sentinel()]]
        self.stim_meta = [{"a": 1}, {"b": 2}]
        self.nrn_meta = [{}, {"x": None}]


def meta_equal(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(meta_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(meta_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, (np.ndarray, torch.Tensor)):
        return type(a) is type(b) and a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def assert_same_data(ds, ref) -> None:
    assert ds.get_S() == ref.get_S() and ds.N_neurons == ref.N_neurons and ds.dt == ref.dt
    for s in range(ref.get_S()):
        assert torch.equal(ds.stims[s], torch.as_tensor(ref.stims[s]))
        for n in range(ref.N_neurons):
            a, b = ds.responses[s][n], ref.responses[s][n]
            if is_missing(b):
                assert a.shape == (1, 1) and torch.isnan(a).all()
            else:
                assert a.dtype == torch.float32 and a.shape == b.shape and torch.equal(a, b.float())
    assert torch.equal(ds.nrn_masks, ref.nrn_masks)
    assert meta_equal(ds.stim_meta, ref.stim_meta) and meta_equal(ds.nrn_meta, ref.nrn_meta)


def items_equal(a: dict, b: dict) -> bool:
    return (torch.equal(a["stims"], b["stims"]) and torch.equal(a["valid_mask"], b["valid_mask"])
            and a["stim_meta"]["uid"] == b["stim_meta"]["uid"] and len(a["responses"]) == len(b["responses"])
            and all(x.shape == y.shape and torch.equal(x.nan_to_num(-1), y.nan_to_num(-1))
                    for x, y in zip(a["responses"], b["responses"])))


@pytest.fixture
def saved(store_url):
    """(url, storage_options, in-memory source, fingerprint) of a freshly saved audio source."""
    url, so = store_url
    src = audio_source()
    return url, so, src, save_dataset(src, url, storage_options=so)


def _fs_key(url: str, so, key: str):
    fs, path = Location.parse(url, so).filesystem()
    return fs, f"{path}/{key}"


# -- round trip ---------------------------------------------------------------------------
def test_round_trip_audio_exact(saved):
    url, so, src, fp = saved
    ds = open_dataset(url, storage_options=so)
    assert type(ds) is AudioNeuralDataset and isinstance(ds.stims, ZarrStims)
    assert isinstance(ds.responses, ZarrResponseGrid)
    assert ds.F == 32 and ds.class_name == "SyntheticAudioDataset" and ds.name == "AA1"
    assert ds.card["license"] == "CC0-1.0" and ds.fingerprint == fp
    assert ds.store_url == Location.parse(url).url and ds.storage_options == so
    assert ds.responses.reader.attrs["response_dtype"] == "uint8"
    assert_same_data(ds, src)
    lengths = {ds.responses[s][0].shape[1] for s in range(ds.get_S())}
    repeats = {tuple(c.shape)[0] for s in range(ds.get_S()) for c in ds.responses[s] if not is_missing(c)}
    assert len(lengths) > 1 and len(repeats) > 1  # ragged T and R per cell survive


def test_round_trip_video_float_responses(store_url):
    url, so = store_url
    src = TinyVideo()
    save_dataset(src, url, storage_options=so)
    ds = open_dataset(url, storage_options=so)
    assert type(ds) is VideoNeuralDataset and (ds.H, ds.W) == (4, 5) and ds.dt == 16.7
    assert ds.stims[1].dtype == torch.uint8 and ds.stims[1].shape == (3, 4, 5, 9)
    assert ds.responses.reader.attrs["response_dtype"] == "float32"
    assert_same_data(ds, src)


@pytest.mark.parametrize("big_later,float_later,dtype", [(False, False, "uint8"), (True, False, "uint16"),
                                                         (False, True, "float32")])
def test_duck_typed_object_and_dtype_widening(tmp_path, big_later, float_later, dtype):
    src = LegacyDataset(big_later, float_later)
    save_dataset(src, tmp_path / "legacy")
    ds = open_dataset(tmp_path / "legacy")
    assert type(ds) is AudioNeuralDataset and ds.class_name == "LegacyDataset" and ds.dt == 5 and ds.F == 2
    assert ds.responses.reader.attrs["response_dtype"] == dtype
    assert torch.equal(ds.responses[1][0], src.responses[1][0])
    assert ds.nrn_masks.tolist() == [[True, True], [True, False]]
    assert ds.stim_meta == src.stim_meta and ds.nrn_meta == src.nrn_meta


@pytest.mark.parametrize("cells, dtype", [
    ([[0, 7], [-3, 2]], "int8"),  # types uint8 then int8 promote to int16; the values fit int8
    ([[0, 200], [-3, 2]], "int16"),
    ([[-3, 2], [0, 7], [0, 100]], "int8"),  # after a restart in int8, uint8 pieces that fit it stay
    ([[0.5], [-3]], "float32"),
])
def test_responses_are_stored_in_the_smallest_type_their_values_fit(tmp_path, cells, dtype):
    src = NeuralDataset("ints", dt_ms=1.0)
    src.stims = [torch.zeros(1, 2) for _ in cells]
    src.responses = [[torch.tensor([c], dtype=torch.float32)] for c in cells]
    src.stim_meta, src.nrn_meta, src.N_neurons = [{} for _ in cells], [{}], 1
    save_dataset(src, tmp_path / "ints", progress=False)
    ds = open_dataset(tmp_path / "ints")
    assert ds.responses.reader.attrs["response_dtype"] == dtype
    assert all(torch.equal(ds.responses[s][0], src.responses[s][0]) for s in range(len(cells)))


def test_plain_neural_dataset_and_resave_keeps_fingerprint(tmp_path):
    src = NeuralDataset("plain", dt_ms=2.0)
    src.stims = [torch.randn(2, 5), torch.randn(2, 7)]
    src.responses = [[torch.ones(2, 5)], [torch.zeros(3, 7)]]
    src.stim_meta, src.nrn_meta, src.N_neurons = [{}, {}], [{"id": 0}], 1
    fp = save_dataset(src, tmp_path / "a")
    ds = open_dataset(tmp_path / "a")
    assert type(ds) is NeuralDataset
    assert_same_data(ds, src)
    assert save_dataset(ds, f"file://{tmp_path}/b") == fp  # the content fingerprint ignores location



@pytest.mark.parametrize("value", [{"$deepstrf": "evil"}, {"$deepstrf": "float", "value": "1.0"},
                                   {"$deepstrf": "tuple"}, {"$deepstrf": {"k": (1,)}, "other": 2}])
def test_user_dicts_with_the_tag_key_round_trip_unchanged(tmp_path, value):
    src = SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.02, seed=3).to_memory()
    src.nrn_meta[1]["x"], src.stim_meta[0]["$deepstrf"] = value, "top-level key"
    save_dataset(src, tmp_path / "a")
    ds = open_dataset(tmp_path / "a")
    assert meta_equal(ds.nrn_meta, src.nrn_meta) and meta_equal(ds.stim_meta, src.stim_meta)
    save_dataset(SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.02, seed=4), tmp_path / "b")
    concat_neural_datasets([ds, open_dataset(tmp_path / "b")], names=["a", "b"], store=str(tmp_path / "pool"))
    pooled = open_dataset(tmp_path / "pool")
    assert meta_equal(pooled.nrn_meta[1]["x"], value)
    assert meta_equal(pooled.stim_meta[0]["$deepstrf"], "top-level key")

# -- the lazy dataset API -------------------------------------------------------------------
def test_lazy_api_matches_memory(saved):
    url, so, src, _ = saved
    ds = open_dataset(url, storage_options=so)
    assert len(ds) == len(src)
    for i in (0, -1, len(src) - 1):
        assert items_equal(ds[i], src[i])
    sliced, listed = ds[0:2], ds[[1, 0]]
    assert len(sliced["stims"]) == 2 and torch.equal(listed["stims"][0], src[1]["stims"])
    with pytest.raises(IndexError):
        ds[len(ds)]
    for d in (ds, src):
        d.select_population([1, 3, 5])
        d.select_stims([1, 2])
    assert len(ds) == len(src) and all(items_equal(ds[i], src[i]) for i in range(len(ds)))
    batch, ref = neural_collate([ds[i] for i in range(len(ds))]), neural_collate([src[i] for i in range(len(src))])
    assert torch.equal(batch["responses"].nan_to_num(-1), ref["responses"].nan_to_num(-1))
    assert torch.equal(batch["valid_mask"], ref["valid_mask"])
    for d in (ds, src):
        d.reset_stim_selection()
        d.reset_pop_selection()
    assert ds.select_pop_by_nrn_attr("area", "MLd") == src.select_pop_by_nrn_attr("area", "MLd")
    ds.reset_pop_selection()
    src.reset_pop_selection()
    memory = ds.to_memory()
    assert isinstance(memory.responses, list) and items_equal(memory[0], src[0])


def test_concat_with_in_memory(saved):
    url, so, src, _ = saved
    ds = open_dataset(url, storage_options=so)
    other = SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.02, seed=9).to_memory()
    pooled, ref = concat_neural_datasets([ds, other], names=["a", "b"]), concat_neural_datasets([src, other], names=["a", "b"])
    assert type(pooled) is AudioNeuralDataset and torch.equal(pooled.nrn_masks, ref.nrn_masks)
    assert len(pooled) == len(ref) and all(items_equal(pooled[i], ref[i]) for i in range(len(ref)))
    assert (ds + other).get_S() == ref.get_S()


def rows_one_by_one(grid: ResponseGrid, stims, neurons=None) -> list:
    """The rows as the generic path builds them: cell by cell through ``grid.row``."""
    ids = range(grid.n_neurons) if neurons is None else neurons
    return [views.raw_row_from_cells(s, ids, grid.row(s, ids)) for s in stims]


def test_read_raw_rows_equals_generic_path(saved):
    url, so, src, _ = saved
    grid = open_dataset(url, storage_options=so).responses
    cases = [([0, 1, 2], None), ([2, 0, 2], [7, 1, 3, 0]), ([1], [3]), ([0], [])]
    for stims, neurons in cases:
        fast = grid.read_raw_rows(stims, neurons)
        slow = rows_one_by_one(grid, stims, neurons)
        for a, b in zip(fast, slow, strict=True):
            assert a.stim == b.stim and a.neurons.tolist() == b.neurons.tolist()
            assert a.repeats.tolist() == b.repeats.tolist() and a.lengths.tolist() == b.lengths.tolist()
            assert a.values.dtype == np.uint8 and np.array_equal(a.values, b.values)


def test_batched_stim_read_equals_per_stim_read(saved):
    url, so, src, _ = saved
    ds = open_dataset(url, storage_options=so)
    order = [2, 0, 2, 1]
    assert all(torch.equal(a, src.stims[s]) for a, s in zip(ds.stims.read_many(order), order, strict=True))
    with pytest.warns(DuplicateUIDWarning):  # the same store twice: its UIDs repeat, as intended here
        pooled = concat_neural_datasets([ds, open_dataset(url, storage_options=so)], names=["a", "b"])
    pooled.stims[1] = torch.zeros(1)  # copy-on-write override: returned as set, never read
    got = views.read_many(pooled.stims, [4, 1, 0, 3])
    assert torch.equal(got[1], torch.zeros(1))
    assert all(torch.equal(got[i], pooled.stims[s]) for i, s in ((0, 4), (2, 0), (3, 3)))


def test_many_chunks_read_raw_rows_and_transforms(tmp_path, monkeypatch):
    monkeypatch.setattr(fmt, "CHUNK_BYTES", 512)  # many chunks: spans cross chunk boundaries
    src = audio_source()
    save_dataset(src, tmp_path / "s")
    ds = open_dataset(tmp_path / "s")
    assert ds.responses.reader.arrays()[fmt.VALUES].chunks == (512,)
    assert_same_data(ds, src)
    rows = ds.responses.read_raw_rows([2, 0], [9, 0, 4])
    assert [c.tolist() for c in rows[0].cells()] == [src.responses[2][n].int().tolist() for n in rows[0].neurons]
    ds.normalize_responses("max")
    src.normalize_responses("max")
    assert torch.allclose(ds.responses[0][0], src.responses[0][0])
    assert ds.responses.read_raw_rows([0], [0])[0].values.dtype == np.float32  # transformed: generic path


# -- pickling and workers ---------------------------------------------------------------------
def test_pickle_by_url_and_dataloader_workers(saved):
    url, so, src, _ = saved
    ds = open_dataset(url, storage_options=so)
    ds[0]  # open handles and load the index first
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # URL + metadata, no data or handles
    clone = pickle.loads(blob)
    assert items_equal(clone[1], src[1])
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=neural_collate, timeout=LOADER_TIMEOUT_S,
                        multiprocessing_context="fork")
    uids = [m["uid"] for b in loader for m in b["stim_meta"]]
    assert uids == [src.stim_meta[s]["uid"] for s in src.visible_stims()]


# -- HTTP -------------------------------------------------------------------------------------
def test_http_read_and_write_refused(http_server):
    src = audio_source()
    fp = save_dataset(src, http_server.root / "aa1.zarr")
    before = len(http_server.requests)
    ds = open_dataset(http_server.url("aa1.zarr"))
    assert len(http_server.requests) - before <= 3  # root zarr.json + the two metadata arrays
    assert ds.fingerprint == fp
    assert_same_data(ds, src)
    with pytest.raises(ReadOnlyStoreError, match="read-only"):
        save_dataset(src, http_server.url("new.zarr"))
    with pytest.raises(StoreNotFoundError):
        open_dataset(http_server.url("nothing-here.zarr"))


# -- refusals -----------------------------------------------------------------------------------
def write_v10(monkeypatch) -> None:
    """Make save_dataset write format 1.0 (unsharded data arrays), as deepstrf did before 1.1."""
    monkeypatch.setattr(fmt, "FORMAT_VERSION", "1.0")
    monkeypatch.setattr(fmt, "shards", lambda chunk: {})


def _damage(fs, key: str, damage: str, at: int) -> None:
    """Flip a byte at ``at`` of object ``key``, cut it just after ``at``, or delete it."""
    blob = fs.cat_file(key)
    if damage == "corrupt":
        fs.pipe_file(key, blob[:at] + bytes([blob[at] ^ 0xFF]) + blob[at + 1:])
    elif damage == "truncate":
        fs.pipe_file(key, blob[:at])
    else:
        fs.rm(key)


@pytest.mark.parametrize("version", ["1.0", "1.1"])
@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete"])
def test_damaged_chunk_is_an_integrity_error(store_url, monkeypatch, damage, version):
    monkeypatch.setattr(fmt, "CHUNK_BYTES", 512)
    if version == "1.0":
        write_v10(monkeypatch)
    url, so = store_url
    src = audio_source()
    save_dataset(src, url, storage_options=so)
    ds = open_dataset(url, storage_options=so)
    assert ds.responses.reader.attrs["format_version"] == version
    offsets = ds.responses.reader.index().offsets
    s, n = 2, 4
    chunk = int(offsets[s * ds.N_neurons + n]) // 512
    if version == "1.0":
        fs, key = _fs_key(url, so, f"{fmt.VALUES}/c/{chunk}")
        _damage(fs, key, damage, 20)
        where = f"c/{chunk}"
    else:
        shard, inner = divmod(chunk, fmt.SHARD_CHUNKS)
        fs, key = _fs_key(url, so, f"{fmt.VALUES}/c/{shard}")
        entry = np.frombuffer(fs.cat_file(key)[16 * inner:16 * inner + 16], dtype="<u8")
        _damage(fs, key, damage, int(entry[0]) + 20)
        where = f"c/{shard}" if damage == "delete" else f"c/{shard} (inner chunk {inner})"
    fresh = open_dataset(url, storage_options=so)
    with pytest.raises(IntegrityError) as err:
        fresh.responses[s][n]
    msg = str(err.value)
    assert Location.parse(url).url in msg and where in msg and f"stim {s}" in msg
    assert cli_main(["verify", url, *_so_args(so)]) == 1


def test_format_10_and_11_stores_read_identically(tmp_path, monkeypatch):
    monkeypatch.setattr(fmt, "CHUNK_BYTES", 512)  # many chunks and shards: spans cross both
    monkeypatch.setattr(fmt, "STIM_CHUNK_BYTES", 256)
    src = audio_source()
    save_dataset(src, tmp_path / "v11")
    with monkeypatch.context() as m:
        write_v10(m)
        save_dataset(src, tmp_path / "v10")
    new, old = open_dataset(tmp_path / "v11"), open_dataset(tmp_path / "v10")
    assert set(new.responses.reader.sharded()) == {fmt.VALUES, fmt.STIM_VALUES}
    assert old.responses.reader.sharded() == {} and old.responses.reader.attrs["format_version"] == "1.0"
    assert_same_data(new, src)
    assert_same_data(old, src)
    for stims, neurons in (([2, 0, 1], None), ([1, 2], [9, 0, 4])):
        for a, b in zip(new.responses.read_raw_rows(stims, neurons), old.responses.read_raw_rows(stims, neurons)):
            assert a.neurons.tolist() == b.neurons.tolist() and np.array_equal(a.values, b.values)
    assert all(torch.equal(a, b) for a, b in zip(new.stims.read_many([2, 0, 1]), old.stims.read_many([2, 0, 1])))
    assert cli_main(["verify", str(tmp_path / "v11")]) == 0 and cli_main(["verify", str(tmp_path / "v10")]) == 0


def test_one_byte_arrays_bitshuffle_in_two_byte_words_and_older_stores_read_the_same(tmp_path, monkeypatch):
    import zarr

    monkeypatch.setattr(fmt, "CHUNK_BYTES", 512)
    src = audio_source()
    save_dataset(src, tmp_path / "new")
    with monkeypatch.context() as m:  # what earlier writers did: 1-byte words
        m.setattr(fmt, "BITSHUFFLE_MIN_TYPESIZE", 1)
        save_dataset(src, tmp_path / "old")
    blosc = {}
    for name in ("new", "old"):
        codecs = zarr.open_group(str(tmp_path / name), mode="r")[fmt.VALUES].metadata.to_dict()["codecs"]
        inner = codecs[0]["configuration"]["codecs"]
        blosc[name] = next(c["configuration"] for c in inner if c["name"] == "blosc")
    assert blosc["new"]["typesize"] == 2 and blosc["old"]["typesize"] == 1
    assert blosc["new"]["shuffle"] == blosc["old"]["shuffle"] == "bitshuffle"
    new, old = open_dataset(tmp_path / "new"), open_dataset(tmp_path / "old")
    assert new.fingerprint.startswith("sha256:") and new.fingerprint == old.fingerprint  # content, not encoding
    assert_same_data(new, src)
    assert_same_data(old, src)
    for stims, neurons in (([2, 0, 1], None), ([1, 2], [9, 0, 4])):
        for a, b in zip(new.responses.read_raw_rows(stims, neurons), old.responses.read_raw_rows(stims, neurons)):
            assert a.neurons.tolist() == b.neurons.tolist() and np.array_equal(a.values, b.values)
    by_zarr = [zarr.open_group(str(tmp_path / n), mode="r")[fmt.VALUES][:] for n in ("new", "old")]
    assert by_zarr[0].dtype == np.uint8 and np.array_equal(by_zarr[0], by_zarr[1])


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_rows_decode_into_caller_buffers(tmp_path, monkeypatch, version):
    monkeypatch.setattr(fmt, "CHUNK_BYTES", 512)  # rows start and end inside chunks; rows share chunks
    src = audio_source()
    if version == "1.0":
        write_v10(monkeypatch)
    save_dataset(src, tmp_path / "s")
    grid = open_dataset(tmp_path / "s").responses
    for stims, neurons in (([2, 0, 1], None), ([1, 1, 0], None), ([2, 1], [0, 4, 9]), ([0], [])):
        expected = grid.read_raw_rows(stims, neurons)
        sizes, dtype = grid.row_sizes(stims, neurons)
        assert sizes.tolist() == [len(r.values) for r in expected] and dtype == np.uint8
        for buf_dtype in (np.uint8, np.int32):  # the stored dtype decodes in place, others are cast
            buf = np.full(int(sizes.sum()), 255, dtype=buf_dtype)
            out = np.split(buf, np.cumsum(sizes)[:-1])
            rows = grid.read_raw_rows(stims, neurons, out)
            assert np.array_equal(buf, np.concatenate([r.values for r in expected]).astype(buf_dtype))
            assert all(r.values is o and r.neurons.tolist() == e.neurons.tolist()
                       for r, o, e in zip(rows, out, expected, strict=True))
    with pytest.raises(ValueError, match="one array per stim, of sizes"):
        grid.read_raw_rows([0, 1], None, [np.zeros(1, np.uint8), np.zeros(1, np.uint8)])
    grid.set_cell(0, 0, torch.zeros(1, 3))  # overrides: sizes not known ahead
    assert grid.row_sizes([0]) is None


def test_one_request_per_shard_per_batched_read(tmp_path, monkeypatch):
    monkeypatch.setattr(fmt, "CHUNK_BYTES", 1024)
    monkeypatch.setattr(fmt, "SHARD_CHUNKS", 64)  # several rows per shard
    save_dataset(SyntheticAudioDataset("aa1", scale=0.3, time_scale=0.02, seed=3), tmp_path / "s")
    reader = open_dataset(tmp_path / "s").responses.reader
    layout = reader.sharded()[fmt.VALUES].layout
    stims = [6, 0, 2, 4]  # not neighbours: separate spans, some in the same shard
    plans = reader.row_plan(stims)
    shards = {k for p in plans for a, b, _ in p.runs() for k in layout.shards_of(a, b)}
    assert len(shards) < sum(len(layout.shards_of(a, b)) for p in plans for a, b, _ in p.runs())
    reader.read_rows(stims)  # loads the shard indexes
    before = reader.io_counters()[0]
    rows = reader.read_rows(stims)
    assert reader.io_counters()[0] - before == len(shards)
    assert all(np.array_equal(r.values, e.values) for r, e in
               zip(rows, rows_one_by_one(open_dataset(tmp_path / "s").responses, stims), strict=True))


def test_remote_shards_are_fetched_whole_once_and_cached(store_url, monkeypatch):
    url, so = store_url
    monkeypatch.setattr(fmt, "CHUNK_BYTES", 512)
    monkeypatch.setattr(fmt, "SHARD_CHUNKS", 8)  # several shards, several rows in each
    monkeypatch.setattr(shards, "SHARD_CACHE", shards.ShardCache(1 << 30))
    src = SyntheticAudioDataset("aa1", scale=0.3, time_scale=0.05, seed=3)
    save_dataset(src, url, storage_options=so)
    ds = open_dataset(url, storage_options=so)
    reader, stims = ds.responses.reader, list(range(ds.get_S()))
    expected = rows_one_by_one(ds.responses, stims)
    values = reader.sharded()[fmt.VALUES]
    n_shards = -(-values.layout.length // (values.layout.chunk * values.layout.per_shard))
    assert n_shards > 2
    before = reader.io_counters()[0]
    rows = reader.read_rows(stims)
    requests = reader.io_counters()[0] - before
    assert all(np.array_equal(r.values, e.values) for r, e in zip(rows, expected, strict=True))
    if Location.parse(url).is_local:  # range reads: the page cache keeps what was read
        assert values.whole is False and not shards.SHARD_CACHE.blobs
        return
    # one shard index decides; then one GET per shard, its index included
    assert values.whole is True and requests <= n_shards + 1
    before = reader.io_counters()[0]
    reader.read_rows(stims[::-1])
    assert reader.io_counters()[0] == before  # every shard came from the cache
    assert all(k.startswith(f"{reader.url}#{reader.attrs['fingerprint']}/") for k in shards.SHARD_CACHE.blobs)


def test_warming_a_pools_stims_leaves_their_read_nothing_to_fetch(store_url, monkeypatch):
    url, so = store_url
    monkeypatch.setattr(fmt, "CHUNK_BYTES", 512)
    monkeypatch.setattr(fmt, "SHARD_CHUNKS", 8)  # several shards per source
    monkeypatch.setattr(shards, "SHARD_CACHE", shards.ShardCache(1 << 30))
    pool = open_dataset(write_pool(url, so), storage_options=so)
    stims = [pool.get_S() - 1, 0, pool.get_S() // 2 + 1]
    before = storage_io(pool)[0]
    warm_reads(pool, stims)  # no index loaded yet: nothing to go by (the read loads it)
    assert storage_io(pool)[0] == before
    load_indexes(pool)
    before = storage_io(pool)[0]
    warm_reads(pool, stims)
    warmed = storage_io(pool)[0]
    views.read_many(pool.stims, stims)
    pool.responses.read_raw_rows(stims)
    if Location.parse(url).is_local:  # range reads, no shard cache: warming does nothing
        assert warmed == before and storage_io(pool)[0] > warmed
    else:
        assert warmed > before and storage_io(pool)[0] == warmed


@pytest.mark.parametrize("store_url", ["memory", "s3"], indirect=True)  # local stores have no shard cache
def test_readers_of_one_remote_store_share_cached_shards(store_url, monkeypatch):
    url, so = store_url
    monkeypatch.setattr(fmt, "CHUNK_BYTES", 512)
    monkeypatch.setattr(fmt, "SHARD_CHUNKS", 8)
    monkeypatch.setattr(shards, "SHARD_CACHE", shards.ShardCache(1 << 30))
    save_dataset(SyntheticAudioDataset("aa1", scale=0.3, time_scale=0.05, seed=3), url, storage_options=so)
    first, second = (open_dataset(url, storage_options=so).responses.reader for _ in range(2))
    last = first.n_stims - 1
    first.read_rows([last])  # caches the shards of the last row
    second.index()
    second.learn_shard_layout()  # knows shards are fetched whole, has read only shard 0's index
    assert second.sharded()[fmt.VALUES].whole is True
    before = second.io_counters()[0]
    (row,) = second.read_rows([last])  # from the cache: this reader parses the shard's index itself
    assert second.io_counters()[0] == before
    assert np.array_equal(row.values, first.read_rows([last])[0].values)


def test_threads_of_a_forked_process_bind_once(saved, monkeypatch):
    url, so, src, _ = saved
    reader = open_dataset(url, storage_options=so).responses.reader
    reader.read_stims([0])
    reader._handles = dataclasses.replace(reader._handles, pid=-1)  # as seen from a freshly forked worker
    binds = []
    bind = SourceReader._bind
    monkeypatch.setattr(SourceReader, "_bind", lambda self, before: (binds.append(1), bind(self, before))[1])
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: reader.read_stims([i % 3, 2]), range(8)))
    assert len(binds) == 1
    assert all(np.array_equal(x[0], src.stims[i % 3].numpy()) for i, x in enumerate(got))


def test_shard_cache_is_bounded_least_recently_used():
    cache = shards.ShardCache(100)
    for key in "abc":
        cache.put(key, np.zeros(40, np.uint8))
    assert list(cache.blobs) == ["b", "c"] and cache.nbytes == 80  # "a" evicted
    assert cache.get("b") is not None
    cache.put("d", np.zeros(40, np.uint8))
    assert list(cache.blobs) == ["b", "d"]  # "c" was the least recently used
    cache.put("huge", np.zeros(101, np.uint8))
    assert cache.get("huge") is None and cache.nbytes == 80


def test_pool_row_sizes_use_threads_only_while_an_index_is_still_to_read(store_url, monkeypatch):
    url, so = store_url
    threaded = []
    thread_map = views.thread_map
    monkeypatch.setattr(views, "thread_map", lambda *a, **k: (threaded.append(1), thread_map(*a, **k))[1])
    pool = open_dataset(write_pool(url, so), storage_options=so)
    stims = [0, pool.get_S() - 1]  # one from each source
    remote = all(d.responses.waits_on_network for d in pool.responses.sources)
    first = pool.responses.row_sizes(stims)  # the indexes are read first: concurrently over a network
    assert len(threaded) == int(remote)
    assert all(r.has_index() for r in source_readers(pool))
    again = pool.responses.row_sizes(stims)  # a little numpy now: in this thread
    assert len(threaded) == int(remote) and again[0].tolist() == first[0].tolist()


def test_pool_row_sizes_need_every_source_sized(saved):
    url, so, src, _ = saved
    ds = open_dataset(url, storage_options=so)
    with pytest.warns(DuplicateUIDWarning):
        stored = concat_neural_datasets([ds, open_dataset(url, storage_options=so)], names=["a", "b"])
    stims, neurons = [4, 0, 3], list(range(0, stored.N_neurons, 3))
    sizes, _ = stored.responses.row_sizes(stims, neurons)
    assert sizes.tolist() == [len(r.values) for r in stored.responses.read_raw_rows(stims, neurons)]
    mixed = concat_neural_datasets([ds, SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.02)], names=["a", "b"])
    assert mixed.responses.row_sizes([0, mixed.get_S() - 1]) is None  # an in-memory source cannot size rows without reading


def _so_args(so) -> list[str]:
    return [] if not so else ["-S", f"client_kwargs.endpoint_url={so['client_kwargs']['endpoint_url']}"]


def test_unknown_major_version_refused(saved):
    url, so, _, _ = saved
    fs, key = _fs_key(url, so, "zarr.json")
    doc = json.loads(fs.cat_file(key))
    doc["attributes"]["format_version"] = "2.0"
    fs.pipe_file(key, json.dumps(doc).encode())
    with pytest.raises(FormatVersionError, match=r"version '2\.0'") as err:
        open_dataset(url, storage_options=so)
    assert Location.parse(url).url in str(err.value)
    doc["attributes"]["format_version"] = "1.7"  # a newer minor version still opens
    fs.pipe_file(key, json.dumps(doc).encode())
    assert open_dataset(url, storage_options=so).get_S() == 3


def test_overwrite(saved):
    url, so, src, fp = saved
    other = TinyVideo()
    with pytest.raises(StoreExistsError, match="overwrite=True"):
        save_dataset(other, url, storage_options=so)
    assert open_dataset(url, storage_options=so).fingerprint == fp  # untouched
    fp2 = save_dataset(other, url, storage_options=so, overwrite=True)
    ds = open_dataset(url, storage_options=so)
    assert ds.fingerprint == fp2 != fp and type(ds) is VideoNeuralDataset
    assert_same_data(ds, other)


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> content)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("edit, match", [
    (lambda d: setattr(d, "F", 0), r"attribute 'F' is 0, not a positive integer"),
    (lambda d: setattr(d, "F", -1), r"attribute 'F' is -1, not a positive integer"),
    (lambda d: setattr(d, "hearing_range_hz", (500, 100)),
     r"attribute 'hearing_range_hz' is \[500.0, 100.0\], not an increasing \[low, high\] pair"),
    (lambda d: setattr(d, "audio_fs", "abc"), r"attribute 'audio_fs' is 'abc', not a positive number or null"),
    (lambda d: setattr(d, "stims", [s.to(torch.complex64) for s in d.stims]), r"stims\[0\] has dtype complex64"),
    (lambda d: d.stims.__setitem__(1, torch.zeros(1, d.F + 1, 5)),
     r"stims\[1\] has shape \(1, \d+, 5\), not the \(C, F=\d+, T\) of the attributes"),
    (lambda d: d.responses.__setitem__(1, d.responses[1][:1]), r"responses\[1\] has 1 entries, expected N_neurons="),
    (lambda d: d.responses[1].__setitem__(2, torch.zeros(10)),
     r"responses\[1\]\[2\] must be a 2-D \(R, T\) tensor \(got Tensor of shape \(10,\)\)"),
    (lambda d: d.responses[1].__setitem__(2, np.zeros((2, 10))),
     r"responses\[1\]\[2\] must be a 2-D \(R, T\) tensor \(got ndarray of shape \(2, 10\)\)"),
    (lambda d: setattr(d, "dt", math.inf), r"dt \(bin width in ms\) must be a finite positive number, got inf"),
    (lambda d: d.stim_meta[1].__setitem__("x", "\ud800"),
     r"stim_meta\[1\]\['x'\]: a string holds '\\ud800' \(surrogates not allowed\)"),
    (lambda d: d.nrn_meta[0].__setitem__("\udcff", 1), r"nrn_meta\[0\] key '\\udcff': a string holds"),
    (lambda d: d.responses[2].__setitem__(1, torch.zeros(0, 7)),
     r"responses\[2\]\[1\] has shape \(0, 7\): no repeats, which a store cannot tell from a pair never recorded"),
], ids=["F0", "F-1", "hearing_range", "audio_fs", "complex_stims", "stim_F", "short_row", "1-D_cell", "numpy_cell",
        "dt_inf", "surrogate", "surrogate_key", "zero_repeats"])
def test_save_refuses_what_open_would_call_damaged(tmp_path, edit, match):
    """Attributes, stimuli, cells and metadata that the reader's schema refuses or the format cannot hold
    are refused, naming them, before anything is written: no new store, and an existing one keeps its
    only version (it used to get an unopenable latest, or the error was a bare IndexError)."""
    url = tmp_path / "s.zarr"
    fp = save_dataset(audio_source(), url)
    before = _files(url)
    bad = audio_source()
    edit(bad)
    for target, overwrite in ((url, True), (tmp_path / "new.zarr", False)):
        with pytest.raises(ValueError, match=match) as err:
            save_dataset(bad, target, overwrite=overwrite)
        assert f"{target}" in str(err.value)
    assert _files(url) == before and sorted(os.listdir(tmp_path)) == ["s.zarr"]
    assert open_dataset(url).fingerprint == fp


def test_pooled_metadata_that_is_not_text_is_refused_naming_its_entry():
    with pytest.raises(ValueError, match=r"nrn_meta\[1\]\['site'\]: a string holds '\\ud800'"):
        encode_columns([{"site": "a"}, {"site": "b\ud800"}], "nrn_meta")


def test_missing_store(store_url):
    url, so = store_url
    with pytest.raises(StoreNotFoundError, match="no store"):
        open_dataset(url, storage_options=so)


def test_a_store_whose_reads_fail_is_named_with_the_options_to_check(s3_server):
    dead_endpoint = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
                     "config_kwargs": {"retries": {"max_attempts": 1}}}
    for url, so, cause in (("http://127.0.0.1:9/x.zarr", None, "ClientConnectorError"),
                           (s3_server.url(), dead_endpoint, "EndpointConnectionError")):
        with pytest.raises(SourceUnreadableError, match=f"^{re.escape(url)} could not be read \\({cause}: "
                                                        ".*; check the storage options that apply to it"):
            open_dataset(url, storage_options=so)


class _Boom(RuntimeError):
    pass


class _FailingGrid(ResponseGrid):
    """Responses that fail at stim 2, like a source read dying mid-write."""

    def __init__(self, inner) -> None:
        super().__init__(inner.get_S(), inner.N_neurons)
        self.inner = inner

    def _read_row(self, s, neurons):
        if s == 2:
            raise _Boom("source read failed")
        return [self.inner.responses[s][n] for n in neurons]

    def _mask(self):
        return self.inner.nrn_masks


def test_interrupted_write_leaves_nothing_and_keeps_old_store(saved):
    url, so, src, fp = saved
    broken = audio_source()
    broken.responses = _FailingGrid(src)
    new_url = url + "-new"
    with pytest.raises(_Boom):
        save_dataset(broken, new_url, storage_options=so)
    with pytest.raises(StoreNotFoundError):
        open_dataset(new_url, storage_options=so)
    with pytest.raises(_Boom):
        save_dataset(broken, url, storage_options=so, overwrite=True)
    assert open_dataset(url, storage_options=so).fingerprint == fp
    fs, path = Location.parse(url, so).filesystem()
    parent = path.rsplit("/", 1)[0]
    fs.invalidate_cache()
    assert not [p for p in fs.ls(parent, detail=False) if ".tmp-" in p]  # staging cleaned up


def test_half_written_store(saved):
    url, so, _, _ = saved
    fs, key = _fs_key(url, so, "zarr.json")
    fs.rm(key)  # what a crash before the final marker leaves
    with pytest.raises(IncompleteStoreError, match="interrupted"):
        open_dataset(url, storage_options=so)
    with pytest.raises(StoreExistsError):
        save_dataset(audio_source(), url, storage_options=so)
    save_dataset(audio_source(), url, storage_options=so, overwrite=True)
    assert open_dataset(url, storage_options=so).get_S() == 3


def test_missing_array_and_foreign_folder(tmp_path):
    save_dataset(audio_source(), tmp_path / "s")
    doc = json.loads((tmp_path / "s" / "zarr.json").read_text())
    del doc["consolidated_metadata"]["metadata"][fmt.OFFSETS]
    (tmp_path / "s" / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="responses/offsets"):
        open_dataset(tmp_path / "s")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(StoreExistsError, match="not a deepstrf store"):
        save_dataset(audio_source(), tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"



def test_a_root_without_consolidated_metadata_reads_each_arrays_own_document(store_url):
    url, so = store_url
    src = audio_source()
    save_dataset(src, url, storage_options=so)
    fs, key = _fs_key(url, so, "zarr.json")
    doc = json.loads(fs.cat_file(key))
    del doc["consolidated_metadata"]
    fs.pipe_file(key, json.dumps(doc).encode())
    assert_same_data(open_dataset(url, storage_options=so), src)

# -- CLI ----------------------------------------------------------------------------------------
def test_cli_info_and_verify(saved, capsys):
    url, so, src, fp = saved
    assert cli_main(["info", url, "--json", *_so_args(so)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["kind"], info["S"], info["N"], info["F"], info["fingerprint"]) == ("audio", 3, 10, 32, fp)
    assert info["bytes_on_disk"] > 0 and info["bytes_float32"] > info["bytes_on_disk"]
    assert info["card"]["name"] == "AA1" and info["response_dtype"] == "uint8"
    assert cli_main(["info", url, *_so_args(so)]) == 0
    assert "fingerprint" in capsys.readouterr().out
    assert cli_main(["verify", url, *_so_args(so)]) == 0
    assert "OK" in capsys.readouterr().out
    assert cli_main(["verify", url + "-absent", *_so_args(so)]) == 1


def test_a_waveform_dataset_is_refused_as_one_not_as_a_bad_spectrogram(tmp_path):
    """It was refused as 'shape (1, 100), not the (C, F=1, T) of the attributes'."""
    src = AudioNeuralDataset("wave", dt_ms=5.0)
    src.F, src.audio_fs, src.return_waveform = 1, 2000, True
    src.stims, src.responses = [torch.randn(1, 100)], [[torch.ones(2, 10)]]
    src.stim_meta, src.nrn_meta, src.N_neurons = [{}], [{}], 1
    src.validate(deep=True)
    with pytest.raises(ValueError, match=r"stims\[0\] is a waveform \(1, 100\) \(audio_fs=2000\); waveform "
                                         r"datasets \(return_waveform=True\) cannot be stored yet: compute spectrograms"):
        save_dataset(src, tmp_path / "wave", progress=False)
    assert not (tmp_path / "wave").exists()


def test_cli_info_of_a_tiny_store_says_it_is_larger_than_float32(tmp_path, capsys):
    """A store larger than its float32 form printed its compression ratio as '(1/0)'."""
    src = NeuralDataset("tiny", dt_ms=1.0)
    src.stims, src.responses = [torch.zeros(1, 2)], [[torch.ones(1, 2)]]
    src.stim_meta, src.nrn_meta, src.N_neurons = [{}], [{}], 1
    save_dataset(src, tmp_path / "tiny", progress=False)
    assert cli_main(["info", str(tmp_path / "tiny")]) == 0
    size = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("size"))
    assert re.search(r"as float32 in memory \(\d+\.\d times larger: ", size) and "1/0" not in size


def test_s3_read_defaults_and_caller_options_win():
    loc = Location.parse("s3://bucket/store", {"config_kwargs": {"connect_timeout": 5}})
    opts = loc.fsspec_options()
    assert opts["max_concurrency"] == 1  # no HEAD before each chunk GET
    assert opts["config_kwargs"] == {"connect_timeout": 5, "max_pool_connections": 64, "read_timeout": 30,
                                     "response_checksum_validation": "when_required",
                                     "http_session_cls": SharedTLSSession}
    assert loc.storage_options == {"config_kwargs": {"connect_timeout": 5}}  # caller's dict untouched
    mine = Location.parse("s3://b/s", {"max_concurrency": 4, "config_kwargs": {"max_pool_connections": 8}})
    assert mine.fsspec_options()["max_concurrency"] == 4
    assert mine.fsspec_options()["config_kwargs"]["max_pool_connections"] == 8
    assert Location.parse("memory://x/y").fsspec_options() is None
    # one aiobotocore session per process tree (forked workers inherit its parsed models)...
    assert opts["session"] is mine.fsspec_options()["session"] is shared_s3_session()
    # ...unless the caller brings a session or names a profile
    assert Location.parse("s3://b/s", {"session": "theirs"}).fsspec_options()["session"] == "theirs"
    assert "session" not in Location.parse("s3://b/s", {"profile": "lab"}).fsspec_options()


def test_s3_defaults_leave_out_what_this_botocore_does_not_know(monkeypatch):
    """botocore before 1.36 has no checksum settings (and validates no response checksum): its
    Config would refuse them, so they are not passed."""
    import botocore.config

    older = {k: v for k, v in botocore.config.Config.OPTION_DEFAULTS.items() if "checksum" not in k}
    monkeypatch.setattr(botocore.config.Config, "OPTION_DEFAULTS", older)
    config = Location.parse("s3://b/s").fsspec_options()["config_kwargs"]
    assert "response_checksum_validation" not in config and config["read_timeout"] == 30
    botocore.config.Config(**{k: v for k, v in config.items() if k != "http_session_cls"})


@pytest.mark.parametrize("store_url", ["memory", "s3"], indirect=True)  # local stores read ranges, not shards
def test_processes_share_fetched_shards_through_a_directory(store_url, monkeypatch, tmp_path):
    """A shard one process fetched is read from the shared directory by the next, not fetched."""
    url, so = store_url
    monkeypatch.setattr(fmt, "CHUNK_BYTES", 512)
    monkeypatch.setattr(fmt, "SHARD_CHUNKS", 8)
    save_dataset(SyntheticAudioDataset("aa1", scale=0.3, time_scale=0.05, seed=3), url, storage_options=so)
    stims = list(range(3))
    for process in ("first", "second"):  # each with an empty memory cache of its own
        monkeypatch.setattr(shards, "SHARD_CACHE", shards.ShardCache(1 << 30))
        shards.SHARD_CACHE.share(str(tmp_path))
        reader = open_dataset(url, storage_options=so).responses.reader
        reader.index()
        reader.learn_shard_layout()
        before = reader.io_counters()[0]
        rows = reader.read_rows(stims)
        fetched = reader.io_counters()[0] - before
        if process == "first":
            expected = rows
            assert fetched > 0 and len(list(tmp_path.iterdir())) == fetched
        else:
            assert fetched == 0
            assert all(np.array_equal(r.values, e.values) for r, e in zip(rows, expected, strict=True))
    for f in tmp_path.iterdir():  # a damaged file is not trusted: the shard is fetched again
        f.write_bytes(b"not a shard")
    monkeypatch.setattr(shards, "SHARD_CACHE", shards.ShardCache(1 << 30))
    shards.SHARD_CACHE.share(str(tmp_path))
    reader = open_dataset(url, storage_options=so).responses.reader
    assert all(np.array_equal(r.values, e.values) for r, e in zip(reader.read_rows(stims), expected, strict=True))


def test_a_claimed_shard_is_awaited_not_fetched_twice(tmp_path):
    import asyncio
    import threading

    directory = shards.ShardDirectory(str(tmp_path), wait_s=5)
    assert directory.claim("k") and not directory.claim("k")  # the second process waits instead
    blob = np.arange(10, dtype=np.uint8)
    writer = threading.Timer(0.05, lambda: (directory.put("k", blob), directory.unclaim("k")))
    writer.start()
    assert np.array_equal(asyncio.run(directory.wait("k")), blob)
    writer.join()
    assert directory.claim("j")
    threading.Timer(0.05, directory.unclaim, ["j"]).start()  # its fetch failed: nothing to wait for
    assert asyncio.run(directory.wait("j")) is None


def _claim_left_by(tmp_path, pid: int) -> shards.ShardDirectory:
    """A shard directory holding a claim of process ``pid`` (as a worker stopped mid-fetch leaves
    it); checks that a waiter drops it at once and can claim the shard itself."""
    import asyncio
    import time

    directory = shards.ShardDirectory(str(tmp_path), wait_s=30)
    assert directory.claim("k")
    with open(directory._file("k") + ".claim", "w") as f:
        f.write(str(pid))
    start = time.monotonic()
    assert asyncio.run(directory.wait("k")) is None
    assert time.monotonic() - start < 5 and directory.claim("k")  # the claim is gone: a waiter fetches
    return directory


def test_a_claim_whose_process_died_is_dropped_not_awaited_to_the_deadline(tmp_path):
    import asyncio
    import subprocess
    import sys
    import time

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    directory = _claim_left_by(tmp_path, int(dead.stdout))
    assert not directory.claim("k")
    start = time.monotonic()  # a live claimer's claim is waited for
    directory.wait_s = 0.3
    assert asyncio.run(directory.wait("k")) is None and time.monotonic() - start >= 0.3


def test_a_claim_whose_process_exited_unreaped_is_dropped_too(tmp_path):
    """A worker killed mid-fetch is a zombie until the main process reaps it: its claim is dead."""
    import subprocess
    import sys
    import time

    from deepstrf.forksafe import process_alive

    if not os.path.exists("/proc/self/stat"):
        pytest.skip("zombies are told from /proc")
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 20
        stat = Path(f"/proc/{zombie.pid}/stat")
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        assert not process_alive(zombie.pid) and process_alive(os.getpid())
        _claim_left_by(tmp_path, zombie.pid)
    finally:
        zombie.wait(timeout=20)


def test_shards_shared_through_a_directory_are_mapped_not_copied(tmp_path):
    """A process keeps a shared shard as the directory's file mapped (page cache every process
    shares), whether it wrote the file or found it; removing the file leaves the mapping valid."""
    import mmap

    directory = shards.ShardDirectory(str(tmp_path))
    blob = np.arange(1000, dtype=np.uint16).view(np.uint8)
    kept = directory.put("k", blob)
    found = directory.get("k")
    for mapped in (kept, found):
        assert isinstance(mapped.base.obj, mmap.mmap) and not mapped.flags.writeable
        assert np.array_equal(mapped, blob)
    os.remove(directory._file("k"))  # trimmed by another process while mapped here
    assert np.array_equal(kept, blob) and directory.get("k") is None
    gone = shards.ShardDirectory(str(tmp_path / "gone"))
    assert gone.put("k", blob) is blob  # nowhere to write: the caller keeps its own copy


def test_shard_directory_is_bounded_and_never_recreated(tmp_path):
    directory = shards.ShardDirectory(str(tmp_path / "d"), max_bytes=100)
    directory.put("a", np.zeros(10, np.uint8))
    assert not (tmp_path / "d").exists()  # removed by its owner (here: never made): not recreated
    (tmp_path / "d").mkdir()
    for age, key in enumerate("ab"):
        directory.put(key, np.zeros(40, np.uint8))
        os.utime(directory._file(key), (age, age))  # "a" is the oldest
    directory.put("c", np.zeros(40, np.uint8))
    assert directory.get("a") is None and directory.get("c") is not None  # oldest removed first
    assert sum(f.stat().st_size for f in (tmp_path / "d").iterdir()) <= 100


def test_overwrite_replaces_only_a_store_of_the_same_kind_and_never_a_file(store_url):
    import fsspec

    from deepstrf.store import list_versions

    url, so = store_url
    src, pool, notes = f"{url}/aa1.zarr", f"{url}/pool.zarr", f"{url}/notes.zarr"
    aa1 = SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.02, seed=1)
    save_dataset(aa1, src, storage_options=so, progress=False)
    save_dataset(SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.02, seed=2), src, storage_options=so,
                 progress=False, overwrite=True)  # a second version
    opened = open_dataset(src, storage_options=so)
    with pytest.raises(StoreExistsError, match="holds a source store and this writes a pool"):
        concat_neural_datasets([opened], store=src, storage_options=so, overwrite=True)  # onto its own source
    assert len(list_versions(src, storage_options=so)) == 2
    concat_neural_datasets([opened], store=pool, storage_options=so)
    with pytest.raises(StoreExistsError, match="holds a pool store and this writes a source"):
        save_dataset(aa1, pool, storage_options=so, progress=False, overwrite=True)
    assert open_dataset(pool, storage_options=so).get_S() == aa1.get_S()
    fs, path = fsspec.core.url_to_fs(notes, **(so or {}))
    fs.pipe_file(path, b"my notes")
    for write in (lambda: save_dataset(aa1, notes, storage_options=so, progress=False, overwrite=True),
                  lambda: concat_neural_datasets([opened], store=notes, storage_options=so, overwrite=True)):
        with pytest.raises(StoreExistsError, match="is a file, not a store"):
            write()
    assert fs.cat_file(path) == b"my notes"



def test_a_store_inside_another_store_is_refused_before_anything_is_written(store_url):
    url, so = store_url
    outer, other = f"{url}/outer.zarr", f"{url}/other.zarr"
    aa1 = SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.02, seed=1)
    save_dataset(aa1, outer, storage_options=so, progress=False)
    save_dataset(aa1, other, storage_options=so, progress=False)
    opened = open_dataset(other, storage_options=so)
    concat_neural_datasets([opened], store=f"{url}/pool.zarr", storage_options=so)
    inside = [(outer, f"{outer}/responses/inner.zarr"), (outer, f"{outer}/deeper/still/inner.zarr"),
              (f"{url}/pool.zarr", f"{url}/pool.zarr/inner.zarr")]
    for store, target in inside:
        for write in (lambda: save_dataset(aa1, target, storage_options=so, progress=False),
                      lambda: save_dataset(aa1, target, storage_options=so, progress=False, tag="t"),
                      lambda: concat_neural_datasets([opened], store=target, storage_options=so)):
            with pytest.raises(StoreError, match=f"cannot write {re.escape(target)}: it lies inside {re.escape(store)}, a "):
                write()
            fs, path = Location.parse(target, so).filesystem()
            assert not fs.exists(path)
    save_dataset(aa1, outer, storage_options=so, progress=False, overwrite=True)  # a version of outer is no nesting
    assert open_dataset(outer, storage_options=so).get_S() == aa1.get_S()

def test_a_write_removes_the_staging_folders_killed_writers_left(tmp_path):
    import socket
    import subprocess
    import sys

    pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                             text=True, check=True).stdout)  # a process that has ended: a killed writer
    here = f"{socket.gethostname()}~{os.stat('/proc/self/ns/pid').st_ino}"  # host and pid namespace
    left = tmp_path / f".aa1.zarr.tmp-{here}~{pid}~deadbeef"
    writing = tmp_path / f".aa1.zarr.tmp-{here}~{os.getpid()}~c0ffee00"  # a live writer's: kept
    elsewhere = tmp_path / f".aa1.zarr.tmp-{socket.gethostname()}~1~{pid}~deadbeef"  # another namespace's
    for folder in (left, writing, elsewhere):
        folder.mkdir()
        (folder / "chunk").write_bytes(b"x")
    aa1 = SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.02, seed=1)
    save_dataset(aa1, str(tmp_path / "aa1.zarr"), progress=False)
    assert not left.exists() and writing.exists() and elsewhere.exists()
    # killed between the two renames of a replace: the old store and the new one are the only copies
    old = tmp_path / f".aa1.zarr.old-{here}~{pid}~deadbeef"
    for folder in (left, old):
        folder.mkdir()
    save_dataset(aa1, str(tmp_path / "aa1.zarr"), progress=False, overwrite=True)
    assert left.exists() and old.exists()


def test_numpy_scalar_attributes_are_stored_as_numbers(tmp_path):
    # F and the hearing range converted already; a NumPy audio_fs was refused as "not a positive number"
    ds = SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.02, seed=1)
    ds.audio_fs, ds.F = np.float32(16000.0), np.int64(ds.F)
    save_dataset(ds, tmp_path / "a.zarr")
    opened = open_dataset(tmp_path / "a.zarr")
    assert opened.audio_fs == 16000.0 and opened.F == int(ds.F)
