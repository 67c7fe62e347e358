"""Versioned sources: re-publishing keeps earlier versions, pools pin theirs, prune, pool-update, cite."""

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch
import zarr
from toydata import cells_equal

import deepstrf
from deepstrf.cli import main as cli_main
from deepstrf.datasets.synthetic import SyntheticAudioDataset
from deepstrf.errors import IntegrityError, StoreError, StoreExistsError, VersionNotFoundError
from deepstrf.store import versions as versions_module
from deepstrf.store.location import Location
from deepstrf.store.versions import prune, versions_of
from deepstrf.utils.data import concat_neural_datasets


def aa1(seed, scale=0.1):
    return SyntheticAudioDataset("aa1", scale=scale, time_scale=0.02, seed=seed)


def same_data(a, b):
    assert (a.get_S(), a.N_neurons) == (b.get_S(), b.N_neurons)
    for s in range(a.get_S()):
        assert torch.equal(a.stims[s].float(), b.stims[s].float())
        assert all(cells_equal(a.responses[s][n], b.responses[s][n]) for n in range(a.N_neurons))


def _cli(*args, so=None):
    extra = [] if not so else ["-S", f"client_kwargs.endpoint_url={so['client_kwargs']['endpoint_url']}"]
    return cli_main([*args, *extra])


def test_republish_under_a_pool(store_url, capsys):
    base, so = store_url
    src, other = f"{base}/a.zarr", f"{base}/c.zarr"
    old, new = aa1(1), aa1(5, scale=0.15)
    fp_old = deepstrf.save_dataset(old, src, storage_options=so)
    deepstrf.save_dataset(aa1(2), other, storage_options=so)
    pool_url = f"{base}/pool.zarr"
    concat_neural_datasets([deepstrf.open_dataset(u, storage_options=so) for u in (src, other)], names=["a", "c"],
                           store=pool_url, storage_options=so)
    with pytest.raises(StoreExistsError, match="overwrite=True to publish a new version"):
        deepstrf.save_dataset(new, src, storage_options=so)
    fp_new = deepstrf.save_dataset(new, src, storage_options=so, overwrite=True, tag="sorted-again")

    latest = deepstrf.open_dataset(src, storage_options=so)
    assert latest.fingerprint == fp_new and latest.get_S() == new.get_S()
    for wanted in (fp_old, fp_old.split(":")[1][:8], "sorted-again"):
        opened = deepstrf.open_dataset(src, storage_options=so, version=wanted)
        assert opened.fingerprint == (fp_new if wanted == "sorted-again" else fp_old)
    with pytest.raises(VersionNotFoundError, match=r"version 'nope' matches no version.*sorted-again"):
        deepstrf.open_dataset(src, storage_options=so, version="nope")
    assert [v.fingerprint for v in versions_of(Location.parse(src, so))] == [fp_old, fp_new]

    pool = deepstrf.open_dataset(pool_url, storage_options=so)
    same_data(pool.responses.sources[0], old)  # the pinned version, after the source moved on

    assert _cli("info", pool_url, so=so) == 0
    assert "newer        1 source(s)" in capsys.readouterr().out
    assert _cli("info", src, so=so) == 0
    assert "tag 'sorted-again' (the latest of 2;" in capsys.readouterr().out
    assert _cli("info", src, "--version", fp_old[:15], "--json", so=so) == 0
    assert json.loads(capsys.readouterr().out)["version"]["latest"] is False
    assert _cli("versions", src, "--json", so=so) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(v["fingerprint"], v["tag"], v["n_stims"]) for v in listed] == [
        (fp_old, None, old.get_S()), (fp_new, "sorted-again", new.get_S())]

    updated_url = f"{base}/pool2.zarr"
    assert _cli("pool-update", pool_url, updated_url, so=so) == 0
    out = capsys.readouterr().out
    short = [f.split(":")[1][:12] for f in (fp_old, fp_new)]
    added = len({m["uid"] for m in new.stim_meta} - {m["uid"] for m in old.stim_meta})
    assert f"a: {short[0]} -> {short[1]}: stims +{added} -" in out and "c: unchanged" in out
    same_data(deepstrf.open_dataset(updated_url, storage_options=so).responses.sources[0], new)

    assert _cli("prune", src, "--keep", "1", so=so) == 0
    capsys.readouterr()
    with pytest.raises(VersionNotFoundError, match=rf"source 'a' at .*a.zarr is pinned to version {fp_old}.*"
                                                   rf"it holds {short[1]} tag 'sorted-again'"):
        deepstrf.open_dataset(pool_url, storage_options=so)
    with pytest.raises(VersionNotFoundError, match=r"NEW_POOL` \(in Python, opening it with accept_changed_sources"):
        deepstrf.open_dataset(pool_url, storage_options=so)
    same_data(deepstrf.open_dataset(updated_url, storage_options=so).responses.sources[0], new)
    assert _cli("verify", updated_url, "--data", so=so) == 0
    capsys.readouterr()
    assert _cli("verify", pool_url, so=so) == 1  # as opening says: the pin is gone, re-pin the pool
    assert f"deepstrf pool-update {pool_url} NEW_POOL" in capsys.readouterr().err


def test_verify_accepts_a_pin_whose_content_was_published_again(tmp_path, capsys):
    # opening falls back from a pruned version to the same content published later; verify did not
    src, pool_url = str(tmp_path / "a.zarr"), str(tmp_path / "pool.zarr")
    deepstrf.save_dataset(aa1(0), src)
    deepstrf.save_dataset(aa1(1), src, overwrite=True)
    concat_neural_datasets([deepstrf.open_dataset(src)], names=["a"], store=pool_url)  # pins that version
    deepstrf.save_dataset(aa1(2), src, overwrite=True)
    deepstrf.save_dataset(aa1(1), src, overwrite=True)  # the pinned content again, a new version
    prune(Location.parse(src), 2)  # the pinned version goes
    same_data(deepstrf.open_dataset(pool_url).responses.sources[0], aa1(1))
    assert _cli("verify", pool_url) == 0, capsys.readouterr().err


@pytest.mark.parametrize("published_before", [0, 1])
def test_reading_a_version_pruned_since_it_was_opened_says_so(tmp_path, published_before):
    """Data gone because its version was pruned is not damage: the error says the version was pruned
    since the dataset opened it and what to do (not "corrupt, run verify" on a folder now gone)."""
    src = str(tmp_path / "a.zarr")
    for seed in range(1 + published_before):
        deepstrf.save_dataset(aa1(seed), src, overwrite=seed > 0)
    concat_neural_datasets([deepstrf.open_dataset(src)], names=["a"], store=str(tmp_path / "pool.zarr"))
    pool = deepstrf.open_dataset(str(tmp_path / "pool.zarr"))
    opened = deepstrf.open_dataset(src, lazy_metadata=True)  # the store's first content, or a published version
    deepstrf.save_dataset(aa1(7), src, overwrite=True)
    prune(Location.parse(src), 1)
    for read in (lambda: opened.stims[1], lambda: opened.responses[1][0], lambda: opened.stim_meta[0],
                 lambda: pool.responses[1][0]):
        with pytest.raises(VersionNotFoundError, match=r"a.zarr: the version .*was pruned since this dataset "
                                                       r"opened it; the store now holds .*Reopen the dataset"):
            read()


def test_missing_data_of_a_version_still_published_is_damage(tmp_path):
    src = str(tmp_path / "a.zarr")
    deepstrf.save_dataset(aa1(0), src)
    deepstrf.save_dataset(aa1(1), src, overwrite=True)
    opened = deepstrf.open_dataset(src)
    shutil.rmtree(os.path.join(src, opened.version_path, "stims"))
    with pytest.raises(IntegrityError, match="corrupt, truncated or missing.*deepstrf verify"):
        opened.stims[1]


def test_verify_advice_names_the_damaged_version_and_a_pool_refuses_version(tmp_path, capsys):
    """Damage in a pinned older version is advised with `--version`: a plain `deepstrf verify SOURCE`
    checks the latest, and says OK. A pool has no versions of its own: --version is refused."""
    src, pool_url = str(tmp_path / "a.zarr"), str(tmp_path / "pool.zarr")
    fp_old = deepstrf.save_dataset(aa1(0), src)
    concat_neural_datasets([deepstrf.open_dataset(src)], names=["a"], store=pool_url)  # pins the first content
    deepstrf.save_dataset(aa1(1), src, overwrite=True)
    chunk = os.path.join(src, "responses", "values", "c", "0")  # the first content stays at the root
    data = bytearray(open(chunk, "rb").read())
    data[-10] ^= 0xFF
    open(chunk, "wb").write(data)
    assert _quiet_cli("verify", pool_url, "--data") == 1
    advice = f"deepstrf verify {src} --version {fp_old.split(':')[1][:12]}"
    assert advice in capsys.readouterr().err
    assert _quiet_cli(*advice.split()[1:]) == 1  # the advised command finds the damage
    assert _quiet_cli("verify", src) == 0  # the latest is sound
    for command in ("verify", "info", "cite"):
        assert _cli(command, pool_url, "--version", "abc") == 1
        assert f"--version chooses a version of a source store; {pool_url} is a pool" in capsys.readouterr().err


def test_every_version_is_a_plain_zarr_group_and_old_stores_convert(tmp_path):
    url = str(tmp_path / "a.zarr")
    fp_old = deepstrf.save_dataset(aa1(1), url)
    assert sorted(os.listdir(url)) == ["meta", "responses", "stims", "zarr.json"]  # as earlier releases wrote
    before = zarr.open_array(url, path="responses/values", mode="r")[:]
    fp_new = deepstrf.save_dataset(aa1(5), url, overwrite=True)
    assert sorted(os.listdir(url)) == ["manifests", "meta", "responses", "stims", "versions", "zarr.json"]
    root = zarr.open_group(url, mode="r")
    assert root.attrs["format"] == "deepstrf.versions"
    assert (zarr.open_array(url, path="responses/values", mode="r")[:] == before).all()  # the first version
    (path,) = [v.path for v in versions_of(Location.parse(url)) if v.fingerprint == fp_new]
    group = zarr.open_group(os.path.join(url, path), mode="r")  # any zarr v3 reader opens a version
    assert group.attrs["fingerprint"] == fp_new and group.attrs["format"] == "deepstrf.source"
    opened = deepstrf.open_dataset(url, version=fp_old)
    same_data(opened, aa1(1))
    assert deepstrf.save_dataset(aa1(5), url, overwrite=True) == fp_new  # the latest again: nothing new
    assert len(versions_of(Location.parse(url))) == 2
    assert _quiet_cli("verify", url) == 0 and _quiet_cli("verify", url, "--version", fp_old) == 0
    with pytest.raises(ValueError, match="keep must be at least 1"):
        prune(Location.parse(url), 0)
    concat_neural_datasets([deepstrf.open_dataset(url, version=fp_old)], store=str(tmp_path / "p.zarr"))
    with pytest.raises(StoreError, match="has no versions"):
        deepstrf.open_dataset(str(tmp_path / "p.zarr"), version=fp_old)


def test_a_tagged_first_save_is_versioned(tmp_path, capsys):
    url = str(tmp_path / "a.zarr")
    fp = deepstrf.save_dataset(aa1(1), url, tag="v1")
    assert sorted(os.listdir(url)) == ["manifests", "versions", "zarr.json"]
    assert deepstrf.open_dataset(url, version="v1").fingerprint == fp == deepstrf.open_dataset(url).fingerprint
    assert _quiet_cli("versions", url) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[1].startswith(fp.split(":")[1][:12]) and " v1 " in out[1] and "(latest)" in out[1]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("mine")
    with pytest.raises(StoreExistsError, match="tagged version can only be published to an empty URL"):
        deepstrf.save_dataset(aa1(1), str(tmp_path / "notes"), overwrite=True, tag="v1")
    assert (tmp_path / "notes" / "x.txt").read_text() == "mine"



@pytest.mark.parametrize("tag, error, match", [
    (5, TypeError, r"tag must be a str .*got int 5; pass str\(tag\)"),
    ("", ValueError, r"tag '' cannot be selected"),
    ("versions/v1", ValueError, r"tag 'versions/v1' cannot be selected.*not start with 'versions/'"),
], ids=["int", "empty", "version_path"])
def test_a_tag_open_dataset_could_not_select_is_refused(tmp_path, tag, error, match):
    """A non-str tag was stored as a JSON number that no version argument selects ('5' nor 5)."""
    url = tmp_path / "a.zarr"
    fp = deepstrf.save_dataset(aa1(1), url)
    with pytest.raises(error, match=match):
        deepstrf.save_dataset(aa1(2), url, overwrite=True, tag=tag)
    with pytest.raises(error, match=match):
        deepstrf.save_dataset(aa1(2), tmp_path / "b.zarr", tag=tag)
    assert sorted(os.listdir(tmp_path)) == ["a.zarr"] and deepstrf.open_dataset(url).fingerprint == fp
    assert not (url / "versions").exists()


def test_a_version_that_is_not_a_str_is_a_type_error(tmp_path):
    url = tmp_path / "a.zarr"
    deepstrf.save_dataset(aa1(1), url, tag="5")
    assert deepstrf.open_dataset(url, version="5").get_S() > 0
    with pytest.raises(TypeError, match=r"open_dataset: version must be a str .*got int 5; pass str\(version\)"):
        deepstrf.open_dataset(url, version=5)

def _quiet_cli(*args):
    return cli_main(list(args))


def test_failed_publish_leaves_the_old_latest(store_url, monkeypatch):
    base, so = store_url
    url = f"{base}/a.zarr"
    deepstrf.save_dataset(aa1(1), url, storage_options=so)
    fp = deepstrf.save_dataset(aa1(5), url, storage_options=so, overwrite=True)
    real_put = versions_module._put

    def crash_on_manifest(loc, key, doc):
        if key.startswith("manifests/") and doc.get("fingerprint") != fp and doc.get("path"):
            raise RuntimeError("simulated crash")
        return real_put(loc, key, doc)

    monkeypatch.setattr(versions_module, "_put", crash_on_manifest)
    with pytest.raises(RuntimeError, match="simulated crash"):
        deepstrf.save_dataset(aa1(7), url, storage_options=so, overwrite=True)
    monkeypatch.undo()
    assert deepstrf.open_dataset(url, storage_options=so).fingerprint == fp
    fs, path = Location.parse(url, so).filesystem()
    assert len(fs.ls(f"{path}/versions", detail=False)) == 1  # the failed version's group is gone
    same_data(deepstrf.open_dataset(url, storage_options=so), aa1(5))


def test_pools_written_before_versions_read_what_they_pooled(tmp_path):
    from test_pool import _edit_sources_table

    urls = [str(tmp_path / f"{n}.zarr") for n in ("a", "b")]
    for seed, url in enumerate(urls, 1):
        deepstrf.save_dataset(aa1(seed), url)
    pool = str(tmp_path / "pool.zarr")
    concat_neural_datasets([deepstrf.open_dataset(u) for u in urls], names=["a", "b"], store=pool)
    _edit_sources_table(pool, lambda entries: [e.pop("version") for e in entries])  # as earlier releases wrote
    deepstrf.save_dataset(aa1(5), urls[0], overwrite=True)
    same_data(deepstrf.open_dataset(pool).responses.sources[0], aa1(1))


def test_readers_during_publishing_see_one_version_whole(tmp_path):
    url = str(tmp_path / "a.zarr")
    seeds = (1, 5, 6, 7)  # fingerprints known before publishing: a reader may see a version first
    datasets = {deepstrf.save_dataset(aa1(seed), str(tmp_path / f"scratch-{seed}.zarr")): aa1(seed) for seed in seeds}
    deepstrf.save_dataset(aa1(1), url)
    stop, problems, reads = threading.Event(), [], [0]

    def read():
        while not stop.is_set():
            try:
                ds = deepstrf.open_dataset(url)
                same_data(ds, datasets[ds.fingerprint])
                reads[0] += 1
            except Exception as e:  # noqa: BLE001 - reported below
                problems.append(repr(e))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for seed in (5, 6, 1, 7):
            assert deepstrf.save_dataset(aa1(seed), url, overwrite=True) in datasets
    finally:
        stop.set()
        reader.join(60)
    assert not problems and reads[0] > 0


PUBLISH = """
import sys, deepstrf
from deepstrf.datasets.synthetic import SyntheticAudioDataset
print(deepstrf.save_dataset(SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.02, seed=int(sys.argv[2])),
                            sys.argv[1], overwrite=True))
"""


def test_two_concurrent_publishers_both_land(tmp_path):
    url = str(tmp_path / "a.zarr")
    first = deepstrf.save_dataset(aa1(1), url)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen([sys.executable, "-c", PUBLISH, url, str(seed)], stdout=subprocess.PIPE, text=True,
                              env=env) for seed in (5, 6)]
    published = {p.communicate(timeout=100)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert {v.fingerprint for v in versions_of(Location.parse(url))} == {first, *published}
    assert deepstrf.open_dataset(url).fingerprint in published


# publishers in threads: zarr's note about consolidated metadata stays hidden in each (atomic.consolidate)
@pytest.mark.filterwarnings("error:Consolidated metadata")
def test_concurrent_publishers_on_s3_and_http_readers(s3_server, http_server, tmp_path):
    so = s3_server.storage_options
    url = s3_server.url()
    first = deepstrf.save_dataset(aa1(1), url, storage_options=so)
    found, errors = [], []

    def publish(seed):
        try:
            found.append(deepstrf.save_dataset(aa1(seed), url, storage_options=so, overwrite=True))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=publish, args=(seed,)) for seed in (5, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not errors
    assert {v.fingerprint for v in versions_of(Location.parse(url, so))} == {first, *found}

    local = str(tmp_path / "a.zarr")  # published read-only over HTTP: the root index says it all
    deepstrf.save_dataset(aa1(1), local)
    fp = deepstrf.save_dataset(aa1(5), local, overwrite=True, tag="v2")
    shutil.copytree(local, os.path.join(http_server.root, "versioned.zarr"))
    remote = http_server.url("versioned.zarr")
    assert deepstrf.open_dataset(remote).fingerprint == fp
    same_data(deepstrf.open_dataset(remote, version=first), aa1(1))
    assert [v.tag for v in versions_of(Location.parse(remote))] == [None, "v2"]


def test_cite_and_different_licenses(tmp_path, capsys):
    urls = []
    for seed, license_, citation in ((1, "CC0-1.0", "Lab A (2020) Songs. J Neuro."),
                                     (2, "CC-BY-4.0", "Lab B (2021) Calls. eLife."),
                                     (3, "CC-BY-4.0", "Lab B (2021) Calls. eLife.")):
        ds = aa1(seed)
        ds.card = {"name": f"src{seed}", "license": license_, "citation": citation}
        urls.append(str(tmp_path / f"s{seed}.zarr"))
        deepstrf.save_dataset(ds, urls[-1])
    pool = str(tmp_path / "pool.zarr")
    concat_neural_datasets([deepstrf.open_dataset(u) for u in urls], names=["a", "b", "c"], store=pool)
    assert _quiet_cli("cite", pool) == 0
    out = capsys.readouterr().out
    assert "3 sources, 2 citations" in out and out.count("Lab B (2021)") == 1
    assert "license: CC-BY-4.0; sources: b, c" in out and "different licenses" in out
    assert _quiet_cli("cite", pool, "--bibtex") == 0
    bib = capsys.readouterr().out
    assert bib.count("@misc{") == 2 and "note = {Lab A (2020) Songs. J Neuro.}" in bib
    assert _quiet_cli("cite", urls[0]) == 0
    assert "1 source, 1 citation; licenses: CC0-1.0 (1 source)" in capsys.readouterr().out
    assert _quiet_cli("info", pool, "--offline") == 0
    assert "the sources carry different licenses" in capsys.readouterr().out


def test_cite_gives_bare_dois(tmp_path, capsys):
    url = str(tmp_path / "s.zarr")
    ds = aa1(1)
    ds.card = {"name": "sesA", "citation": "Lab A (2020)",
               "doi": ["doi:10.1234/a", "https://doi.org/10.1234/b", "http://dx.doi.org/10.1234/c", "10.1234/d"]}
    deepstrf.save_dataset(ds, url)
    assert _quiet_cli("cite", url, "--bibtex") == 0
    assert "  doi = {10.1234/a}\n" in capsys.readouterr().out
    assert _quiet_cli("cite", url) == 0
    assert "    doi: 10.1234/a, 10.1234/b, 10.1234/c, 10.1234/d\n" in capsys.readouterr().out


def test_version_paths_that_lead_outside_the_store_are_refused(tmp_path):
    from test_pool import _edit_sources_table

    from deepstrf.errors import IntegrityError

    outside = str(tmp_path / "outside.zarr")
    deepstrf.save_dataset(aa1(9), outside)
    url = str(tmp_path / "a.zarr")
    deepstrf.save_dataset(aa1(1), url)
    deepstrf.save_dataset(aa1(5), url, overwrite=True)
    pool = str(tmp_path / "pool.zarr")
    concat_neural_datasets([deepstrf.open_dataset(url)], store=pool)
    _edit_sources_table(pool, lambda entries: entries[0].update(version="versions/../../outside.zarr"))
    with pytest.raises(IntegrityError, match=r"version path 'versions/../../outside.zarr' is not a version"):
        deepstrf.open_dataset(pool)
    (manifest,) = [m for m in (tmp_path / "a.zarr" / "manifests").iterdir() if not m.name.startswith("0000")]
    doc = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**doc, "path": "../outside.zarr"}))
    with pytest.raises(IntegrityError, match=r"version path '../outside.zarr' is not a version"):
        versions_of(Location.parse(url))


class _Hooked(SyntheticAudioDataset):
    """aa1 whose ``hook`` runs once, when its stimuli have been read ``after`` times (while it is
    being published: save_dataset reads each once for the stimuli, then again for the responses)."""

    def __init__(self, seed, hook, after=0):
        super().__init__("aa1", scale=0.1, time_scale=0.02, seed=seed)
        self.hook, self.reads = hook, after

    def stim(self, s):
        self.reads -= 1
        if self.reads == -1:
            self.hook()
        return super().stim(s)


def test_a_prune_during_a_publish_does_not_bring_the_first_version_back(tmp_path):
    """publish() re-wrote the manifest of the first version (the root's arrays) from the list it read
    before its upload, although a prune had removed that version and its arrays meanwhile."""
    url = str(tmp_path / "a.zarr")
    deepstrf.save_dataset(aa1(1), url)
    second = deepstrf.save_dataset(aa1(2), url, overwrite=True, tag="v2")
    third = deepstrf.save_dataset(_Hooked(3, lambda: prune(Location.parse(url), 1)), url, overwrite=True, tag="v3")
    assert [v.fingerprint for v in versions_of(Location.parse(url))] == [second, third]
    assert not (tmp_path / "a.zarr" / "manifests" / f"{versions_module.FIRST_ID}.json").exists()
    for v in versions_of(Location.parse(url)):
        same_data(deepstrf.open_dataset(url, version=v.fingerprint), aa1(int(v.tag[1:])))


def _id_begun(hours_ago):
    from datetime import datetime, timedelta, timezone

    return f"{datetime.now(timezone.utc) - timedelta(hours=hours_ago):%Y%m%dT%H%M%S%fZ}-0123abcd"


def test_prune_keeps_a_long_publish_that_is_still_writing(tmp_path, monkeypatch):
    """prune judged a publish's age by its id (when its upload began): one begun over an hour ago
    was removed while still writing, and then reported success for a version whose data was gone."""
    url = str(tmp_path / "a.zarr")
    deepstrf.save_dataset(aa1(1), url)
    deepstrf.save_dataset(aa1(2), url, overwrite=True)
    abandoned = tmp_path / "a.zarr" / "versions" / _id_begun(3)  # a publish killed 3 h ago
    (abandoned / "stims").mkdir(parents=True)
    (abandoned / "stims" / "zarr.json").write_text("{}")
    for p in (abandoned / "stims" / "zarr.json", abandoned / "stims", abandoned):
        os.utime(p, (os.path.getmtime(p) - 3 * 3600,) * 2)
    monkeypatch.setattr(versions_module, "new_id", lambda: _id_begun(2))  # this upload began 2 h ago
    prune_then = _Hooked(3, lambda: prune(Location.parse(url), 5), after=aa1(3).get_S() + 2)  # stims written
    fp = deepstrf.save_dataset(prune_then, url, overwrite=True, tag="big")
    assert not abandoned.exists() and fp in [v.fingerprint for v in versions_of(Location.parse(url))]
    same_data(deepstrf.open_dataset(url, version="big"), aa1(3))


def test_a_publish_whose_data_was_removed_meanwhile_fails(store_url, monkeypatch):
    base, so = store_url
    url = f"{base}/a.zarr"
    deepstrf.save_dataset(aa1(1), url, storage_options=so)
    fp = deepstrf.save_dataset(aa1(2), url, storage_options=so, overwrite=True)
    monkeypatch.setattr(versions_module, "ORPHAN_AGE_S", -1)  # every folder without a manifest looks abandoned
    with pytest.raises(StoreError, match=r"a\.zarr: the new version's data .* was removed while it was being "
                                         r"written .*nothing was published\. Save the dataset again"):
        deepstrf.save_dataset(_Hooked(3, lambda: prune(Location.parse(url, so), 5)), url, storage_options=so,
                              overwrite=True)
    assert [v.fingerprint for v in versions_of(Location.parse(url, so))][-1] == fp
    fs, path = Location.parse(url, so).filesystem()
    assert len(fs.ls(f"{path}/versions", detail=False)) == 1


def _interrupt():
    raise KeyboardInterrupt


KILLED_FIRST_SAVE = """
import os, sys, deepstrf
from deepstrf.datasets.synthetic import SyntheticAudioDataset
class Killed(SyntheticAudioDataset):
    def stim(self, s):
        os._exit(137)  # killed while writing (out of memory, a job's time limit)
deepstrf.save_dataset(Killed("aa1", scale=0.1, time_scale=0.02, seed=1), sys.argv[1], tag="first")
"""


def test_an_interrupted_first_tagged_save_can_be_saved_again(tmp_path):
    """An interrupted first save with tag= left versions/ (and a killed one its staging folder, or a
    published manifest without the index): every later save was refused and nothing opened it."""
    url = str(tmp_path / "a.zarr")
    with pytest.raises(KeyboardInterrupt):
        deepstrf.save_dataset(_Hooked(1, _interrupt), url, tag="first")
    assert not os.path.exists(url) or not os.listdir(url)  # as it was
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    killed = subprocess.run([sys.executable, "-c", KILLED_FIRST_SAVE, url], env=env, timeout=100)
    assert killed.returncode == 137 and os.listdir(os.path.join(url, "versions"))
    with pytest.raises(VersionNotFoundError, match="holds no published version"):
        deepstrf.open_dataset(url)
    fp = deepstrf.save_dataset(aa1(1), url, tag="first")  # publishes into it (and removes the killed write's folder)
    assert deepstrf.open_dataset(url).fingerprint == fp and len(os.listdir(os.path.join(url, "versions"))) == 1
    with pytest.raises(StoreExistsError, match="pass overwrite=True to publish a new version"):
        deepstrf.save_dataset(aa1(2), url, tag="second")


def test_a_first_publish_cut_off_before_its_index_opens(tmp_path, monkeypatch):
    url = str(tmp_path / "a.zarr")
    real_write_index = versions_module.write_index

    def killed_once_published(loc):
        if os.path.isdir(os.path.join(url, "manifests")):
            raise SystemExit("killed")
        real_write_index(loc)

    monkeypatch.setattr(versions_module, "write_index", killed_once_published)
    with pytest.raises(SystemExit):
        deepstrf.save_dataset(aa1(1), url, tag="first")
    monkeypatch.undo()
    opened = deepstrf.open_dataset(url, version="first")
    same_data(opened, aa1(1))
    assert deepstrf.open_dataset(url).fingerprint == opened.fingerprint


def test_what_earlier_releases_left_of_an_interrupted_first_publish_is_published_into(tmp_path):
    """Earlier releases wrote a first publish's index last: a killed one left versions/ and
    manifests/ without a root zarr.json, which overwrite=True refused to touch."""
    url, staged = str(tmp_path / "a.zarr"), tmp_path / "a.zarr" / "versions" / f".{_id_begun(0)}.tmp-x~1~2~0123abcd"
    (staged / "stims").mkdir(parents=True)
    (staged / "stims" / "zarr.json").write_text("{}")
    fp = deepstrf.save_dataset(aa1(1), url, tag="first")  # killed while writing: nothing published
    assert deepstrf.open_dataset(url).fingerprint == fp
    os.remove(os.path.join(url, "zarr.json"))  # killed after its manifest: the version is published
    with pytest.raises(StoreExistsError, match="pass overwrite=True to publish a new version"):
        deepstrf.save_dataset(aa1(2), url)
    second = deepstrf.save_dataset(aa1(2), url, overwrite=True)
    assert [v.fingerprint for v in versions_of(Location.parse(url))] == [fp, second]
