"""``save_dataset``: write any deepSTRF-style dataset object as a format-v1 source store."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from .. import __version__
from ..datasets import views
from ..datasets.neural_dataset import DatasetValidationError, check_row
from . import format as fmt
from ..errors import StoreExistsError
from .atomic import Staging, consolidate, staged_write, store_state, stored_bytes
from .integrity import array_digest, content_hasher, fingerprint, update
from .jsonmeta import encode_meta
from .location import Location
from .options import StorageOptions
from .reader import modality_problem, read_root
from .schema import attribute_problem, is_positive_number, numeric_dtype
from .format import VERSIONS_FORMAT
from .versions import check_tag, holds_version, is_first_publish_remains, publish

ROWS_PER_READ = 4        # stims read from the source per batched call


def save_dataset(ds: Any, url: str | os.PathLike, *, storage_options: StorageOptions = None,
                 overwrite: bool = False, progress: bool | None = None, tag: str | None = None) -> str:
    """Write ``ds`` as a Zarr v3 source store at ``url`` and return its fingerprint.

    ``ds`` is any object with ``dt`` (or ``dt_ms``), ``N_neurons``, ``stims``,
    ``responses[s][n]``, ``stim_meta`` and ``nrn_meta`` (and ``F`` or ``H``/``W``),
    e.g. a deepstrf or deepSTRF dataset. ``overwrite=False`` refuses an
    existing store; with ``overwrite=True`` a source store there gets ``ds`` as
    a new version, its earlier versions staying readable
    (``open_dataset(url, version=...)``) until ``deepstrf prune``. ``tag`` names
    the version. A failed write leaves ``url`` as it was; what a killed first
    save with ``tag`` left holds no version, and ``ds`` is published into it
    (``overwrite`` or not). ``progress`` shows a bar (default: when writing to a
    terminal).
    """
    check_tag(tag)
    loc = Location.parse(url, storage_options)
    loc.check_writable()
    base = describe(ds, loc.url)
    _refuse_unreadable(attribute_problem(base, before_arrays=True), loc.url)
    _check_rows(ds, loc.url)
    state = store_state(loc)
    root = _source_root(loc) if state == "store" else None
    remains = state == "partial" and is_first_publish_remains(loc)  # published into, as a store
    if (root is not None or remains) and not overwrite and holds_version(loc, root):
        raise StoreExistsError(f"{loc.url} already holds a store; pass overwrite=True to publish a new version "
                               "of it (earlier versions stay readable until `deepstrf prune`).")
    if root is not None or remains or (tag is not None and state == "absent"):
        return publish(loc, root, lambda staging: _write(staging, ds, base, progress, loc.url), tag)
    if tag is not None:
        raise StoreExistsError(f"{loc.url} holds something other than a source store; a tagged version can only "
                               "be published to an empty URL or a source store. Choose another URL.")
    with staged_write(loc, overwrite=overwrite) as staging:
        attrs = _write(staging, ds, base, progress, loc.url)
    return attrs["fingerprint"]


def _refusal(url: str, problem: str) -> ValueError:
    """The error refusing to save a dataset to ``url`` for ``problem``."""
    return ValueError(f"save_dataset to {url}: {problem}; correct the dataset and save again (nothing was saved)")


def _refuse_unreadable(problem: str | None, url: str) -> None:
    """Refuse a dataset that open_dataset would call damaged once saved (``problem``: a schema
    or reader description of the first attribute or stimulus it refuses)."""
    if problem:
        raise _refusal(url, f"{problem}, which open_dataset would refuse")


def _check_rows(ds: Any, url: str) -> None:
    """Refuse list responses whose rows ``validate(deep=True)`` refuses (a view's cells are its own)."""
    if isinstance(ds.responses, views.ResponseGrid):
        return
    try:
        for s in range(len(ds.responses)):
            check_row(ds.responses[s], s, int(ds.N_neurons))
    except DatasetValidationError as e:
        raise _refusal(url, str(e)) from None


def _source_root(loc: Location) -> dict | None:
    """The root document at ``loc`` if it is a source store (versioned or not), else None."""
    root = read_root(loc)
    return root if (root.get("attributes") or {}).get("format") in (fmt.SOURCE_FORMAT, VERSIONS_FORMAT) else None


def describe(ds: Any, url: str) -> dict[str, Any]:
    """Content attributes of ``ds`` (everything but the arrays), checking its shape (``url``: for messages)."""
    dt = getattr(ds, "dt", None)
    dt = getattr(ds, "dt_ms", None) if dt is None else dt
    if not is_positive_number(dt):
        raise _refusal(url, f"the dataset's dt (bin width in ms) must be a finite positive number, got {dt!r}")
    S, N = len(ds.stim_meta), int(ds.N_neurons)
    for what, n, want in (("stims", len(ds.stims), S), ("responses", len(ds.responses), S),
                          ("nrn_meta", len(ds.nrn_meta), N)):
        if n != want:
            raise _refusal(url, f"len({what}) is {n}, expected {want} (S={S} stims, N={N} neurons)")
    if S == 0 or N == 0:
        raise _refusal(url, f"nothing to save (S={S} stims, N={N} neurons)")
    kind = dataset_kind(ds)
    attrs: dict[str, Any] = {
        "format": fmt.SOURCE_FORMAT, "format_version": fmt.FORMAT_VERSION, "kind": kind,
        "class_name": getattr(ds, "class_name", None) or type(ds).__name__,
        "name": getattr(ds, "name", None) if isinstance(getattr(ds, "name", None), str) else None,
        "dt_ms": float(dt), "n_stims": S, "n_neurons": N,
    }
    if kind == "audio":
        hr = getattr(ds, "hearing_range_hz", None)
        fs = getattr(ds, "audio_fs", None)  # a NumPy scalar is stored as the number it holds
        attrs.update(F=_converted(ds.F, int), audio_fs=fs.item() if isinstance(fs, np.generic) else fs,
                     hearing_range_hz=None if hr is None else _converted(hr, lambda h: [float(v) for v in h]))
    elif kind == "video":
        attrs.update(H=_converted(ds.H, int), W=_converted(ds.W, int))
    card = getattr(ds, "card", None)
    attrs["card"] = _json_card(card) if isinstance(card, dict) else None
    return attrs


def _converted(value: Any, to: Callable[[Any], Any]) -> Any:
    """``to(value)``, or ``value`` as it is where it does not convert (for the schema check to name)."""
    try:
        return to(value)
    except (TypeError, ValueError):
        return value


def dataset_kind(ds: Any) -> str:
    """``"audio"``, ``"video"`` or ``"neural"``, from class names in ``ds``'s ancestry, else its attributes."""
    mro = {c.__name__ for c in type(ds).__mro__}
    if "VideoNeuralDataset" in mro or ("AudioNeuralDataset" not in mro and _positive(ds, "H", "W")):
        return "video"
    if "AudioNeuralDataset" in mro or _positive(ds, "F"):
        return "audio"
    return "neural"


def _positive(ds: Any, *names: str) -> bool:
    return all(isinstance(getattr(ds, n, None), int) and getattr(ds, n) > 0 for n in names)


def _json_card(card: dict) -> dict:
    import json

    try:
        return json.loads(json.dumps(card, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_dataset: the dataset card must be JSON (name, license, citation, description): {e}")


class _Widen(Exception):
    """Raised by a pass that met values its array's dtype cannot hold; ``dtype``: the one to restart with."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype


class _Appender:
    """Appends 1-D pieces to a growing sharded zarr array, in whole shards, hashing the content.

    The array is created at the first write: an array shorter than one inner chunk gets a
    chunk of its own length, so reading part of it decodes no padding.
    """

    def __init__(self, group: zarr.Group, name: str, dtype: np.dtype, by_value: bool = False) -> None:
        """``by_value``: integer pieces widen the array by the range of the values appended so far
        (``append``'s ``span``), not by their types (responses)."""
        self.group, self.name = group, name
        self.dtype = np.dtype(dtype)
        self.by_value = by_value
        self.span: fmt.Span | None = None
        self.chunk = fmt.data_chunk_elems(name, self.dtype)
        self.unit = self.chunk * fmt.SHARD_CHUNKS  # writes are whole shards (no read-modify-write)
        self.array: zarr.Array | None = None
        self.hasher = content_hasher()
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.written = 0

    def append(self, piece: np.ndarray, needed: np.dtype, span: fmt.Span | None = None) -> None:
        """Queue ``piece``, whose values need ``needed`` (``span``: their (min, max) if integers)."""
        if self.by_value and span is not None:
            self.span = span if self.span is None else (min(self.span[0], span[0]), max(self.span[1], span[1]))
        if piece.size or not self.by_value:  # no values: nothing to hold
            target = fmt.widen(self.dtype, needed, self.span if self.by_value else None)
            if target != self.dtype:
                raise _Widen(target)
        piece = piece.reshape(-1).astype(self.dtype, copy=False)
        update(self.hasher, piece)
        self.pending.append(piece)
        self.n_pending += piece.size
        if self.n_pending >= self.unit:
            self._flush(final=False)

    def _create(self, length: int) -> zarr.Array:
        chunk = min(self.chunk, max(1, length))
        return self.group.create_array(self.name, shape=(0,), dtype=self.dtype, chunks=(chunk,), overwrite=True,
                                       **fmt.shards(chunk), **fmt.codecs(self.dtype))

    def _flush(self, final: bool) -> None:
        data = np.concatenate(self.pending) if self.pending else np.zeros(0, self.dtype)
        n = data.size if final else data.size - data.size % self.unit
        if self.array is None:  # the whole array when final, else at least a shard
            self.array = self._create(n)
        if n:
            self.array.resize((self.written + n,))
            self.array[self.written:self.written + n] = data[:n]
            self.written += n
        self.pending = [data[n:]] if n < data.size else []
        self.n_pending = data.size - n

    def finish(self) -> tuple[np.dtype, str, int]:
        self._flush(final=True)
        return self.dtype, array_digest(self.hasher), self.written


def _ragged_pass(group: zarr.Group, name: str, first: np.dtype, run: Callable[[_Appender], None],
                 by_value: bool = False) -> tuple[np.dtype, str, int]:
    """Run ``run`` into a fresh array, restarting with the wider dtype it asks for."""
    dtype = np.dtype(first)
    while True:
        app = _Appender(group, name, dtype, by_value)
        try:
            run(app)
        except _Widen as w:
            dtype = w.dtype
            continue
        return app.finish()


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _stim_problem(x: np.ndarray, s: int, attrs: dict[str, Any]) -> str | None:
    """What open_dataset would refuse in stimulus ``s`` (its dtype, or a shape contradicting F or H, W)."""
    if numeric_dtype(x.dtype.name) is None:
        return f"stims[{s}] has dtype {x.dtype.name}, not a boolean, integer or floating one"
    if attrs.get("kind") == "audio" and attrs.get("audio_fs") is not None and x.ndim == 2:
        return (f"stims[{s}] is a waveform {tuple(x.shape)} (audio_fs={attrs['audio_fs']}); waveform datasets "
                "(return_waveform=True) cannot be stored yet: compute spectrograms of the waveforms (e.g. "
                "deepstrf.io.spectrogram.log_mel), set F and audio_fs=None and save those. A waveform is not the "
                "(C, F, T) spectrogram a store holds")
    return modality_problem(np.array([x.shape]), attrs, first=s)


def _no_repeats(row: views.RawRow) -> str:
    """The first cell of ``row`` without repeats, described: the format stores R = 0 as a missing pair."""
    i = int(np.flatnonzero(row.repeats == 0)[0])
    return (f"responses[{row.stim}][{row.neurons[i]}] has shape (0, {row.lengths[i]}): no repeats, which a store "
            "cannot tell from a pair never recorded (it would open as missing); put "
            "deepstrf.datasets.views.missing_sentinel() there if the pair was not recorded")


def _write_small(group: zarr.Group, name: str, data: np.ndarray, digests: dict, text: bool = False) -> None:
    rows = int(np.prod(data.shape[1:])) if data.ndim > 1 else 1
    # never longer than the array: a small array's one chunk then holds (and decodes) only its data
    chunks = (max(1, min(data.shape[0], fmt.chunk_elems(data.dtype, rows))), *data.shape[1:])
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks,
                             **fmt.codecs(data.dtype, text=text))
    if data.size:
        arr[...] = data
    h = content_hasher()
    update(h, data)
    digests[name] = array_digest(h)


def _write(staging: Staging, ds: Any, attrs: dict[str, Any], progress: bool | None, url: str) -> dict[str, Any]:
    """Write ``ds`` into ``staging`` and return its attributes (``url``: where it will be published)."""
    S, N = attrs["n_stims"], attrs["n_neurons"]
    try:  # before anything is written
        meta = {name: encode_meta(list(items), label) for name, items, label in
                ((fmt.STIM_META, ds.stim_meta, "stim_meta"), (fmt.NRN_META, ds.nrn_meta, "nrn_meta"))}
    except TypeError as e:  # the messages name the entry and what to do
        raise TypeError(f"save_dataset to {url}: {e} (nothing was saved)") from None
    except ValueError as e:
        raise ValueError(f"save_dataset to {url}: {e} (nothing was saved)") from None
    root = zarr.create_group(store=staging.store, zarr_format=3, attributes={"format": fmt.SOURCE_FORMAT})
    for sub in ("responses", "stims", "meta"):
        root.create_group(sub)
    digests: dict[str, str] = {}

    # stimuli: flattened values + offsets + shapes, in their own dtype
    shapes: list[tuple[int, ...]] = []

    def stims_pass(app: _Appender) -> None:
        shapes.clear()
        for s in range(S):
            x = _to_numpy(ds.stims[s])
            if shapes and x.ndim != len(shapes[0]):
                raise ValueError(f"save_dataset: stims[{s}] has {x.ndim} dims, stims[0] has {len(shapes[0])}; "
                                 "all stimuli must have the same number of dimensions")
            _refuse_unreadable(_stim_problem(x, s, attrs), url)
            shapes.append(x.shape)
            app.append(x, x.dtype)

    first_stim = _to_numpy(ds.stims[0]).dtype
    stim_dtype, digests[fmt.STIM_VALUES], _ = _ragged_pass(root, fmt.STIM_VALUES, first_stim, stims_pass)
    shape_arr = np.array(shapes, dtype=np.int64).reshape(S, -1)
    _write_small(root, fmt.STIM_SHAPES, shape_arr, digests)
    sizes = shape_arr.prod(axis=1) if shape_arr.shape[1] else np.ones(S, np.int64)
    _write_small(root, fmt.STIM_OFFSETS, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), digests)

    # responses: ragged values (stim-major, neuron-minor) + per-cell repeats and offsets
    repeats = np.zeros((S, N), dtype=np.int64)
    counts = np.zeros((S, N), dtype=np.int64)
    bar = tqdm(total=S, desc=f"save {os.path.basename(staging.location.url) or 'store'}", unit="stim",
               disable=None if progress is None else not progress, leave=False)

    def responses_pass(app: _Appender) -> None:
        repeats[:] = 0
        counts[:] = 0
        bar.reset()
        for start in range(0, S, ROWS_PER_READ):
            batch = list(range(start, min(S, start + ROWS_PER_READ)))
            for row in views.read_raw_rows(ds.responses, batch, range(N)):
                if not row.repeats.all():
                    raise _refusal(url, _no_repeats(row))
                repeats[row.stim, row.neurons] = row.repeats
                counts[row.stim, row.neurons] = row.repeats * row.lengths
                values = np.asarray(row.values)
                app.append(values, *fmt.value_type(values))
                bar.update(1)

    try:
        value_dtype, digests[fmt.VALUES], n_values = _ragged_pass(root, fmt.VALUES, np.uint8, responses_pass,
                                                                    by_value=True)
    finally:
        bar.close()
    valid = repeats > 0
    _write_small(root, fmt.REPEATS, repeats.astype(fmt.smallest_int(0, int(repeats.max()))), digests)
    offsets = np.concatenate([[0], np.cumsum(counts.reshape(-1))]).astype(np.int64)
    _write_small(root, fmt.OFFSETS, offsets, digests)

    for name, blob in meta.items():
        _write_small(root, name, np.frombuffer(blob, dtype=np.uint8), digests, text=True)

    lengths = counts[valid] // repeats[valid]
    attrs.update(
        stim_dtype=str(stim_dtype), stim_ndim=int(shape_arr.shape[1]), response_dtype=str(value_dtype),
        stats={
            "valid_cells": int(valid.sum()), "values": int(n_values), "stim_values": int(sizes.sum()),
            "repeats_min": int(repeats[valid].min()) if valid.any() else 0,
            "repeats_max": int(repeats.max()),
            "T_min": int(lengths.min()) if lengths.size else 0,
            "T_max": int(lengths.max()) if lengths.size else 0,
            "float32_bytes": int(4 * (n_values + sizes.sum())),
        },
        arrays=dict(sorted(digests.items())),
    )
    attrs["fingerprint"] = fingerprint(attrs)
    _refuse_unreadable(attribute_problem(attrs), url)
    attrs["written_by"] = f"deepstrf {__version__}"
    attrs["nbytes_stored"] = stored_bytes(staging.location)
    root.update_attributes(attrs)
    consolidate(staging.store)
    return attrs
