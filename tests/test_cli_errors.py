"""The command line on damaged stores and bad input: problems listed, no traceback, documented exit codes."""

from __future__ import annotations

from dataclasses import dataclass
import json
import os
from pathlib import Path

import pytest

from deepstrf import concat_neural_datasets, open_dataset, save_dataset
from deepstrf.cli import main as cli_main
from deepstrf.datasets.synthetic import SyntheticAudioDataset
from deepstrf.store import format as fmt


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run(capsys):
    """Run ``deepstrf ARGS...`` in this process from folder ``cwd``; an exception escaping the
    command (a traceback for a user) fails the test."""
    def run(cwd, *args) -> Result:
        here = os.getcwd()
        os.chdir(cwd)
        try:
            code = cli_main(list(args))
        finally:
            os.chdir(here)
        out = capsys.readouterr()
        return Result(code, out.out, out.err)
    return run


@pytest.fixture
def pool(tmp_path) -> Path:
    """Two small sources under ``tmp_path`` and their pool ``tmp_path/pool.zarr``."""
    urls = []
    for name, seed in (("aa1", 1), ("aa2", 2)):
        urls.append(str(tmp_path / f"{name}.zarr"))
        save_dataset(SyntheticAudioDataset(name, scale=0.1, time_scale=0.02, seed=seed), urls[-1], progress=False)
    concat_neural_datasets([open_dataset(u) for u in urls], names=["AA1", "AA2"], store=str(tmp_path / "pool.zarr"))
    return tmp_path / "pool.zarr"


def flip_byte(path: Path, at: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[at] ^= 0xFF
    path.write_bytes(bytes(blob))


def test_verify_pool_lists_a_corrupt_chunk_of_one_source(pool, run):
    root = pool.parent
    assert run(root, "verify", "pool.zarr").returncode == 0
    chunk = next((root / "aa2.zarr" / fmt.REPEATS / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    flip_byte(chunk, chunk.stat().st_size // 2)  # the cell index of AA2: the pool's coverage check reads it
    for args in (("verify", "pool.zarr"), ("verify", "pool.zarr", "--data")):
        out = run(root, *args)
        assert out.returncode == 1, out.stderr
        assert "source 'AA2'" in out.stderr and "aa2.zarr" in out.stderr and "problem(s) found" in out.stderr
        assert "'AA1'" not in out.stderr  # the sound source is checked, and passes
    source = run(root, "verify", "aa2.zarr")
    assert source.returncode == 1 and "aa2.zarr" in source.stderr


@pytest.mark.parametrize("damage", ["truncate", "delete", "edit"])
def test_verify_checks_each_arrays_own_metadata(pool, damage, run):
    root = pool.parent
    doc = root / "aa1.zarr" / fmt.VALUES / "zarr.json"
    text = doc.read_text()
    if damage == "truncate":
        doc.write_text(text[: len(text) // 2])
    elif damage == "delete":
        doc.unlink()
    else:
        doc.write_text(text.replace('"shape": [', '"shape": [1').replace('"shape":[', '"shape":[1'))
    assert open_dataset(str(root / "aa1.zarr")).get_S() > 0  # deepstrf reads the consolidated copy only
    for url, name in (("aa1.zarr", f"{fmt.VALUES}/zarr.json"), ("pool.zarr", "source 'AA1'")):
        out = run(root, "verify", url, *(["--data"] if url == "pool.zarr" else []))
        assert out.returncode == 1, (url, out.stdout, out.stderr)
        assert name in out.stderr and f"{fmt.VALUES}/zarr.json" in out.stderr


def test_verify_checks_the_pools_own_array_metadata(pool, run):
    doc = next(p for p in pool.rglob("zarr.json") if p.parent != pool)
    doc.write_text("{")
    out = run(pool.parent, "verify", "pool.zarr")
    assert out.returncode == 1 and "cannot be parsed" in out.stderr


def test_expected_errors_print_no_traceback(pool, tmp_path, run):
    root = pool.parent
    cases = [
        (("info", "nothing-here.zarr"), "nothing-here.zarr"),
        (("verify", "nothing-here.zarr"), "nothing-here.zarr"),
        (("plot", "nothing-here.zarr"), "nothing-here.zarr"),
        (("concat", "pool.zarr", "aa1.zarr", "aa2.zarr"), "pass --overwrite"),  # the command line's words
        (("versions", "nothing-here.zarr"), "nothing-here.zarr"),
        (("versions", "pool.zarr"), "has no versions"),
        (("prune", "pool.zarr", "--keep", "1"), "has no versions"),
        (("info", "aa1.zarr", "--version", "v9"), "'v9' matches no version"),
        (("pool-update", "aa1.zarr", "new.zarr"), "is not a pool"),
        (("cite", "nothing-here.zarr"), "nothing-here.zarr"),
        (("concat", "new.zarr", "--from-list", "empty.txt"), "no input given: name files or URLs, patterns "
                                                              "(s3://bucket/stores/*.zarr)"),
        # a source that cannot be read is named (concat read its root before opening it: a bare error)
        (("concat", "new.zarr", "aa1.zarr", "http://127.0.0.1:9/x.zarr"), "http://127.0.0.1:9/x.zarr could not be read"),
    ]
    (root / "empty.txt").write_text("# nothing yet\n")
    ns1 = str(tmp_path / "ns1.zarr")
    save_dataset(SyntheticAudioDataset("ns1", scale=0.1, time_scale=0.02, seed=3), ns1, progress=False)
    cases.append((("concat", "mixed.zarr", "aa1.zarr", "ns1.zarr"), "mismatch"))
    for args, what in cases:
        out = run(root, *args)
        assert out.returncode == 1, (args, out.stderr)
        assert f"deepstrf {args[0]}: error:" in out.stderr and what in out.stderr, (args, out.stderr)
    assert not (root / "mixed.zarr").exists()


def test_a_root_whose_attributes_are_no_object_is_one_line(pool, run):
    doc = json.loads((pool.parent / "aa2.zarr" / "zarr.json").read_text())
    doc["attributes"] = "x"
    (pool.parent / "aa2.zarr" / "zarr.json").write_text(json.dumps(doc))
    for command in ("info", "verify"):
        out = run(pool.parent, command, "aa2.zarr")
        assert out.returncode == 1 and out.stderr.startswith(f"deepstrf {command}: error: "), out.stderr
        assert "aa2.zarr: the root zarr.json cannot be parsed (its attributes are not a JSON object)" in out.stderr


def test_plot_names_the_image_it_wrote(pool, run):
    out = run(pool.parent, "plot", "pool.zarr", "-o", "coverage")
    assert out.returncode == 0 and out.stdout == "wrote coverage.png\n", out.stderr
    assert (pool.parent / "coverage.png").stat().st_size > 0 and not (pool.parent / "coverage").exists()


def test_an_image_that_cannot_be_written_gets_advice_about_its_folder(pool, run, monkeypatch):
    import matplotlib.figure

    def refused(self, path, **kw):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", refused)
    out = run(pool.parent, "plot", "pool.zarr", "-o", "cov.png")
    assert out.returncode == 1 and "PermissionError" in out.stderr, out.stderr
    assert f"What to do: check that {pool.parent} is a folder you may write into" in out.stderr
    assert "endpoint" not in out.stderr


def test_exit_codes_are_documented_and_kept(capsys):
    with pytest.raises(SystemExit) as usage:
        cli_main(["no-such-command"])
    assert usage.value.code == 2
    with pytest.raises(SystemExit) as keep:
        cli_main(["prune", "x.zarr", "--keep", "0"])
    assert keep.value.code == 2 and "at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as option:  # storage options are part of the command line too
        cli_main(["info", "x.zarr", "-S", "noequals"])
    err = capsys.readouterr().err
    assert option.value.code == 2 and "--storage-option expects KEY=VALUE" in err and "usage: deepstrf info" in err
    for argv, said in ((["import-nwb", "out", "x.nwb", "--dt-ms", "-5"], "expected a number above 0, got '-5'"),
                       (["import-nwb", "out", "x.nwb", "--unit-filter", "quality"], "expected COLUMN=VALUE"),
                       (["bench", "--workers", "-1"], "expected a whole number of at least 0"),
                       (["demo", "--scale", "0"], "expected a number above 0"),
                       (["demo", "--seed", "-1"], "expected a whole number of at least 0, got '-1'"),
                       (["import-nwb", "out", "x.nwb", "--pre-ms", "nan"], "expected a number of at least 0"),
                       (["import-nwb", "out", "x.nwb", "--dt-ms", "inf"], "expected a number above 0"),
                       (["import-nwb", "out", "x.nwb", "--dask", "local:0"], "expected local:N with N >= 1"),
                       (["verify", "x.zarr", "--dask", "local:x"], "expected local:N with N >= 1"),
                       (["verify", "x.zarr", "--dask", ""], "or a scheduler address such as tcp://host:8786"),
                       (["plot", "x.zarr", "-o", "cov.unknownext"], "cannot write .unknownext images"),
                       (["plot", "x.zarr", "-o", "cov.pgf"], "cannot write .pgf images"),  # needs TeX
                       (["plot", "x.zarr", "-o", "no-such-dir/cov.png"], "the folder no-such-dir does not exist"),
                       (["plot", "x.zarr", "-o", ""], "expected the name of an image file"),
                       (["plot", "x.zarr", "-o", "."], "expected the name of an image file"),
                       (["concat", "out.zarr"], "name the stores to pool: paths or URLs, patterns (s3://bucket/stores/*.zarr)"),
                       (["concat", "out.zarr", "a.zarr", "b.zarr", "--name", "x"], "got 1 --name for 2 sources")):
        with pytest.raises(SystemExit) as bad_value:
            cli_main(argv)
        err = capsys.readouterr().err
        assert bad_value.value.code == 2 and said in err and f"usage: deepstrf {argv[0]}" in err, argv
    with pytest.raises(SystemExit) as help_exit:
        cli_main(["--help"])
    assert help_exit.value.code == 0
    text = capsys.readouterr().out
    assert "exit codes" in text
    for code in ("0", "1", "2", "130", "141"):
        assert f"\n  {code} " in text


def test_no_command_is_a_usage_error_and_starts_nothing(capsys, monkeypatch):
    from deepstrf.demo import run as demo

    monkeypatch.setattr(demo, "main", lambda args: pytest.fail("the bare command started the demo"))
    with pytest.raises(SystemExit) as bare:
        cli_main([])
    err = capsys.readouterr().err
    assert bare.value.code == 2 and err.startswith("usage: deepstrf") and "required: command" in err, err


def test_a_bad_storage_options_file_names_where_it_came_from(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPSTRF_STORAGE_OPTIONS", str(tmp_path / "absent.json"))
    with pytest.raises(SystemExit) as usage:
        cli_main(["info", "x.zarr"])
    err = capsys.readouterr().err
    assert usage.value.code == 2 and "usage: deepstrf info" in err, err
    assert "absent.json (named by $DEEPSTRF_STORAGE_OPTIONS)" in err and "unset $DEEPSTRF_STORAGE_OPTIONS" in err
    with pytest.raises(SystemExit):  # named on the command line: nothing said of the variable
        cli_main(["info", "x.zarr", "--options", str(tmp_path / "other.json")])
    err = capsys.readouterr().err
    assert "cannot read the storage options file" in err and "DEEPSTRF_STORAGE_OPTIONS" not in err, err


def test_help_is_plain_text_and_gives_bench_defaults(capsys):
    for argv in (["--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit):
            cli_main(argv)
        text = capsys.readouterr().out
        assert "``" not in text, argv
    for said in ("items per batch (default 8)", "worker processes (default 0", "(default 1)"):
        assert said in text


def test_verify_pool_finds_an_edited_coverage_table(pool, run):
    import zarr

    bits = zarr.open_array(str(pool / "coverage" / "bits"), mode="r+")
    bits[:] = ~bits[:]  # every pair of the partial blocks flipped; the recorded digest no longer matches
    out = run(pool.parent, "verify", "pool.zarr")
    assert out.returncode == 1 and "'coverage/bits' does not match its recorded digest" in out.stderr


def test_a_store_in_a_missing_bucket_is_refused_before_any_write(s3_server, tmp_path, run):
    out = run(tmp_path, "demo", "--out", "demo-out", "--store", "s3://no-such-bucket/demo",
              "-S", f"client_kwargs.endpoint_url={s3_server.endpoint_url}", "--scale", "0.05")
    assert out.returncode == 1, out.stderr
    assert "deepstrf demo: error: cannot write s3://no-such-bucket/" in out.stderr
    assert "bucket 'no-such-bucket' does not exist" in out.stderr and "mkdir('no-such-bucket')" in out.stderr


def test_an_unreachable_endpoint_is_one_line_with_what_to_do(s3_server, tmp_path, run):
    out = run(tmp_path, "info", f"s3://{s3_server.bucket}/a.zarr", "-S", "client_kwargs.endpoint_url=http://127.0.0.1:9",
              "-S", "config_kwargs.retries.max_attempts=1")
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("deepstrf info: error: EndpointConnectionError") and "127.0.0.1:9" in out.stderr
    assert "check the URL or path, the endpoint" in out.stderr


def test_verify_pool_finds_a_sources_edited_attributes_without_reading_data(pool, run):
    import json

    root = pool.parent / "aa1.zarr" / "zarr.json"
    doc = json.loads(root.read_text())
    doc["attributes"]["dt_ms"] = 5.0  # the recorded fingerprint left as it was
    root.write_text(json.dumps(doc))
    out = run(pool.parent, "verify", "pool.zarr")
    assert out.returncode == 1 and "source 'AA1'" in out.stderr
    assert "attributes do not match its recorded fingerprint" in out.stderr


def test_info_tells_sources_it_could_not_ask_from_newer_ones(pool, run):
    root = pool.parent
    sources = [open_dataset(str(root / f"{name}.zarr")) for name in ("aa1", "aa2")]
    concat_neural_datasets(sources, names=["AA1", "AA2"], store=str(root / "pools" / "pool.zarr"))
    out = run(root, "info", "pools/pool.zarr")  # its sources lie outside its folder: not asked
    assert out.returncode == 0, out.stderr
    assert "unchecked    2 source(s) could not be asked" in out.stdout and "newer   " not in out.stdout
    trusted = run(root, "info", "pools/pool.zarr", "--allow-root", str(root))
    assert "newer        none" in trusted.stdout and "unchecked" not in trusted.stdout


def test_a_source_whose_store_refuses_reads_is_named_and_the_others_checked(s3_server, tmp_path, run):
    """Wrong credentials for one of two buckets (every request answered 403): the CLI named no
    source, and verify stopped before checking the other one."""
    import uuid

    from deepstrf.errors import SourceUnreadableError

    prefix = f"s3://{s3_server.bucket}/{uuid.uuid4().hex}"
    options = s3_server.storage_options
    urls = [f"{prefix}/{name}.zarr" for name in ("aa1", "aa2")]
    for url, seed in zip(urls, (1, 2)):
        save_dataset(SyntheticAudioDataset("aa1", scale=0.05, time_scale=0.02, seed=seed), url,
                     storage_options=options, progress=False)
    concat_neural_datasets([open_dataset(u, storage_options=options) for u in urls], names=["AA1", "AA2"],
                           store=str(tmp_path / "pool.zarr"), storage_options=options)
    s3_server.sim.fail(urls[1].replace("s3:/", ""), status=403, times=None)
    common = ["--allow-root", prefix, "-S", f"client_kwargs.endpoint_url={s3_server.endpoint_url}"]
    try:
        verified = run(tmp_path, "verify", "pool.zarr", *common)
        described = run(tmp_path, "info", "pool.zarr", *common)
        with pytest.raises(SourceUnreadableError, match=r"source 'AA2' at s3://.*/aa2.zarr could not be read "
                                                         r"\(PermissionError"):
            open_dataset(str(tmp_path / "pool.zarr"), storage_options=options, allowed_roots=[prefix])
    finally:
        s3_server.sim.clear_faults()
    assert verified.returncode == 1 and "1 problem(s) found" in verified.stderr, verified.stderr
    assert "source 'AA2' at s3://" in verified.stderr and "check the storage options" in verified.stderr
    assert "'AA1'" not in verified.stderr
    assert described.returncode == 0, described.stderr
    assert "AA2: not checked: s3://" in described.stdout and "could not be read (PermissionError" in described.stdout


def test_output_piped_into_head_ends_quietly(pool):
    """`deepstrf info POOL | head -1`: the reader leaves early; that is no error of the store's."""
    import subprocess
    import sys

    script = ("import sys; from deepstrf.cli import main; "
              f"sys.exit(main(['info', {str(pool)!r}]))")
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()  # as head does after its line, before the command has written everything
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 141 and err == "", err


def test_a_broken_pipe_elsewhere_is_an_error_like_any_other(pool, run, monkeypatch):
    """Only a closed standard output ends quietly: a pipe to a server or a process is reported."""
    from deepstrf.store import commands

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(commands, "info_main", broken)
    out = run(pool.parent, "info", "pool.zarr")
    assert out.returncode == 1 and "deepstrf info: error: BrokenPipeError" in out.stderr


def test_concat_says_how_to_read_a_pool_whose_sources_lie_outside_its_folder(pool, run):
    root = pool.parent
    out = run(root, "concat", "pools/p.zarr", "aa1.zarr", "aa2.zarr")
    assert out.returncode == 0 and f"read the pool with --allow-root {root} " in out.stderr, out.stderr
    assert run(root, "verify", "pools/p.zarr").returncode == 1  # as the note says: refused without it
    assert run(root, "verify", "pools/p.zarr", "--allow-root", str(root)).returncode == 0
    inside = run(root, "concat", "p2.zarr", "aa1.zarr", "aa2.zarr")
    assert inside.returncode == 0 and "note:" not in inside.stderr


def test_bench_reads_a_pool_whose_sources_lie_outside_its_folder_with_allow_root(pool, run):
    root = pool.parent
    assert run(root, "concat", "pools/p.zarr", "aa1.zarr", "aa2.zarr").returncode == 0
    refused = run(root, "bench", "pools/p.zarr")
    assert refused.returncode == 1 and "--allow-root" in refused.stderr, refused.stderr
    out = run(root, "bench", "pools/p.zarr", "--allow-root", str(root))
    assert out.returncode == 0 and '"url": "pools/p.zarr"' in out.stdout, out.stderr
    source = run(root, "bench", "aa1.zarr", "--allow-root", str(root))  # a source takes no roots: ignored
    assert source.returncode == 0, source.stderr


def test_a_changed_source_is_reported_with_what_the_command_line_can_do(pool, run):
    import shutil

    root = pool.parent
    shutil.rmtree(root / "aa1.zarr")  # written again in place, not as a new version
    save_dataset(SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.02, seed=7), str(root / "aa1.zarr"),
                 progress=False)
    out = run(root, "plot", "pool.zarr")
    assert out.returncode == 1 and "changed after pooling" in out.stderr, out.stderr
    assert "Rewrite the pool with deepstrf concat" in out.stderr and "in Python" in out.stderr
    assert not (root / "coverage.png").exists()


def test_info_says_a_pool_no_longer_opens_once_a_pinned_version_is_pruned(pool, run):
    root = pool.parent
    save_dataset(SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.02, seed=9), str(root / "aa1.zarr"),
                 overwrite=True, progress=False)
    assert run(root, "prune", "aa1.zarr", "--keep", "1").returncode == 0
    out = run(root, "info", "pool.zarr")
    assert out.returncode == 0, out.stderr
    assert "MISSING      1 source(s) no longer hold the version the pool pins: the pool does not open" in out.stdout
    assert "  - AA1: " in out.stdout and "deepstrf pool-update" in out.stdout and "newer        none" not in out.stdout
    assert run(root, "verify", "pool.zarr").returncode == 1  # what info announced
    wrong = run(root, "info", "pool.zarr", "--version", "abc")
    assert wrong.returncode == 1 and "--version chooses a version of a source store" in wrong.stderr


def test_verify_names_a_reference_outside_the_allowed_roots_and_checks_the_other_sources(pool, run):
    import shutil

    root = pool.parent
    (root / "pools").mkdir()
    (root / "elsewhere").mkdir()
    shutil.copytree(root / "aa1.zarr", root / "pools" / "aa1.zarr")  # beside the pool: a relative reference
    shutil.copytree(root / "aa2.zarr", root / "elsewhere" / "aa2.zarr")  # outside its folder: not allowed
    sources = [open_dataset(str(root / "pools" / "aa1.zarr")), open_dataset(str(root / "elsewhere" / "aa2.zarr"))]
    concat_neural_datasets(sources, names=["AA1", "AA2"], store=str(root / "pools" / "p.zarr"))
    shutil.rmtree(root / "pools" / "aa1.zarr")
    out = run(root, "verify", "pools/p.zarr")
    assert out.returncode == 1 and "2 problem(s) found" in out.stderr, out.stderr
    assert "source 'AA1'" in out.stderr and "elsewhere/aa2.zarr" in out.stderr and "allowed roots" in out.stderr
    allowed = run(root, "verify", "pools/p.zarr", "--allow-root", str(root / "elsewhere"))
    assert "1 problem(s) found" in allowed.stderr and "source 'AA1'" in allowed.stderr
