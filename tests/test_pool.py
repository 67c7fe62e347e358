"""Pooled stores: references plus a coverage mask (CONTRACT §6)."""

import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import zarr
from toydata import OtherAudio, ToyAudio, ToyVideo, cells_equal

import deepstrf
from deepstrf.datasets.concat import DuplicateUIDWarning
from deepstrf.datasets.synthetic import SyntheticAudioDataset
from deepstrf.errors import (FormatVersionError, SourceChangedError, StoreExistsError, StoreNotFoundError,
                             UntrustedReferenceError)
from deepstrf.store.pool import SourceChangedWarning
from deepstrf.utils.data import concat_neural_datasets


def make_sources(folder, time_scale=0.02, seeds=(1, 2)):
    urls = []
    for preset, seed in zip(("aa1", "aa2", "aa2"), seeds):
        url = os.path.join(folder, f"{preset}-{seed}.zarr")
        deepstrf.save_dataset(SyntheticAudioDataset(preset, scale=0.1 if preset == "aa1" else 0.03,
                                                    time_scale=time_scale, seed=seed), url)
        urls.append(url)
    return urls


@pytest.fixture
def sources(tmp_path):
    return make_sources(str(tmp_path))


def assert_same_dataset(a, b):
    assert type(a) is type(b)
    assert (a.get_S(), a.N_neurons, a.dt, a.F) == (b.get_S(), b.N_neurons, b.dt, b.F)
    assert a.stim_meta == b.stim_meta and a.nrn_meta == b.nrn_meta
    assert torch.equal(a.nrn_masks, b.nrn_masks)
    assert len(a) == len(b)
    for s in range(a.get_S()):
        assert torch.equal(a.stims[s], b.stims[s])
        for n in range(a.N_neurons):
            assert cells_equal(a.responses[s][n], b.responses[s][n])


def test_pool_equals_in_memory_concat(sources, tmp_path):
    opened = [deepstrf.open_dataset(u) for u in sources]
    pool = concat_neural_datasets(opened, names=["x", "y"], store=str(tmp_path / "pool.zarr"))
    again = deepstrf.open_dataset(str(tmp_path / "pool.zarr"))
    memory = concat_neural_datasets([deepstrf.open_dataset(u) for u in sources], names=["x", "y"])
    for d in (pool, again):
        assert_same_dataset(d, memory)
        d.select_pop_by_nrn_attr("dataset", "y")
    memory.select_pop_by_nrn_attr("dataset", "y")
    assert len(again) == len(memory) == opened[1].get_S()
    assert all(cells_equal(x, y) for x, y in zip(again[0]["responses"], memory[0]["responses"]))
    assert again.pool_sources[0]["ref"] == "aa1-1.zarr"  # relative: same root
    assert again.nrn_meta + [] == memory.nrn_meta and [] + again.stim_meta == memory.stim_meta
    with pytest.raises(TypeError, match=r"list\(ds\.stim_meta\)"):
        again.stim_meta.append({})


def test_pool_copies_no_data(tmp_path):
    sizes = {}
    for ts in (0.01, 0.1):
        folder = tmp_path / f"t{ts}"
        urls = make_sources(str(folder), time_scale=ts)
        concat_neural_datasets([deepstrf.open_dataset(u) for u in urls], store=str(folder / "pool.zarr"))
        sizes[ts] = sum(f.stat().st_size for f in (folder / "pool.zarr").rglob("*") if f.is_file())
        src = sum(f.stat().st_size for u in urls for f in __import__("pathlib").Path(u).rglob("*") if f.is_file())
        assert sizes[ts] < src
    assert abs(sizes[0.1] - sizes[0.01]) < 64  # only the pool's fingerprint text may differ


def test_move_pool_with_its_sources(sources, tmp_path):
    concat_neural_datasets([deepstrf.open_dataset(u) for u in sources], store=str(tmp_path / "pool.zarr"))
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.move(str(tmp_path), str(moved))
    try:
        pool = deepstrf.open_dataset(str(moved / "pool.zarr"))
        assert pool.pool_sources[1]["url"].startswith(str(moved))
        assert len(pool) == pool.get_S()
    finally:
        shutil.rmtree(moved)


def test_nested_pools_flatten(tmp_path):
    a, b, c = make_sources(str(tmp_path), seeds=(1, 2, 3))
    inner = concat_neural_datasets([deepstrf.open_dataset(a), deepstrf.open_dataset(b)], names=["a", "b"],
                                   store=str(tmp_path / "inner.zarr"))
    outer = concat_neural_datasets([inner, deepstrf.open_dataset(c)], names=None, store=str(tmp_path / "outer.zarr"))
    assert [s["ref"] for s in outer.pool_sources] == ["aa1-1.zarr", "aa2-2.zarr", "aa2-3.zarr"]
    assert outer.source_names == ["a", "b", "AA2"]
    flat = concat_neural_datasets([deepstrf.open_dataset(u) for u in (a, b, c)], names=["a", "b", "AA2"])
    assert_same_dataset(deepstrf.open_dataset(str(tmp_path / "outer.zarr")), flat)
    again = concat_neural_datasets([deepstrf.open_dataset(c), deepstrf.open_dataset(a)], store=str(tmp_path / "rev.zarr"))
    assert again.source_names == ["AA2", "AA1"]


def test_changed_source_is_refused_unless_accepted(sources, tmp_path):
    url = str(tmp_path / "pool.zarr")
    concat_neural_datasets([deepstrf.open_dataset(u) for u in sources], names=["x", "y"], store=url)
    shutil.rmtree(sources[1])  # written again from scratch, not as a new version (which the pool would not see)
    deepstrf.save_dataset(SyntheticAudioDataset("aa2", scale=0.03, time_scale=0.02, seed=9), sources[1])
    with pytest.raises(SourceChangedError, match=r"source 'y' at .*aa2-2.zarr changed after pooling"):
        deepstrf.open_dataset(url)  # a small pool checks every source when it opens
    with pytest.warns(SourceChangedWarning):
        deepstrf.open_dataset(url, accept_changed_sources=True)
    lazy = deepstrf.open_dataset(url, check_sources=False)  # as a pool of more than 64 sources opens
    assert len(lazy) == 7 and lazy.coverage.shape == (7, 25)
    lazy[0]  # source x is unchanged
    with pytest.raises(SourceChangedError, match=r"source 'y' at .*aa2-2.zarr changed after pooling"):
        lazy.stims[3]
    with pytest.raises(SourceChangedError, match=r"source 'y' at .*aa2-2.zarr changed after pooling"):
        lazy.responses[3][10]


@pytest.mark.parametrize("changed, said", [
    (ToyAudio(seed=5, S=4, N=5, dt_ms=5.0), r"dt_ms 5\.0 \(pooled 1\.0\)"),
    (ToyAudio(seed=5, S=4, N=5, F=4), r"F 4 \(pooled 8\)"),
    (ToyVideo(seed=5, S=4, N=5), r"kind 'video' \(pooled 'audio'\)"),
])
def test_an_accepted_change_must_keep_the_bin_width_and_stimulus_geometry(tmp_path, changed, said):
    """accept_changed_sources reads a changed source into the pool only where what the pool says of
    it (shape, dt, kind, F / frame size) still holds: else batches would carry 5 ms bins as 1 ms."""
    urls = [str(tmp_path / name) for name in ("a.zarr", "b.zarr")]
    for seed, url in enumerate(urls):
        deepstrf.save_dataset(ToyAudio(seed=seed, S=4, N=5), url)
    pool_url = str(tmp_path / "pool.zarr")
    concat_neural_datasets([deepstrf.open_dataset(u) for u in urls], names=["x", "y"], store=pool_url)
    shutil.rmtree(urls[1])
    deepstrf.save_dataset(changed, urls[1])
    with pytest.raises(SourceChangedError, match=rf"source 'y' at .*b.zarr changed after pooling .*{said}.* "
                                                 r"changed too.*deepstrf pool-update"):
        deepstrf.open_dataset(pool_url, accept_changed_sources=True)


def test_missing_source_names_its_url(sources, tmp_path):
    url = str(tmp_path / "pool.zarr")
    concat_neural_datasets([deepstrf.open_dataset(u) for u in sources], store=url)
    shutil.rmtree(sources[0])
    with pytest.raises(StoreNotFoundError, match=r"source 'AA1' is missing at .*aa1-1.zarr"):
        deepstrf.open_dataset(url)
    lazy = deepstrf.open_dataset(url, check_sources=False)  # from the pool alone; AA1 missing at first read
    assert lazy.get_S() == 7 and lazy.nrn_meta[0]["dataset"] == "AA1"
    lazy.stims[3]  # AA2 still reads
    with pytest.raises(StoreNotFoundError, match=r"source 'AA1' is missing at .*aa1-1.zarr"):
        lazy[0]


def test_references_outside_the_root_need_trust(tmp_path):
    srcs = make_sources(str(tmp_path / "sources"))
    url = str(tmp_path / "pools" / "pool.zarr")
    concat_neural_datasets([deepstrf.open_dataset(u) for u in srcs], store=url)
    with pytest.raises(UntrustedReferenceError, match="outside the pool's root"):
        deepstrf.open_dataset(url)
    ok = deepstrf.open_dataset(url, allowed_roots=[str(tmp_path / "sources")])
    assert ok.pool_sources[0]["ref"] == srcs[0]  # absolute: not under the pool's root
    assert len(deepstrf.open_dataset(url, trust=True)) == ok.get_S()


def _edit_root(url, fn):
    path = os.path.join(url, "zarr.json")
    doc = json.load(open(path))
    fn(doc["attributes"])
    if "consolidated_metadata" in doc:
        doc["consolidated_metadata"] = None
    json.dump(doc, open(path, "w"))


def test_escaping_reference_and_unknown_version_refused(sources, tmp_path):
    url = str(tmp_path / "pool.zarr")
    concat_neural_datasets([deepstrf.open_dataset(u) for u in sources], store=url)
    _edit_sources_table(url, lambda entries: entries[0].update(ref="../../etc/aa1.zarr"))
    with pytest.raises(UntrustedReferenceError, match=r"references '../../etc/aa1.zarr'"):
        deepstrf.open_dataset(url)
    _edit_root(url, lambda a: a.update(format_version="3.0"))
    with pytest.raises(FormatVersionError, match="version '3.0'"):
        deepstrf.open_dataset(url)


def _edit_sources_table(url, fn):
    """Rewrite a pool's source table as a malicious publisher would: digest recorded to match."""
    from deepstrf.store.pool import SOURCES_TABLE, _digest, _write_array

    group = zarr.open_group(url, mode="r+")
    entries = json.loads(bytes(group[SOURCES_TABLE][...]).decode())
    fn(entries)
    data = np.frombuffer(json.dumps(entries).encode(), dtype=np.uint8)
    del group[SOURCES_TABLE]
    _write_array(group, SOURCES_TABLE, data, text=True)
    _edit_root(url, lambda a: a["digests"].update({SOURCES_TABLE: _digest(data)}))


def test_overwrite_and_interrupted_write(sources, tmp_path, monkeypatch):
    url = str(tmp_path / "pool.zarr")
    opened = [deepstrf.open_dataset(u) for u in sources]
    first = concat_neural_datasets(opened, names=["x", "y"], store=url)
    with pytest.raises(StoreExistsError, match="overwrite=True"):
        concat_neural_datasets(opened, store=url)

    def crash(*a, **k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(zarr, "consolidate_metadata", crash)
    with pytest.raises(RuntimeError):
        concat_neural_datasets(opened, names=["p", "q"], store=url, overwrite=True)
    with pytest.raises(RuntimeError):
        concat_neural_datasets(opened, store=str(tmp_path / "new.zarr"))
    monkeypatch.undo()
    assert deepstrf.open_dataset(url).source_names == first.source_names == ["x", "y"]
    with pytest.raises(StoreNotFoundError):
        deepstrf.open_dataset(str(tmp_path / "new.zarr"))
    assert sorted(os.listdir(tmp_path)) == ["aa1-1.zarr", "aa2-2.zarr", "pool.zarr"]


def test_in_memory_inputs_must_be_saved_first(tmp_path):
    a = SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.02, seed=1)
    b = SyntheticAudioDataset("aa2", scale=0.03, time_scale=0.02, seed=2)
    with pytest.raises(ValueError, match=r"source 'AA1'.*Save it first with deepstrf.save_dataset"):
        concat_neural_datasets([a, b], store=str(tmp_path / "pool.zarr"))
    opened = deepstrf.open_dataset(make_sources(str(tmp_path))[0])
    opened.smooth_responses(5.0)
    with pytest.raises(ValueError, match="transforms or edits"), pytest.warns(DuplicateUIDWarning):
        concat_neural_datasets([opened, opened], store=str(tmp_path / "pool.zarr"))
    assert not os.path.exists(tmp_path / "pool.zarr")


def test_cli_concat_info_verify_plot(sources, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "deepstrf.cli", *args], capture_output=True, text=True,
                              cwd=tmp_path)

    out = run("concat", "pool.zarr", *sources, "--name", "x", "--name", "y")
    assert out.returncode == 0, out.stderr
    assert "2 sources" in out.stdout
    info = run("info", "pool.zarr")
    assert info.returncode == 0, info.stderr
    assert "license" in info.stdout.lower() and "CC0-1.0" in info.stdout
    assert run("verify", "pool.zarr").returncode == 0
    plot = run("plot", "pool.zarr", "-o", "cov.png")
    assert plot.returncode == 0 and (tmp_path / "cov.png").stat().st_size > 1000
    bad = run("concat", "pool.zarr", *sources)
    assert bad.returncode != 0 and "overwrite" in bad.stderr


def test_pool_without_names_labels_sources_with_their_saved_class_name(tmp_path):
    """Default labels of a pool written from stores (by the API and by ``deepstrf concat`` without
    --name) are the class names the sources were saved with, as in memory."""
    urls = [str(tmp_path / f"{cls.__name__}.zarr") for cls in (ToyAudio, OtherAudio)]
    for seed, (cls, url) in enumerate(zip((ToyAudio, OtherAudio), urls)):
        deepstrf.save_dataset(cls(seed), url, progress=False)
    pool = concat_neural_datasets([deepstrf.open_dataset(u) for u in urls], store=str(tmp_path / "api.zarr"))
    out = subprocess.run([sys.executable, "-m", "deepstrf.cli", "concat", "cli.zarr", *urls], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for ds in (pool, deepstrf.open_dataset(str(tmp_path / "api.zarr")), deepstrf.open_dataset(str(tmp_path / "cli.zarr"))):
        assert ds.source_names == ["ToyAudio", "OtherAudio"]
        assert sorted({m["dataset"] for m in ds.nrn_meta}) == ["OtherAudio", "ToyAudio"]


def test_pool_in_s3_shared_between_labs(s3_server, tmp_path):
    """Lab A writes sources and a pool to a bucket; lab B opens it with only the URL and its own credentials."""
    prefix = s3_server.url()
    urls = []
    for preset, seed in (("aa1", 1), ("aa2", 2)):
        url = f"{prefix}/{preset}.zarr"
        deepstrf.save_dataset(SyntheticAudioDataset(preset, scale=0.1 if preset == "aa1" else 0.03,
                                                    time_scale=0.02, seed=seed), url,
                              storage_options=s3_server.storage_options)
        urls.append(url)
    lab_a = {**s3_server.storage_options, "key": "testing", "secret": "lab-a-secret"}
    opened = [deepstrf.open_dataset(u, storage_options=lab_a) for u in urls]
    pool = concat_neural_datasets(opened, names=["x", "y"], store=f"{prefix}/pool.zarr", storage_options=lab_a)
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    written = b"".join(fs.cat(p) for p in fs.find(f"{prefix}/pool.zarr"))
    assert b"lab-a-secret" not in written and b"endpoint_url" not in written
    lab_b = deepstrf.open_dataset(f"{prefix}/pool.zarr", storage_options=s3_server.storage_options)
    assert [s["ref"] for s in lab_b.pool_sources] == ["aa1.zarr", "aa2.zarr"]
    assert_same_dataset(lab_b, pool)
    local = concat_neural_datasets([deepstrf.open_dataset(u, storage_options=s3_server.storage_options)
                                    for u in urls], names=["x", "y"])
    assert_same_dataset(lab_b, local)


def test_remote_pool_may_not_point_at_local_files(s3_server, tmp_path):
    local = make_sources(str(tmp_path))
    prefix = s3_server.url()
    src = f"{prefix}/aa1.zarr"
    deepstrf.save_dataset(SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.02, seed=1), src,
                          storage_options=s3_server.storage_options)
    opened = [deepstrf.open_dataset(src, storage_options=s3_server.storage_options), deepstrf.open_dataset(local[1])]
    url = f"{prefix}/pool.zarr"
    concat_neural_datasets(opened, store=url, storage_options=s3_server.storage_options)
    with pytest.raises(UntrustedReferenceError, match=r"aa2-2.zarr.*outside the pool's root"):
        deepstrf.open_dataset(url, storage_options=s3_server.storage_options)
    trusted = deepstrf.open_dataset(url, storage_options=s3_server.storage_options, allowed_roots=[str(tmp_path)])
    assert trusted.get_S() == sum(d.get_S() for d in opened)


def test_pool_published_over_http(http_server):
    folder = os.path.join(http_server.root, "published")
    urls = make_sources(folder)
    concat_neural_datasets([deepstrf.open_dataset(u) for u in urls], names=["x", "y"],
                           store=os.path.join(folder, "pool.zarr"))
    remote = deepstrf.open_dataset(http_server.url("published/pool.zarr"))
    assert remote.pool_sources[0]["url"] == http_server.url("published/aa1-1.zarr")
    assert_same_dataset(remote, deepstrf.open_dataset(os.path.join(folder, "pool.zarr")))


def test_pools_keep_the_common_kind(tmp_path):
    from toydata import ToyAudio, ToyVideo

    from deepstrf.datasets import NeuralDataset
    from deepstrf.datasets.video import VideoNeuralDataset

    urls = {}
    for name, ds in (("v1", ToyVideo(1)), ("v2", ToyVideo(2)), ("a1", ToyAudio(3))):
        urls[name] = str(tmp_path / f"{name}.zarr")
        deepstrf.save_dataset(ds, urls[name])
    videos = concat_neural_datasets([deepstrf.open_dataset(urls["v1"]), deepstrf.open_dataset(urls["v2"])],
                                    store=str(tmp_path / "videos.zarr"))
    assert type(videos) is VideoNeuralDataset and (videos.H, videos.W) == (6, 5)
    mixed = concat_neural_datasets([deepstrf.open_dataset(urls["v1"]), deepstrf.open_dataset(urls["a1"])],
                                   store=str(tmp_path / "mixed.zarr"))
    reopened = deepstrf.open_dataset(str(tmp_path / "mixed.zarr"))
    assert type(mixed) is type(reopened) is NeuralDataset
    assert_same_dataset_items(reopened, concat_neural_datasets([ToyVideo(1), ToyAudio(3)]))


def assert_same_dataset_items(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert torch.equal(x["stims"], y["stims"]) and torch.equal(x["valid_mask"], y["valid_mask"])
        assert all(cells_equal(p, q) for p, q in zip(x["responses"], y["responses"]))


def test_sources_of_a_mixed_pool_keep_their_modality(tmp_path):
    from toydata import ToyAudio, ToyVideo

    urls = []
    for name, ds in (("v1", ToyVideo(1)), ("a1", ToyAudio(3))):
        urls.append(str(tmp_path / f"{name}.zarr"))
        deepstrf.save_dataset(ds, urls[-1])
    concat_neural_datasets([deepstrf.open_dataset(u) for u in urls], names=["v", "a"], store=str(tmp_path / "mixed.zarr"))
    for check_sources in (True, False):
        mixed = deepstrf.open_dataset(str(tmp_path / "mixed.zarr"), check_sources=check_sources)
        video, audio = mixed.responses.sources
        assert (video.H, video.W, audio.F) == (6, 5, 8)
        again = concat_neural_datasets([mixed], store=str(tmp_path / f"again-{check_sources}.zarr"))  # re-pooled
        assert again.source_names == ["v", "a"] and again.get_S() == mixed.get_S()


def test_pool_whose_entries_lack_their_modality_attributes_opens(sources, tmp_path, monkeypatch):
    """Format-2.0 pools written before each source entry recorded its own F / frame size (a
    single-kind pool then) give their sources the pool's."""
    from types import SimpleNamespace

    import deepstrf.store.pool as pool_module

    def older_dumps(obj, **kw):
        if isinstance(obj, list):
            obj = [{k: v for k, v in e.items() if k not in pool_module.MODALITY_ATTRS} for e in obj]
        return json.dumps(obj, **kw)

    monkeypatch.setattr(pool_module, "json", SimpleNamespace(dumps=older_dumps, loads=json.loads))
    url = str(tmp_path / "pool.zarr")
    concat_neural_datasets([deepstrf.open_dataset(u) for u in sources], store=url)
    pool = deepstrf.open_dataset(url, check_sources=False)
    assert "F" not in pool.pool_sources[0] and pool.F == 32
    for part in pool.responses.sources:
        assert part.F == pool.F and part.audio_fs == pool.audio_fs
    assert torch.equal(pool.stims[0], deepstrf.open_dataset(sources[0]).stims[0])


def _meet(barrier: threading.Barrier, k: int) -> int:
    barrier.wait()
    return k


def test_run_tasks_in_threads_runs_them_at_once_in_order():
    # verify checks a pool's sources in threads (each check waits on storage): four tasks that
    # wait for each other finish only when they run at the same time
    from deepstrf.engine import run_tasks

    barrier = threading.Barrier(4, timeout=10)
    found = run_tasks(_meet, [(barrier, k) for k in range(4)], failed=lambda t, e: type(e).__name__, threads=4,
                      progress=False)
    assert found == [0, 1, 2, 3]


INTERRUPTED_RUN = '''
import os, signal, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deepstrf.engine import run_tasks

def work(folder, k):
    open(os.path.join(folder, f"started{k}"), "w").close()
    time.sleep(1.0)
    return k

if __name__ == "__main__":
    import threading
    from tasks import work

    def ctrl_c():  # as a terminal does: SIGINT to the whole process group, once a task runs
        while not os.path.exists(os.path.join(sys.argv[1], "started0")):
            time.sleep(0.01)
        os.killpg(0, signal.SIGINT)

    threading.Thread(target=ctrl_c, daemon=True).start()
    try:
        run_tasks(work, [(sys.argv[1], k) for k in range(10)], failed=lambda t, e: None, jobs=2, progress=False)
    except KeyboardInterrupt:
        print("interrupted")
'''


def test_run_tasks_in_processes_stops_at_ctrl_c(tmp_path):
    # Ctrl-C during a --jobs run: the queued tasks are dropped and the workers stopped, instead of
    # every queued task running before the interrupt reached the caller
    (tmp_path / "tasks.py").write_text(INTERRUPTED_RUN)
    folder = tmp_path / "started"
    folder.mkdir()
    run = subprocess.run([sys.executable, str(tmp_path / "tasks.py"), str(folder)], capture_output=True, text=True,
                         timeout=120, start_new_session=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert run.stdout.strip() == "interrupted", run.stderr
    assert len(os.listdir(folder)) <= 3, sorted(os.listdir(folder))  # those running at Ctrl-C, and one taken then
    assert "leaked semaphore" not in run.stderr, run.stderr


def _dies_at_one(k: int) -> int:
    if k == 1:
        os._exit(9)  # as a worker killed by the out-of-memory killer, or a crash in a library
    return k


def test_run_tasks_in_processes_goes_on_after_a_worker_dies():
    # one dead worker broke the pool, and every task still queued failed with BrokenProcessPool
    from deepstrf.engine import run_tasks

    found = run_tasks(_dies_at_one, [(k,) for k in range(6)], failed=lambda t, e: f"{type(e).__name__}: {e}",
                      jobs=2, progress=False)
    assert found[:1] + found[2:] == [0, 2, 3, 4, 5]
    assert found[1].startswith("BrokenProcessPool: its worker process died (exit code 9) while it ran, also when "
                               "it ran alone"), found[1]
