"""Damaged and hostile copies of a small source and a small pool, each opened, read and verified.

Run as ``python tests/hostile_cases.py WORKDIR [--mem-gib G] [--case-s T]`` (by
``test_hostile_stores.py``, in its own process under a memory limit: G GiB more than it maps before
the first case): prints one JSON object
per case, ``{"case", "store", "open", "verify", "detail"}``, where ``open`` is ``refused`` (an
error of ``deepstrf.errors`` naming the store), ``same`` (opened and read the original data),
``read`` (opened, read other data) or a failure (``unnamed``, ``crash``, ``timeout``,
``memory``); ``verify`` is ``reported`` (problems or a named error), ``clean`` or a failure.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import resource
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

HUGE = 10 ** 12
Mutation = Callable[[dict], Any]


class CaseTimeout(BaseException):
    """The case ran past its time limit (a BaseException: no ``except Exception`` swallows it)."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(*_):
        raise CaseTimeout()

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# -- mutations of metadata documents ---------------------------------------------------------------
def _set(path: tuple, value: Any) -> Mutation:
    def apply(doc: dict) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value(node[path[-1]]) if callable(value) else value
    return apply


_DELETE = object()


def array_mutations(meta: dict) -> dict[str, Mutation]:
    """Lies an array's ``zarr.json`` can tell: shapes, chunk shapes (outer and inner), data types."""
    out = {
        "shape x1e6": _set(("shape",), lambda s: [n * 10 ** 6 + 1 for n in s]),
        "shape huge": _set(("shape",), lambda s: [HUGE] + s[1:]),
        "shape 0": _set(("shape",), lambda s: [0] * len(s)),
        "shape negative": _set(("shape",), lambda s: [-5] * len(s)),
        "shape string": _set(("shape",), lambda s: ["7"] * len(s)),
        "shape extra dim": _set(("shape",), lambda s: s + [3]),
        "shape missing": _set(("shape",), _DELETE),
        "chunk 0": _set(("chunk_grid", "configuration", "chunk_shape"), lambda c: [0] * len(c)),
        "chunk huge": _set(("chunk_grid", "configuration", "chunk_shape"), lambda c: [HUGE] + c[1:]),
        "chunk negative": _set(("chunk_grid", "configuration", "chunk_shape"), lambda c: [-1] * len(c)),
        "chunk grid missing": _set(("chunk_grid",), _DELETE),
        "dtype complex128": _set(("data_type",), "complex128"),
        "dtype string": _set(("data_type",), "string"),
        "dtype bool": _set(("data_type",), "bool"),
        "dtype float16": _set(("data_type",), "float16"),
        "dtype int64": _set(("data_type",), "int64"),
        "dtype unknown": _set(("data_type",), "int128"),
        "dtype number": _set(("data_type",), 7),
        "fill string": _set(("fill_value",), "abc"),
        "codecs empty": _set(("codecs",), []),
        "codec unknown": _set(("codecs",), [{"name": "no-such-codec"}]),
    }
    if meta["codecs"][0]["name"] == "sharding_indexed":
        inner = ("codecs", 0, "configuration", "chunk_shape")
        out.update({"inner chunk 0": _set(inner, [0]), "inner chunk huge": _set(inner, [HUGE]),
                    "inner chunk 1": _set(inner, [1])})
    return out


ATTR_VALUES = {"missing": _DELETE, "string": "x", "list": [1], "null": None, "negative": -3, "huge": HUGE}


def attribute_mutations(attrs: dict) -> dict[str, Mutation]:
    """Each root attribute given each wrong type (or removed), the fingerprint recomputed to match."""
    return {f"attr {key} {label}": _set(("attributes", key), value)
            for key in sorted(attrs) if key != "fingerprint" for label, value in ATTR_VALUES.items()}


# -- damaged copies ------------------------------------------------------------------------------------
def rewrite_array_meta(store: Path, name: str, mutate: Mutation) -> None:
    """Apply ``mutate`` to array ``name``'s own ``zarr.json`` and its consolidated copy in the root."""
    own = store / name / "zarr.json"
    doc = json.loads(own.read_text())
    mutate(doc)
    own.write_text(json.dumps(doc))
    root = json.loads((store / "zarr.json").read_text())
    nodes = root["consolidated_metadata"]["metadata"]
    nodes[name] = copy.deepcopy(doc)
    (store / "zarr.json").write_text(json.dumps(root))


def rewrite_attributes(store: Path, mutate: Mutation) -> None:
    """Apply ``mutate`` to the root document, then record the fingerprint of the attributes it left."""
    from deepstrf.store.integrity import fingerprint

    root = json.loads((store / "zarr.json").read_text())
    mutate(root)
    attrs = root["attributes"]
    try:
        attrs["fingerprint"] = fingerprint(attrs)
    except (TypeError, ValueError):
        pass
    (store / "zarr.json").write_text(json.dumps(root))


def chunk_files(store: Path) -> list[Path]:
    return sorted(p for p in store.rglob("*") if p.is_file() and "c" in p.relative_to(store).parts)


def chunk_damages(store: Path) -> dict[str, Callable[[Path], None]]:
    """Each chunk object truncated, emptied, swapped with another array's first chunk."""
    out = {}
    files = chunk_files(store)
    for f in files:
        rel = f.relative_to(store)
        out[f"{rel} truncated"] = lambda s, rel=rel: _truncate(s / rel, 0.5)
        out[f"{rel} emptied"] = lambda s, rel=rel: _truncate(s / rel, 0.0)
    for a, b in zip(files, files[1:] + files[:1]):
        if a.parent.parent != b.parent.parent:
            ra, rb = a.relative_to(store), b.relative_to(store)
            out[f"{ra} swapped with {rb}"] = lambda s, ra=ra, rb=rb: _swap(s / ra, s / rb)
    return out


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _swap(a: Path, b: Path) -> None:
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)


def cases(store: Path) -> dict[str, Callable[[Path], None]]:
    """Every damage applied to a copy of ``store`` (a function of the copy's path)."""
    root = json.loads((store / "zarr.json").read_text())
    out: dict[str, Callable[[Path], None]] = {}
    for name, meta in sorted(root["consolidated_metadata"]["metadata"].items()):
        if meta.get("node_type") != "array":
            continue
        for label, mutate in array_mutations(meta).items():
            out[f"{name}: {label}"] = lambda s, name=name, mutate=mutate: rewrite_array_meta(s, name, mutate)
    for label, mutate in attribute_mutations(root["attributes"]).items():
        out[label] = lambda s, mutate=mutate: rewrite_attributes(s, mutate)
    out["attr dt_ms changed, fingerprint stale"] = lambda s: _stale_dt(s)
    out["root attributes string"] = lambda s: _attributes_string(s)
    if root["attributes"].get("format") == "deepstrf.source":
        out.update(consistent_lies())
    out.update(chunk_damages(store))
    return out


def consistent_lies() -> dict[str, Callable[[Path], None]]:
    """A hostile writer's lies that agree with each other: sizes declared in the attributes, in
    every array document they imply, and in a recomputed fingerprint, far beyond what is stored."""
    def values_huge(store: Path) -> None:
        rewrite_array_meta(store, "responses/values", _set(("shape",), [HUGE]))
        rewrite_attributes(store, _set(("attributes", "stats", "values"), HUGE))

    def stims_huge(store: Path) -> None:
        root = json.loads((store / "zarr.json").read_text())
        S, N = 10 ** 9, root["attributes"]["n_neurons"]
        for name, shape in (("responses/offsets", [S * N + 1]), ("responses/repeats", [S, N]),
                            ("stims/offsets", [S + 1]), ("stims/shapes", [S, root["attributes"]["stim_ndim"]])):
            rewrite_array_meta(store, name, _set(("shape",), shape))
        rewrite_attributes(store, _set(("attributes", "n_stims"), S))

    return {"consistent: responses/values huge": values_huge, "consistent: n_stims huge": stims_huge}


def _stale_dt(store: Path) -> None:
    root = json.loads((store / "zarr.json").read_text())
    root["attributes"]["dt_ms"] = 2 * root["attributes"]["dt_ms"]
    (store / "zarr.json").write_text(json.dumps(root))


def _attributes_string(store: Path) -> None:
    root = json.loads((store / "zarr.json").read_text())
    root["attributes"] = "x"
    (store / "zarr.json").write_text(json.dumps(root))


# -- reading a copy the way users do -------------------------------------------------------------------
def read_all(url: str) -> list[np.ndarray]:
    """Everything a user reads from the store: metadata, every stimulus and every cell."""
    from deepstrf import open_dataset

    ds = open_dataset(url)
    out = [np.asarray(json.dumps([dict(m) for m in ds.stim_meta] + [dict(m) for m in ds.nrn_meta],
                                 default=str).encode()),
           np.asarray([ds.dt_ms, len(ds.stims), ds.N_neurons], dtype=float)]
    for s in range(len(ds.stims)):
        out.append(np.asarray(ds.stims[s]))
        out.extend(np.asarray(cell) for cell in ds.responses[s])
    return out


def verify(url: str) -> list[str]:
    """The problems ``deepstrf verify --data URL`` prints."""
    from deepstrf.store.commands import verify_main

    args = argparse.Namespace(url=url, storage_options=None, allow_root=[], data=True, dask=None, version=None)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = verify_main(args)
    problems = [line for line in err.getvalue().splitlines() if line.startswith("deepstrf verify: problem: ")]
    assert bool(code) == bool(problems), (code, err.getvalue())
    return problems


def outcome(step: Callable[[], Any], url: str, seconds: float) -> tuple[str, Any]:
    """``("ok", result)`` or how the step failed: ``refused`` (named store error), ``unnamed``,
    ``crash``, ``timeout``, ``memory``."""
    from deepstrf.errors import StoreError

    try:
        with time_limit(seconds):
            return "ok", step()
    except CaseTimeout:
        return "timeout", f"ran past {seconds} s"
    except MemoryError as e:
        return "memory", repr(e)
    except StoreError as e:
        return ("refused" if url in str(e) else "unnamed"), f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - any other exception is the failure being looked for
        return "crash", f"{type(e).__name__}: {e}"


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y, equal_nan=x.dtype.kind == "f")
                                    for x, y in zip(a, b))


class Workspace:
    """One working copy of the pristine stores, restored after each case and renamed for the next
    (a new URL per case: nothing read from one case is remembered for another)."""

    def __init__(self, pristine: Path, work: Path) -> None:
        self.work, self.n = work, 0
        self.base = work / "case0"
        shutil.copytree(pristine, self.base)
        self.files = {p.relative_to(self.base): p.read_bytes() for p in self.base.rglob("*") if p.is_file()}

    def next(self) -> Path:
        for rel, data in self.files.items():
            path = self.base / rel
            if not path.is_file() or path.read_bytes() != data:
                path.write_bytes(data)
        self.n += 1
        self.base = self.base.rename(self.work / f"case{self.n}")
        return self.base


def run_case(label: str, store_name: str, damage: Callable[[Path], None], space: Workspace,
             expected: list[np.ndarray], seconds: float) -> dict:
    target = space.next() / store_name
    damage(target)
    url = str(target)
    started = time.perf_counter()
    opened, data = outcome(lambda: read_all(url), url, seconds)
    if opened == "ok":
        opened = "same" if same(data, expected) else "read"
        data = None
    checked, problems = outcome(lambda: verify(url), url, seconds)
    if checked == "ok":
        checked = ("reported" if all(url in p for p in problems) else "unnamed") if problems else "clean"
        problems = problems[:1]
    elif checked == "refused":
        checked = "reported"
    return {"case": label, "store": store_name, "open": opened, "verify": checked,
            "detail": [data, problems], "seconds": round(time.perf_counter() - started, 3)}


def build(work: Path) -> dict[str, Path]:
    """A small source and a pool of two small sources, under ``work/pristine``."""
    from toydata import ToyAudio

    from deepstrf import concat_neural_datasets, open_dataset, save_dataset

    base = work / "pristine"
    save_dataset(ToyAudio(seed=1, S=3, N=4), str(base / "source.zarr"))
    save_dataset(ToyAudio(seed=2, S=2, N=3), str(base / "other.zarr"))
    parts = [open_dataset(str(base / n)) for n in ("source.zarr", "other.zarr")]
    concat_neural_datasets(parts, store=str(base / "pool.zarr"))
    return {"source.zarr": base / "source.zarr", "pool.zarr": base / "pool.zarr"}


def mapped_bytes() -> int:
    """This process's virtual size (``VmSize``)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("work", type=Path)
    p.add_argument("--mem-gib", type=float, default=3.0,
                   help="address space allowed beyond what the process maps once its stores are built")
    p.add_argument("--case-s", type=float, default=5.0)
    p.add_argument("--only", default="", help="run the cases whose label contains this")
    args = p.parse_args()
    stores = build(args.work)
    # relative: a CUDA build of torch alone maps ~3 GiB of address space on import
    limit = mapped_bytes() + int(args.mem_gib * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    space = Workspace(args.work / "pristine", args.work)
    for store_name, pristine in stores.items():
        expected = read_all(str(pristine))
        for label, damage in cases(pristine).items():
            if args.only in label:
                print(json.dumps(run_case(label, store_name, damage, space, expected, args.case_s), default=str),
                      flush=True)


if __name__ == "__main__":
    main()
