"""Storage options per location: URL prefixes mapped to options, for pools whose sources live in
buckets on different servers with different credentials (two local S3 servers)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import deepstrf
from deepstrf.datasets.synthetic import SyntheticAudioDataset
from deepstrf.errors import StoreError
from deepstrf.store.options import is_per_location, load_options_file, options_for, options_from
from deepstrf.stream import StreamingNeuralDataset
from deepstrf.testing.s3 import LocalS3
from deepstrf.utils.data import concat_neural_datasets

from stream_helpers import batch_keys, loader_timeout


def test_longest_prefix_wins_and_plain_options_keep_their_meaning(tmp_path):
    per = {"s3://": {"anon": True}, "s3://lab-a": {"key": "a"}, "": {"key": "any"}, str(tmp_path): {"x": 1}}
    assert is_per_location(per) and not is_per_location({"anon": True}) and not is_per_location(None)
    assert options_for(per, "s3://lab-a/x.zarr") == {"key": "a"}
    assert options_for(per, "s3://lab-b/x.zarr") == {"anon": True}
    # whole path components: another bucket (or folder) whose name starts the same is not covered
    assert options_for(per, "s3://lab-ab/x.zarr") == {"anon": True}
    assert options_for({"s3://lab-a": {"key": "a"}, "": {"key": "any"}}, "s3://lab-ab/x") == {"key": "any"}
    assert options_for({str(tmp_path / "lab"): {"x": 2}}, str(tmp_path / "lab2" / "s.zarr")) is None
    assert options_for(per, "gs://other/x.zarr") == {"key": "any"}
    assert options_for(per, str(tmp_path / "s.zarr")) == {"x": 1}
    assert options_for({"s3://lab-a": {"key": "a"}}, "s3://lab-b/x") is None
    assert options_for({"anon": True}, "s3://anything") == {"anon": True}
    # a plain dict given with a pool: its protocol's sources, or a local pool's remote sources
    assert options_from("s3://b/pool", {"anon": True}, "s3://b/src") == {"anon": True}
    assert options_from("s3://b/pool", {"anon": True}, "https://h/src") is None
    assert options_from("/data/pool", {"anon": True}, "s3://b/src") == {"anon": True}
    with pytest.raises(ValueError, match="mixes URL prefixes"):
        is_per_location({"s3://lab-a": {}, "anon": True})
    with pytest.raises(ValueError, match=r"storage_options\['s3://lab-a'\] must be an options dict"):
        is_per_location({"s3://lab-a": "secret"})


def test_an_unknown_protocol_or_a_missing_package_is_a_store_error_naming_the_url(tmp_path, monkeypatch, capsys):
    from fsspec.registry import known_implementations

    from deepstrf.cli import main as cli_main
    from deepstrf.store import list_versions

    monkeypatch.setitem(known_implementations, "nopkg", {"class": "no_such_package_xyz.FS", "err": "Install it"})
    ds = SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.02)
    for url, said in (("s4://bucket/x.zarr", "unknown protocol s4://"),
                      ("nopkg://bucket/x.zarr", "nopkg:// needs the package 'no_such_package_xyz', which is not installed "
                                                "(Install it). Install it (pip install no_such_package_xyz)")):
        for call in (lambda: deepstrf.open_dataset(url), lambda: deepstrf.save_dataset(ds, url),
                     lambda: list_versions(url)):
            with pytest.raises(StoreError, match=re.escape(f"cannot reach {url}: {said}")):
                call()
    out = str(tmp_path / "pool.zarr")
    deepstrf.save_dataset(ds, tmp_path / "a.zarr")
    assert cli_main(["concat", out, str(tmp_path / "a.zarr"), "foo://x"]) == 1
    assert capsys.readouterr().err.startswith("deepstrf concat: error: cannot reach foo://x: unknown protocol foo://")
    assert cli_main(["info", "nopkg://bucket/x.zarr"]) == 1
    assert capsys.readouterr().err.startswith("deepstrf info: error: cannot reach nopkg://bucket/x.zarr: ")
    assert not os.path.exists(out)


def test_a_scheme_in_upper_case_reads_as_in_lower_case():
    # schemes are case-insensitive; fsspec knows only the lower-case names ("Protocol not known: Memory")
    from deepstrf.store.location import canonical_url

    assert canonical_url("S3://Bucket/Store.zarr/") == "s3://Bucket/Store.zarr"
    ds = SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.02)
    deepstrf.save_dataset(ds, "Memory://upper/a.zarr")
    assert deepstrf.open_dataset("memory://upper/a.zarr").get_S() == ds.get_S()


def test_options_file(tmp_path, monkeypatch):
    path = tmp_path / "storage.json"
    path.write_text(json.dumps({"s3://lab-a": {"key": "a"}}))
    assert load_options_file(path) == {"s3://lab-a": {"key": "a"}}
    monkeypatch.setenv("DEEPSTRF_STORAGE_OPTIONS", str(path))
    assert load_options_file() == {"s3://lab-a": {"key": "a"}}
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"json \(named by \$DEEPSTRF_STORAGE_OPTIONS\) must hold a JSON object"):
        load_options_file()
    monkeypatch.setenv("DEEPSTRF_STORAGE_OPTIONS", str(tmp_path / "absent.json"))
    with pytest.raises(ValueError, match="cannot read the storage options file"):
        load_options_file()
    monkeypatch.delenv("DEEPSTRF_STORAGE_OPTIONS")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_options_file() is None  # no default file: no options


def _source(seed):
    return SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.02, seed=seed)


@pytest.fixture(scope="module")
def two_labs(s3_server):
    """Two S3 servers (other ports), each with its own bucket, credentials and a source."""
    with LocalS3() as a, LocalS3() as b:
        a.make_bucket("lab-a")
        b.make_bucket("lab-b")
        options = {"s3://lab-a": a.storage_options(key="lab-a-key", secret="a"),
                   "s3://lab-b": b.storage_options(key="lab-b-key", secret="b")}
        deepstrf.save_dataset(_source(1), "s3://lab-a/src.zarr", storage_options=options)
        deepstrf.save_dataset(_source(2), "s3://lab-b/src.zarr", storage_options=options)
        yield a, b, options


def _stream_keys(ds, workers):
    s = StreamingNeuralDataset(ds, batch_size=2, shuffle=False)
    return sorted(k for batch in s.loader(num_workers=workers, timeout=loader_timeout(workers))
                  for k in batch_keys(batch))


def test_pool_over_two_servers_reads_each_with_its_own_options(two_labs, tmp_path, http_server):
    a, b, options = two_labs
    urls = ["s3://lab-a/src.zarr", "s3://lab-b/src.zarr"]
    pool_url = str(tmp_path / "pool.zarr")
    opened = [deepstrf.open_dataset(u, storage_options=options) for u in urls]
    concat_neural_datasets(opened, names=["a", "b"], store=pool_url, allowed_roots=["s3://lab-a", "s3://lab-b"])
    a.forget_seen()
    b.forget_seen()
    pool = deepstrf.open_dataset(pool_url, storage_options=options, allowed_roots=["s3://lab-a", "s3://lab-b"])
    memory = concat_neural_datasets([_source(1), _source(2)], names=["a", "b"])
    assert _stream_keys(pool, workers=2) == sorted(m["uid"] for m in memory.stim_meta)
    assert pool.responses[0][0].tolist() == memory.responses[0][0].tolist()
    assert {key for key, _ in a.seen} == {"lab-a-key"} and {bucket for _, bucket in a.seen} == {"lab-a"}
    assert {key for key, _ in b.seen} == {"lab-b-key"} and {bucket for _, bucket in b.seen} == {"lab-b"}
    written = b"".join(p.read_bytes() for p in (tmp_path / "pool.zarr").rglob("*") if p.is_file())
    assert b"lab-a-key" not in written and b"endpoint_url" not in written  # nothing of the options stored

    shutil.copytree(pool_url, os.path.join(http_server.root, "labs-pool.zarr"))  # the same pool, read-only
    remote = deepstrf.open_dataset(http_server.url("labs-pool.zarr"), storage_options=options,
                                   allowed_roots=["s3://lab-a", "s3://lab-b"])
    assert _stream_keys(remote, workers=0) == _stream_keys(pool, workers=0)
    a.forget_seen()  # (one moto backend serves both ports: what tells them apart is who asked whom)
    one = deepstrf.open_dataset(pool_url, storage_options=options["s3://lab-a"],
                                allowed_roots=["s3://lab-a", "s3://lab-b"])
    one.stims[one.get_S() - 1]  # noqa: B018
    assert ("lab-a-key", "lab-b") in a.seen  # one plain set of options sends lab B's requests to lab A


def test_local_pool_of_s3_sources_with_plain_options(s3_server, tmp_path):
    """The pool's plain options reach its S3 sources: write, open, stream; and the same with the CLI."""
    so = s3_server.storage_options
    urls = [s3_server.url() for _ in range(2)]
    for seed, url in enumerate(urls, 1):
        deepstrf.save_dataset(_source(seed), url, storage_options=so)
    opened = [deepstrf.open_dataset(u, storage_options=so) for u in urls]
    root = f"s3://{s3_server.bucket}"
    pool = concat_neural_datasets(opened, names=["x", "y"], store=str(tmp_path / "pool.zarr"), storage_options=so,
                                  allowed_roots=[root])
    again = deepstrf.open_dataset(str(tmp_path / "pool.zarr"), storage_options=so, allowed_roots=[root])
    assert _stream_keys(again, workers=0) == _stream_keys(pool, workers=0)
    by_url = StreamingNeuralDataset(str(tmp_path / "pool.zarr"), storage_options=so, batch_size=2, shuffle=False,
                                    open_options={"allowed_roots": [root]})  # opened again in each worker
    assert sorted(k for b in by_url.loader(num_workers=2, timeout=loader_timeout(2))
                  for k in batch_keys(b)) == _stream_keys(pool, workers=0)
    # written without source options: the pool reads with what its sources were opened with
    bare = concat_neural_datasets(opened, names=["x", "y"], store=str(tmp_path / "bare.zarr"), allowed_roots=[root])
    assert bare.stims[0].shape == opened[0].stims[0].shape

    run = subprocess.run([sys.executable, "-m", "deepstrf.cli", "concat", "cli-pool.zarr", *urls,
                          "-S", f"client_kwargs.endpoint_url={so['client_kwargs']['endpoint_url']}",
                          "--allow-root", root], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert run.returncode == 0, run.stderr
    assert "2 sources" in run.stdout
    config = tmp_path / "storage.json"
    config.write_text(json.dumps({root: so}))
    info = subprocess.run([sys.executable, "-m", "deepstrf.cli", "verify", "cli-pool.zarr", "--allow-root", root,
                           "--options", str(config)], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert info.returncode == 0, info.stderr


def test_cli_options_per_prefix_file_and_plain(tmp_path, monkeypatch):
    from deepstrf.cli import _storage_options, build_parser

    monkeypatch.setenv("HOME", str(tmp_path))  # no default options file
    monkeypatch.delenv("DEEPSTRF_STORAGE_OPTIONS", raising=False)

    def parsed(*argv):
        return _storage_options(build_parser().parse_args(["info", "x", *argv]))

    assert parsed() is None
    assert parsed("-S", "anon=true", "-S", "client_kwargs.endpoint_url=http://h") == {
        "anon": True, "client_kwargs": {"endpoint_url": "http://h"}}
    config = tmp_path / "opts.json"
    config.write_text(json.dumps({"s3://lab-a": {"key": "file"}, "s3://lab-b": {"key": "b"}}))
    assert parsed("--options", str(config), "-L", "s3://lab-a", "key=cli", "-S", "anon=true") == {
        "s3://lab-a": {"key": "cli"}, "s3://lab-b": {"key": "b"}, "": {"anon": True}}
    (tmp_path / ".config" / "deepstrf").mkdir(parents=True)
    (tmp_path / ".config" / "deepstrf" / "storage.json").write_text(json.dumps({"s3://lab-c": {"key": "c"}}))
    assert parsed() == {"s3://lab-c": {"key": "c"}}
    with pytest.raises(ValueError, match="--location-option expects KEY=VALUE"):
        parsed("-L", "s3://lab-a", "oops")
    config.write_text("{not json")
    with pytest.raises(ValueError, match="opts.json is not valid JSON"):
        parsed("--options", str(config))


def test_a_server_that_ignores_byte_ranges_serves_correct_data_with_a_warning(http_server_without_ranges, tmp_path):
    """`python -m http.server` answers a range request with the whole file: that read as a truncated,
    corrupt store ("re-create it from its source")."""
    import warnings

    import torch

    from deepstrf.cli import main as cli_main
    from deepstrf.datasets.synthetic import SyntheticAudioDataset
    from deepstrf.store.integrity import RangesIgnoredWarning
    from toydata import cells_equal

    local = str(http_server_without_ranges.root / "aa2.zarr")
    deepstrf.save_dataset(SyntheticAudioDataset("aa2", scale=0.1, time_scale=0.05, seed=2), local, progress=False)
    with pytest.warns(RangesIgnoredWarning, match="ignores byte ranges"):
        remote = deepstrf.open_dataset(http_server_without_ranges.url("aa2.zarr"))
        mine = deepstrf.open_dataset(local)
        assert all(torch.equal(remote.stims[s], mine.stims[s]) for s in range(mine.get_S()))
        assert all(cells_equal(remote.responses[s][n], mine.responses[s][n])
                   for s in range(mine.get_S()) for n in range(mine.N_neurons))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RangesIgnoredWarning)
        assert cli_main(["verify", http_server_without_ranges.url("aa2.zarr")]) == 0
