"""Lazy block-diagonal concatenation of datasets along stims and neurons."""

from __future__ import annotations

import functools
import inspect
import warnings
from collections import Counter
from collections.abc import Callable, Sequence

import torch

from ..errors import IncompatibleDatasetsError
from .neural_dataset import NeuralDataset
from .views import BlockDiagonalGrid, ConcatSequence

UID_KEY = "uid"
_PACKAGE = __name__.split(".")[0]


class DuplicateUIDWarning(UserWarning):
    """Two sources of a concatenation share stim or neuron UIDs."""


def concat_datasets(datasets: Sequence[NeuralDataset], names: Sequence[str] | None = None) -> NeuralDataset:
    """Concatenate datasets along both axes (see ``concat_neural_datasets``).

    Costs O(S + N): the result's ``stims`` and ``responses`` are views over
    the sources, and ``nrn_masks`` is assembled from the sources' masks.
    """
    datasets = list(datasets)
    if not datasets:
        raise ValueError("concat_neural_datasets needs at least one dataset, got an empty list")
    for i, d in enumerate(datasets):
        if not isinstance(d, NeuralDataset):
            raise TypeError(
                f"concat_neural_datasets: entry {i} is a {type(d).__name__}, not a NeuralDataset; "
                "pass only dataset instances")
    if names is not None:
        names = list(names)
        if len(names) != len(datasets):
            raise ValueError(
                f"names must have one entry per dataset (got {len(names)} names for {len(datasets)} datasets)")
    if len(datasets) == 1:
        return datasets[0]
    labels = names if names is not None else [default_name(d) for d in datasets]
    _check_compatible(datasets, [str(x) for x in labels])

    parts, part_names = _flatten(datasets, names)
    _ask_users_checks(parts, [str(x) for x in part_names])
    parts = [_as_pooled(d) for d in parts]
    out_cls = _common_ancestor(datasets)
    out = out_cls.__new__(out_cls)
    NeuralDataset.__init__(out, path="+".join(str(d.path) for d in parts), dt_ms=datasets[0].dt)
    for d in datasets:
        if isinstance(d, out_cls):
            out._concat_copy_attrs(d)
            break
    if all(isinstance(d.stims, list) for d in parts):  # in memory: a list, as deepSTRF gives (O(S))
        out.stims = [x for d in parts for x in d.stims]
    else:
        out.stims = ConcatSequence([d.stims for d in parts])
    out.responses = BlockDiagonalGrid(parts)
    out.stim_meta = [{**m, "dataset": name} for d, name in zip(parts, part_names) for m in d.stim_meta]
    out.nrn_meta = [{**m, "dataset": name} for d, name in zip(parts, part_names) for m in d.nrn_meta]
    out.N_neurons = out.responses.n_neurons
    out.source_names = list(part_names)
    out.duplicate_uids = _report_duplicates(parts, part_names)
    out.validate()
    return out


def _as_pooled(d: NeuralDataset) -> NeuralDataset:
    """``d`` as the concatenation keeps it: a shallow copy (O(1)), so that a transform or edit
    later assigned on ``d`` (``d.responses = ...``, ``d.stims = ...``) does not reach the pool, as
    deepSTRF's concatenation copies its sources. The lists of an in-memory source are copied too
    (O(S)): a row or stim replaced in them stays out as well. Cells are shared: a cell assigned by
    hand (``d.responses[s][n] = x``) reaches the pool's data; the pool's masks follow once the
    pool's are reset (``pool._invalidate_nrn_masks()`` resets these copies too)."""
    own = getattr(d, "__dict__", None)
    if own is None:
        return d
    kept = object.__new__(type(d))
    vars(kept).update(own)
    for name in ("responses", "stims"):
        if isinstance(own.get(name), list):
            vars(kept)[name] = list(own[name])
    return kept


def plain_concat_parts(d: NeuralDataset) -> list[NeuralDataset] | None:
    """The sources of ``d`` if it is a concatenation untouched since it was made (no transform,
    assigned cell or stim), else None."""
    grid, stims = d.responses, d.stims
    if not (isinstance(grid, BlockDiagonalGrid) and not grid._transforms and not grid._overrides
            and getattr(d, "source_names", None)):
        return None
    if isinstance(stims, ConcatSequence):
        untouched = not stims._overrides
    else:
        made_with = [x for part in grid.sources for x in part.stims]
        untouched = len(made_with) == len(stims) and all(x is y for x, y in zip(stims, made_with))
    return list(grid.sources) if untouched else None


def _signature(d: NeuralDataset) -> tuple:
    """What compatibility depends on: class, bin width and stimulus geometry (with the shape
    apart from time of the first stimulus, e.g. its channel count, where the stimuli are a list)."""
    first = d.stims[0] if isinstance(d.stims, list) and d.stims else None
    return (type(d), d.dt, *(getattr(d, k, None) for k in ("F", "audio_fs", "H", "W")),
            tuple(first.shape[:-1]) if isinstance(first, torch.Tensor) else None)


def _check_compatible(datasets: Sequence[NeuralDataset], labels: Sequence[str]) -> None:
    """O(K): group the inputs by :func:`_signature`, check the first of each group against the
    first of every other (a handful of groups), and report every mismatch, naming both sides
    and how many inputs share each side."""
    groups: dict[tuple, list[int]] = {}
    for i, d in enumerate(datasets):
        groups.setdefault(_signature(d), []).append(i)
    firsts = [members[0] for members in groups.values()]
    sizes = {members[0]: len(members) for members in groups.values()}
    errors = []
    for x, a in enumerate(firsts):
        for b in firsts[x + 1:]:
            try:
                _ask(datasets[a], datasets[b], (_label(labels, a, sizes), _label(labels, b, sizes)))
            except IncompatibleDatasetsError as e:
                errors.append(str(e))
    if len(errors) == 1:
        raise IncompatibleDatasetsError(errors[0])
    if errors:
        raise IncompatibleDatasetsError(f"{len(errors)} incompatibilities:\n" + "\n".join(f"- {e}" for e in errors))


def _ask_users_checks(parts: Sequence[NeuralDataset], labels: Sequence[str]) -> None:
    """A check of the user's own (deepSTRF's documented hook) may look at any attribute: as deepSTRF
    does, the first source's check sees every other source (a pool given as an input stands for its
    sources, which hold the attributes their class sets)."""
    first = parts[0]
    if not type(first)._concat_check_compat.__module__.startswith(f"{_PACKAGE}."):
        for i in range(1, len(parts)):
            _ask(first, parts[i], (labels[0], labels[i]))


def _ask(a: NeuralDataset, b: NeuralDataset, names: tuple[str, str]) -> None:
    """``a._concat_check_compat(b)``, naming both sides where the method takes ``names`` (a
    deepSTRF-style override takes only ``other``)."""
    if _takes_names(type(a)._concat_check_compat):
        a._concat_check_compat(b, names=names)
    else:
        a._concat_check_compat(b)


@functools.cache
def _takes_names(check: Callable) -> bool:
    parameters = inspect.signature(check).parameters
    return "names" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _label(labels: Sequence[str], i: int, sizes: dict[int, int]) -> str:
    more = sizes[i] - 1
    return labels[i] if not more else f"{labels[i]} (and {more} more input(s) like it)"


def default_name(d: NeuralDataset) -> str:
    """The provenance label of ``d`` when no ``names`` are given: its ``name``, else its class
    name; a store-backed dataset's class is the generic kind, so the class name it was saved
    with (``class_name``) stands for it."""
    recorded = getattr(d, "class_name", None)
    return getattr(d, "name", None) or (recorded if isinstance(recorded, str) and recorded else type(d).__name__)


def _flatten(datasets: list[NeuralDataset], names: list[str] | None):
    """Expand inputs that are themselves untouched concatenations into their parts.

    Inner provenance labels are kept unless ``names`` overrides them, so that
    ``concat([concat([a, b]), c]) == concat([a, b, c])``.
    """
    parts, part_names = [], []
    for i, d in enumerate(datasets):
        inner = plain_concat_parts(d)
        if inner is not None:
            parts.extend(inner)
            part_names.extend(d.source_names if names is None else [names[i]] * len(d.source_names))
        else:
            parts.append(d)
            part_names.append(default_name(d) if names is None else names[i])
    return parts, part_names


def _common_ancestor(datasets: Sequence[NeuralDataset]) -> type:
    """Most specific class every input is an instance of (at least NeuralDataset)."""
    for cls in type(datasets[0]).__mro__:
        if issubclass(cls, NeuralDataset) and all(isinstance(d, cls) for d in datasets):
            return cls
    return NeuralDataset


def _report_duplicates(parts: Sequence[NeuralDataset], part_names: Sequence[str]) -> dict:
    """UIDs (``meta["uid"]``) found in more than one source; warns if any."""
    report = {}
    for axis, attr in (("stim", "stim_meta"), ("neuron", "nrn_meta")):
        seen = Counter()
        for d in parts:
            seen.update({m[UID_KEY] for m in getattr(d, attr) if UID_KEY in m})
        report[axis] = sorted((str(u) for u, c in seen.items() if c > 1))
    if report["stim"] or report["neuron"]:
        warnings.warn(
            f"duplicate UIDs across sources {list(part_names)}: {len(report['stim'])} stim and "
            f"{len(report['neuron'])} neuron UIDs appear in more than one source "
            f"(e.g. {(report['stim'] + report['neuron'])[:3]}); coverage counts may mislead. "
            "Check that you are not pooling a dataset with a subset of itself.",
            DuplicateUIDWarning, stacklevel=3)
    return report
