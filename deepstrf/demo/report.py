"""Figures (PNG) and the written report (``report.md`` + ``report.json``) of the demo.

Every figure is drawn from the same dict that is written to
``report.json``, so the JSON holds the data behind every figure.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

FIGURES = {
    "coverage": "coverage.png",
    "scores": "scores_per_source.png",
    "learning_curves": "learning_curves.png",
    "pooling": "pooled_vs_single.png",
    "example": "example_neuron.png",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays to Python, non-finite floats to ``None``."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


def plot_coverage(rep: dict, path: Path) -> None:
    plt = _plt()
    cov = rep["coverage"]
    mask = np.array([[c == "1" for c in row] for row in cov["rows"]], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.imshow(mask, aspect="auto", interpolation="nearest", cmap="Greys", vmin=0, vmax=1)
    for blk in cov["blocks"]:
        s0, s1 = blk["stims"]
        n0, n1 = blk["neurons"]
        ax.add_patch(plt.Rectangle((n0 - 0.5, s0 - 0.5), n1 - n0, s1 - s0, fill=False, ec="tab:red", lw=1))
        ax.text((n0 + n1) / 2, s0 - 0.8, blk["name"], ha="center", va="bottom", color="tab:red", fontsize=9)
    ax.set_xlabel("neuron (global id)")
    ax.set_ylabel("stimulus (global index)")
    ax.set_title(f"Pool coverage: {cov['valid_fraction'] * 100:.1f}% of (stim, neuron) pairs recorded", pad=16)
    _save(fig, path)


def plot_scores(rep: dict, path: Path) -> None:
    plt = _plt()
    table = rep["scores"]["per_neuron"]
    sources = list(rep["scores"]["per_source"])
    keys = [("cc_truth", "CC vs ground truth"), ("cc_raw", "raw CC vs PSTH"), ("cc_norm", "normalised CC")]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8), sharey=False)
    rng = np.random.default_rng(0)
    for ax, (key, title) in zip(axes, keys):
        data = [np.array([v for s, v in zip(table["source"], table[key]) if s == src and v is not None])
                for src in sources]
        ax.boxplot([d if d.size else np.array([np.nan]) for d in data], showfliers=False)
        ax.set_xticks(range(1, len(sources) + 1), sources)
        for i, d in enumerate(data):
            ax.plot(i + 1 + rng.uniform(-0.18, 0.18, d.size), d, ".", ms=3, alpha=0.5, color="tab:blue")
        ax.set_title(title)
        ax.axhline(0, color="grey", lw=0.5)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("per-neuron score (held-out stims)")
    fig.suptitle("Pooled model, held-out stimuli, per source")
    _save(fig, path)


def plot_learning_curves(rep: dict, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"pooled": "tab:blue", "single_same_steps": "tab:orange", "single_same_epochs": "tab:green"}
    for name, curve in rep["learning_curves"].items():
        c = styles.get(name, None)
        steps = np.asarray(curve["steps_at_epoch"])
        ep = np.arange(1, len(curve["train_loss"]) + 1)
        for ax, x in zip(axes, (ep, steps)):
            ax.plot(x, curve["train_loss"], "-", color=c, label=f"{curve['label']}: train")
            if curve.get("heldout_loss"):
                hx = np.asarray(curve["heldout_epochs"])
                ax.plot(hx if x is ep else steps[hx - 1], curve["heldout_loss"], "--", color=c,
                        label=f"{curve['label']}: held-out")
    axes[0].set_xlabel("epoch")
    axes[1].set_xlabel("gradient steps")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("Poisson NLL per observation")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Learning curves (train: each model's own training stims; held-out: monitored only, never "
                 "used for selection)", fontsize=9)
    _save(fig, path)


def plot_pooling(rep: dict, path: Path) -> None:
    plt = _plt()
    pool = rep["pooling"]
    pooled = np.array([np.nan if v is None else v for v in pool["per_neuron"]["pooled"]], dtype=float)
    fig, axes = plt.subplots(1, len(pool["per_neuron"]) - 1, figsize=(9, 4), squeeze=False)
    for ax, key in zip(axes[0], [k for k in pool["per_neuron"] if k != "pooled"]):
        single = np.array([np.nan if v is None else v for v in pool["per_neuron"][key]], dtype=float)
        ax.plot(single, pooled, ".", alpha=0.7)
        both = np.r_[single, pooled]
        both = both[np.isfinite(both)]
        lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
        pad = 0.05 * max(hi - lo, 0.02)
        lo, hi = lo - pad, hi + pad
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ok = np.isfinite(single) & np.isfinite(pooled)
        ax.text(0.03, 0.97, f"pool better for {int((pooled[ok] > single[ok]).sum())}/{int(ok.sum())} neurons",
                transform=ax.transAxes, va="top", fontsize=8)
        ax.set_xlabel(f"{pool['variants'][key]['label']}")
        ax.set_ylabel("trained on the pool")
        ax.set_title(f"{pool['source']} neurons, CC vs ground truth", fontsize=9)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    _save(fig, path)


def plot_example(rep: dict, path: Path) -> None:
    plt = _plt()
    ex = rep["example"]
    t = np.arange(len(ex["psth"])) * ex["dt_ms"]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.plot(t, ex["psth"], color="0.6", lw=0.8, label=f"observed PSTH ({ex['repeats']} repeats)")
    ax.plot(t, ex["truth"], color="k", lw=1.5, label="ground truth rate")
    for key, style in (("pooled", "tab:blue"), ("single_same_steps", "tab:orange")):
        if key in ex["pred"]:
            ax.plot(t, ex["pred"][key], color=style, lw=1.2, label=ex["labels"][key])
    ax.set_xlabel("time (ms)")
    ax.set_ylabel(f"spikes per {ex['dt_ms']:g} ms bin")
    ax.set_title(f"{ex['source']} neuron {ex['neuron_uid']} on held-out stim {ex['stim_uid']} "
                 f"(median neuron by pooled CC vs truth: {ex['cc_truth_pooled']:.2f})", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def write_figures(rep: dict, out: Path) -> dict[str, str]:
    plot_coverage(rep, out / FIGURES["coverage"])
    plot_scores(rep, out / FIGURES["scores"])
    plot_learning_curves(rep, out / FIGURES["learning_curves"])
    plot_pooling(rep, out / FIGURES["pooling"])
    plot_example(rep, out / FIGURES["example"])
    return dict(FIGURES)


def _f(x: Any, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _med(d: dict) -> str:
    return f"{_f(d['median'])} [{_f(d['q25'], 2)}, {_f(d['q75'], 2)}]"


def _stream_line(st: dict | None) -> str:
    if not st:
        return ""
    return (f"; one training epoch read {int(st['items'])} items in {int(st['batches'])} batches with "
            f"{int(st['requests'])} storage requests, {st['bytes_fetched'] / 1e6:.1f} MB fetched "
            f"({st['bytes_used'] / 1e6:.1f} MB decoded), "
            f"{st['read_seconds']:.2f} s spent reading")


def _pooling_verdict(pool: dict) -> str:
    d = pool["delta"]["pooled_minus_same_steps"]
    src = pool["source"]
    if d is None:
        return "The comparison is undefined (no finite scores)."
    pair = pool.get("paired", {}).get("single_same_steps")
    count = f"; the pool is better for {pair['pooled_better']} of {pair['n']} neurons" if pair else ""
    if d > 0.005:
        return f"The pooled model is better on {src} (median +{d:.3f}{count})."
    if d >= -0.005:
        return (f"The pooled and single-source models are on par on {src} (within 0.005 in median{count}), "
                "and the pooled one serves every other source's neurons as well.")
    return f"The pooled model is worse on {src} in this run (median {d:.3f}{count})."


def write_markdown(rep: dict, path: Path) -> None:
    c = rep["config"]
    lines = [
        "# deepstrf demo: one model fitted on a pooled cross-lab store",
        "",
        f"Run of `deepstrf demo` (scale {c['scale']}, time scale {c['time_scale']}, {c['epochs']} epochs, "
        f"seed {c['seed']}) in {rep['runtime']['total_s']:.0f} s on {rep['runtime']['threads']} CPU thread(s).",
        "",
        "## Data",
        "",
        "Three synthetic linear-nonlinear-Poisson sources with known receptive fields, shaped like CRCNS "
        "AA1, AA2 (zebra finch, 1 ms bins, 32 bands) and NS1 (ferret, 5 ms bins, 34 bands). "
        "Concatenation refuses different bin widths and band counts, so each source was converted "
        "explicitly before pooling:",
        "",
        "| source | stims | neurons | native dt (ms) | native F | conversion | store |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in rep["sources"]:
        lines.append(f"| {s['name']} | {s['S']} | {s['N']} | {s['native_dt_ms']:g} | {s['native_F']} | "
                     f"{'; '.join(s['conversions']) or 'none'} | `{s['url']}` |")
    p = rep["pool"]
    lines += [
        "",
        f"Pool `{p['url']}`: {p['S']} stims x {p['N']} neurons, {p['valid_fraction'] * 100:.1f}% of pairs "
        f"recorded (block-diagonal), dt {p['dt_ms']:g} ms, F {p['F']}. It references the source stores; "
        "no data was copied. Training and evaluation streamed it with `StreamingNeuralDataset` "
        f"({rep['streaming']['mode']}){_stream_line(rep['streaming'].get('train_epoch_stats'))}.",
        "",
        f"![coverage]({rep['figures']['coverage']})",
        "",
        "## Held-out evaluation per source",
        "",
        f"Stims were held out within each source ({rep['split']['test_fraction'] * 100:.0f}% per source, "
        f"seed {rep['split']['seed']}); the model never saw them. One model: a shared time-causal conv "
        f"backbone and one linear-softplus head per neuron ({rep['model']['params']} parameters), trained "
        "with the masked Poisson loss on compact batches (valid cells only). Scores are per neuron over "
        "all its held-out bins; the table gives the median [quartiles] over the source's neurons.",
        "",
        "| source | neurons | held-out stims | CC vs ground truth | raw CC vs PSTH | normalised CC | "
        "noise ceiling CCmax | bits/spike vs mean-rate baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, a in rep["scores"]["per_source"].items():
        lines.append(f"| {name} | {a['n_neurons']} | {len(rep['split']['by_source'][name]['test'])} | "
                     f"{_med(a['cc_truth'])} | {_med(a['cc_raw'])} | {_med(a['cc_norm'])} | {_med(a['cc_max'])} | "
                     f"{_f(a['bits_per_spike'])} |")
    lines += [
        "",
        "Raw CC is bounded by trial-to-trial noise (the PSTH of a few repeats is itself noisy); the "
        "normalised CC divides it by the split-half noise ceiling CCmax (Hsu et al. 2004). The CC against "
        "the ground-truth rate is what the synthetic sources allow on top: how well the model recovers the "
        "true expected response. Bits per spike is the held-out Poisson log-likelihood gain over a "
        "per-neuron constant rate (training mean); positive means better than the baseline.",
        "",
        f"![scores]({rep['figures']['scores']})",
        "",
        "## The point of pooling",
        "",
    ]
    pool = rep["pooling"]
    lines += [
        f"The same model architecture was trained on {pool['source']} alone (the smaller source; same "
        "hyper-parameters and held-out stims) and scored on the same held-out stims as the pooled model:",
        "",
        "| trained on | gradient steps | CC vs ground truth | raw CC | normalised CC | bits/spike |",
        "|---|---|---|---|---|---|",
    ]
    for key, v in pool["variants"].items():
        a = v["scores"]
        lines.append(f"| {v['label']} | {v['steps']} | {_med(a['cc_truth'])} | {_med(a['cc_raw'])} | "
                     f"{_med(a['cc_norm'])} | {_f(a['bits_per_spike'])} |")
    lines += [
        "",
        f"Median CC vs ground truth on {pool['source']}: pooled {_f(pool['delta']['pooled'])}, "
        f"alone with as many gradient steps {_f(pool['delta']['single_same_steps'])} "
        f"(difference {_f(pool['delta']['pooled_minus_same_steps'], 3)}), alone with as many epochs "
        f"{_f(pool['delta']['single_same_epochs'])}. {_pooling_verdict(pool)}",
        "",
        f"![pooling]({rep['figures']['pooling']})",
        "",
        f"![example]({rep['figures']['example']})",
        "",
        "## Learning curves",
        "",
        f"![learning curves]({rep['figures']['learning_curves']})",
        "",
        "## Run",
        "",
        "| phase | seconds |",
        "|---|---|",
    ]
    for k, v in rep["runtime"]["phases"].items():
        lines.append(f"| {k} | {v:.1f} |")
    lines += ["", f"All numbers behind the figures are in `report.json`. Command: `{rep['command']}`", ""]
    path.write_text("\n".join(lines))


def write_report(rep: dict, out: Path) -> dict:
    rep = clean(rep)
    rep["figures"] = write_figures(rep, out)
    (out / "report.json").write_text(json.dumps(rep, indent=1))
    write_markdown(rep, out / "report.md")
    return rep
