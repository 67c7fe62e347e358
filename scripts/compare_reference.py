"""Run one scenario through deepSTRF 0.1.0 and deepstrf side by side and diff the results.

Needs an environment where both import: deepSTRF (``pip install deepstrf==0.1.0``,
GPL-3.0, only used as a black box here) and this checkout on ``PYTHONPATH``:

    PYTHONPATH=. /path/to/ref-venv/bin/python scripts/compare_reference.py

Prints one JSON line: the checks that were run and those that differ.
"""

from __future__ import annotations

import importlib
import json

import torch


def build(pkg: str, cls_path: str, seed: int, S: int, N: int, F: int, dt: float):
    """A small audio dataset subclass made the way deepSTRF loaders fill one."""
    module, name = cls_path.rsplit(".", 1)
    base = getattr(importlib.import_module(f"{pkg}.{module}"), name)

    class Toy(base):
        def __init__(self):
            super().__init__(path=f"toy{seed}", dt_ms=dt)
            g = torch.Generator().manual_seed(seed)
            torch.manual_seed(seed)
            self.F = F
            self.stims = [torch.randn(1, F, 20 + 5 * s, generator=g) for s in range(S)]
            self.responses = [[torch.poisson(torch.rand(3 + (s + n) % 3, 20 + 5 * s, generator=g) * 2)
                               if (s + n + seed) % 4 else torch.full((1, 1), float("nan"))
                               for n in range(N)] for s in range(S)]
            self.stim_meta = [{"uid": f"{seed}-s{s}", "type": ["song", "rip"][s % 2]} for s in range(S)]
            self.nrn_meta = [{"uid": f"{seed}-n{n}", "area": ["MLd", "L"][n % 2]} for n in range(N)]
            self.N_neurons = N
            self.validate()

    Toy.__name__ = f"Toy{seed}"
    return Toy()


def scenario(pkg: str) -> dict:
    data = importlib.import_module(f"{pkg}.utils.data")
    a = build(pkg, "datasets.audio.audio_dataset.AudioNeuralDataset", 1, 4, 5, 8, 1.0)
    b = build(pkg, "datasets.audio.audio_dataset.AudioNeuralDataset", 2, 3, 6, 8, 1.0)
    c = data.concat_neural_datasets([a, b], names=["A", "B"])
    out = {
        "type": type(c).__mro__[1].__name__, "S": c.get_S(), "N": c.get_N(), "len": len(c),
        "mask": c.nrn_masks.int().tolist(), "meta0": c.stim_meta[0], "nrn_last": c.nrn_meta[-1],
        "cross": c.responses[0][-1].shape, "src_meta_untouched": "dataset" not in a.stim_meta[0],
    }
    batch = data.neural_collate([c[0], c[len(c) - 1]])
    out["batch_shape"] = list(batch["responses"].shape)
    out["batch_valid"] = int(batch["valid_mask"].sum())
    out["batch_sum"] = float(torch.nan_to_num(batch["responses"]).sum())
    out["sel_attr"] = c.select_pop_by_nrn_attr("area", "MLd")
    out["len_sel"] = len(c)
    c.reset_pop_selection()
    out["stims_attr"] = c.select_stims_by_attr("type", "rip")
    out["len_stims"] = len(c)
    out["selected"] = c._selected()
    out["slice_keys"] = sorted(c[0:2].keys())
    c.reset_stim_selection()
    c.select_population(list(range(a.N_neurons)))
    out["len_pop_a"] = len(c)
    try:
        c[len(c)]
    except IndexError:
        out["index_error"] = True
    q = a.compute_neuron_quality()
    out["snr"] = [round(float(x), 4) for x in q["snr"]]
    out["ccmax"] = [round(float(x), 4) for x in q["ccmax"]]
    norm = b.normalize_responses("zscore")
    out["zscore_scale"] = [round(float(x), 4) for x in norm["scale"]]
    st = b.standardize_stims(per_band=True)
    out["stim_std"] = [round(float(x), 4) for x in st["std"].flatten()]
    b.smooth_responses(5.0)
    out["smoothed"] = round(float(b.responses[0][1].sum()), 3)
    return {k: (list(v) if isinstance(v, torch.Size) else v) for k, v in out.items()}


SURFACE = {
    "datasets.neural_dataset.NeuralDataset": [
        "__init__", "get_N", "get_S", "get_nrn_meta", "_selected", "_selected_stims", "_invalidate_nrn_masks",
        "select_neuron", "select_population", "reset_pop_selection", "select_pop_by_nrn_attr",
        "select_pop_by_nrn_predicate", "select_pop_by_stim_attr", "select_pop_by_stim_predicate", "select_stim",
        "select_stims", "select_stims_by_attr", "select_stims_by_predicate", "reset_stim_selection",
        "smooth_responses", "normalize_responses", "standardize_stims", "compute_neuron_quality", "validate",
        "__add__", "__len__", "__getitem__"],
    "datasets.audio.audio_dataset.AudioNeuralDataset": ["__init__", "get_F"],
    "datasets.video.video_dataset.VideoNeuralDataset": ["__init__"],
    "utils.data": ["concat_neural_datasets", "neural_collate", "fill_missing_data", "hanning_smooth"],
    "models.neural_model.NeuralModel": ["__init__", "count_trainable_params"],
}


def _surface(pkg: str, path: str) -> object:
    try:
        return importlib.import_module(f"{pkg}.{path}")
    except ModuleNotFoundError:
        module, cls = path.rsplit(".", 1)
        return getattr(importlib.import_module(f"{pkg}.{module}"), cls)


def public_names(pkg: str, path: str) -> list[str]:
    """The names listed in ``SURFACE`` plus every public callable ``pkg`` defines there itself (a
    class's own methods, a module's own functions and classes): what deepSTRF offers, not only what
    the contract lists."""
    import inspect

    obj = _surface(pkg, path)
    found = set(SURFACE[path])
    for name, value in vars(obj).items():
        if name.startswith("_") or inspect.ismodule(value) or not (
                callable(value) or isinstance(value, (classmethod, staticmethod))):
            continue
        if inspect.ismodule(obj) and getattr(value, "__module__", "").split(".")[0] != pkg:
            continue  # imported from elsewhere (torch, typing)
        found.add(name)
    return sorted(found)


def signatures(pkg: str, names_from: str) -> dict:
    """Parameter names and defaults of every public callable of the compatibility surface, as
    ``names_from`` (the reference) defines it; ``"missing"`` where ``pkg`` lacks one."""
    import inspect

    out = {}
    for path in SURFACE:
        obj = _surface(pkg, path)
        for name in public_names(names_from, path):
            if not hasattr(obj, name):
                out[f"{path}.{name}"] = "missing"
                continue
            params = inspect.signature(getattr(obj, name)).parameters.values()
            # keyword-only additions of ours (store=, deep=) keep every deepSTRF call valid
            out[f"{path}.{name}"] = [(p.name, repr(p.default)) for p in params if p.kind not in (p.KEYWORD_ONLY, p.VAR_KEYWORD)]
    return out


def main() -> None:
    ref, ours = scenario("deepSTRF"), scenario("deepstrf")
    ref["signatures"], ours["signatures"] = signatures("deepSTRF", "deepSTRF"), signatures("deepstrf", "deepSTRF")
    diffs = {k: {"deepSTRF": ref[k], "deepstrf": ours.get(k)} for k in ref
             if json.dumps(ref[k], default=str) != json.dumps(ours.get(k), default=str)}
    print(json.dumps({"checked": sorted(ref), "differences": diffs}, default=str))


if __name__ == "__main__":
    main()
