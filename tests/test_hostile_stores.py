"""Stores from strangers: damaged or hostile copies of a source and a pool are refused with named
errors, within seconds and a memory limit, or read correctly and reported by verify.

The cases (``tests/hostile_cases.py``) are a systematic list: every array's shape, chunk shape,
inner chunk shape, data type, fill value and codecs altered (in its own ``zarr.json`` and the
consolidated copy alike), every root attribute removed or given a wrong type (its fingerprint
recomputed, as a hostile writer would), every chunk object truncated, emptied and swapped. They
run in one subprocess under ``RLIMIT_AS`` with a per-case time limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CASE_SECONDS = 5.0
# A hostile writer may give an attribute another value the format allows and fingerprint it again:
# the store is then a valid store of that content (here: a bin width of 10^12 ms).
VALID_OTHER_CONTENT = {"attr dt_ms huge"}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[tuple[str, str], dict]:
    work = tmp_path_factory.mktemp("hostile")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "hostile_cases.py"), str(work), "--mem-gib", "3",
                           "--case-s", str(CASE_SECONDS)], capture_output=True, text=True, timeout=110, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    return {(r["store"], r["case"]): r for r in rows}


def test_every_case_ran(results):
    stores = {store for store, _ in results}
    assert stores == {"source.zarr", "pool.zarr"}
    assert len(results) > 400  # 8 + 6 arrays x ~20 lies, ~40 attributes x 6, every chunk 2-3 ways
    assert all(r["seconds"] < 2 * CASE_SECONDS for r in results.values())


def test_every_case_ends_in_a_named_error_or_the_right_data(results):
    failures = []
    for (store, case), r in results.items():
        refused_or_right = r["open"] in ("refused", "same") or (r["open"] == "read" and (
            r["verify"] == "reported" or case in VALID_OTHER_CONTENT))
        # a store refused on opening is reported by verify too; one read rightly may be left alone
        noticed = r["verify"] == "reported" or (r["verify"] == "clean" and r["open"] != "refused")
        if not (refused_or_right and noticed):
            failures.append(f"{store} {case}: open {r['open']}, verify {r['verify']}: {r['detail']}")
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("case, words", [
    ("attr dt_ms string", ["dt_ms", "'x'"]),
    ("responses/values: dtype complex128", ["responses/values", "complex128"]),
    ("responses/values: shape huge", ["responses/values", "shape"]),
    ("responses/offsets: shape x1e6", ["responses/offsets", "shape"]),
    ("stims/values: inner chunk 0", ["stims/values", "inner chunk"]),
    ("meta/nrn_meta: chunk huge", ["meta/nrn_meta", "chunk"]),
    ("attr n_neurons missing", ["n_neurons", "missing"]),
    ("consistent: responses/values huge", ["len(values)=1000000000000"]),
    ("consistent: n_stims huge", ["expected 1000000000"]),
])
def test_lies_reported_on_issue_are_refused_by_name(results, case, words):
    r = results[("source.zarr", case)]
    assert r["open"] == "refused" and r["verify"] == "reported"
    assert "IntegrityError" in r["detail"][0] and all(w in r["detail"][0] for w in words), r["detail"][0]


def test_a_root_whose_attributes_are_no_object_is_refused_by_name(results):
    for store in ("source.zarr", "pool.zarr"):
        r = results[(store, "root attributes string")]
        assert r["open"] == "refused" and r["verify"] == "reported", r
        assert "IntegrityError" in r["detail"][0] and "attributes are not a JSON object" in r["detail"][0], r


def test_damaged_chunks_are_refused_or_unused_and_always_reported(results):
    chunk_cases = [r for (store, case), r in results.items() if "/c/" in case]
    assert len(chunk_cases) > 20
    bad = [r for r in chunk_cases if r["verify"] != "reported" or r["open"] not in ("refused", "same")
           or (r["open"] == "same" and not r["case"].startswith("coverage/"))]  # a pool reads its sources' masks
    assert not bad, [(r["case"], r["open"], r["verify"]) for r in bad]
    assert all(r["open"] == "refused" for r in chunk_cases if r["store"] == "source.zarr")


def test_pool_lies_are_refused(results):
    for case in ("tables/sources: shape huge", "tables/sources: dtype bool", "attr digests null",
                 "attr kind string"):
        r = results[("pool.zarr", case)]
        assert r["open"] == "refused" and r["verify"] == "reported", r
        assert "pool" in r["detail"][0]
