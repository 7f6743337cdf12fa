"""Rendering an :class:`~edgekit.convert.evaluate.EvalReport`: Markdown and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .evaluate import EvalReport

__all__ = ["markdown", "plots", "PLOTS"]

log = logging.getLogger(__name__)

PLOTS = ("confusion.png", "per_class.png", "latency.png")


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _bytes(v: Optional[int]) -> str:
    return "n/a" if v is None else f"{v:,}"


def markdown(r: "EvalReport") -> str:
    q = r.quantization
    lines: List[str] = [
        f"# {r.name} v{r.version}: float vs int8",
        "",
        f"Bundle `{r.bundle}`, quantization **{q.get('mode', '?')}**, test split of `{r.data}`: {r.test_size} inputs.",
        "",
    ]
    if r.diagnosis:
        lines += [f"> **WARNING: {r.diagnosis}**", ""]
    from .quantize import coverage_warning

    loud = coverage_warning(q)
    if loud:
        lines += [f"> **{loud}**", ""]
    cov = q.get("qat_coverage")
    if cov:
        lines += [
            f"QAT coverage: **{_pct(cov.get('fraction_parameters'))} of the parameters** "
            f"({cov.get('parameters_qat', 0):,} of {cov.get('parameters', 0):,}), "
            f"{cov.get('layers_qat', 0)} of {cov.get('layers', 0)} layers"
            + (f"; nested model(s) flattened first: {', '.join(f'`{n}`' for n in cov['flattened'])}" if cov.get("flattened") else "")
            + ".",
            "",
        ]
        if cov.get("float_layers"):
            lines += ["Layers left float during QAT (quantized post-training by the converter):", ""]
            lines += [f"- `{x['layer']}` ({x['class']}, {x['parameters']:,} parameters): {x['reason']}" for x in cov["float_layers"]]
            lines.append("")
    if q.get("fallbacks"):
        lines += ["Fallbacks taken during conversion:", ""]
        lines += [f"- `{f['layer']}`: {f['action']}" for f in q["fallbacks"]]
        lines.append("")
    lines += ["## Accuracy", "", "| metric | float | int8 |", "|---|---|---|"]
    f = r.float
    lines.append(f"| top-1 accuracy | {_pct(f.accuracy if f else None)} | {_pct(r.int8.accuracy)} |")
    lines.append(f"| macro F1 | {f'{f.macro_f1:.4f}' if f else 'n/a'} | {r.int8.macro_f1:.4f} |")
    if f is not None:
        delta = 100 * (r.int8.accuracy - f.accuracy)
        lines += ["", f"int8 minus float: **{delta:+.2f} points**; top-1 agreement float vs int8: **{_pct(r.agreement)}**."]
    verdict = "beats" if r.beats_baseline else "does NOT beat"
    lines += [
        "",
        f"Baseline ({r.baseline.kind}: {r.baseline.name}): {_pct(r.baseline.accuracy)}; the int8 model {verdict} it.",
        "",
        "## Per class",
        "",
        "| class | float precision | float recall | int8 precision | int8 recall |",
        "|---|---|---|---|---|",
    ]
    for i, label in enumerate(r.labels):
        fp = f"{f.precision[i]:.3f}" if f else "n/a"
        fr = f"{f.recall[i]:.3f}" if f else "n/a"
        lines.append(f"| {label} | {fp} | {fr} | {r.int8.precision[i]:.3f} | {r.int8.recall[i]:.3f} |")
    s = r.sizes
    lines += ["", "## Size (bytes)", "", "| Keras file | float TFLite | int8 TFLite | int8 / float TFLite |", "|---|---|---|---|"]
    ratio = f"{s['int8_tflite'] / s['float_tflite']:.3f}" if s.get("float_tflite") else "n/a"
    lines.append(f"| {_bytes(s.get('keras_file'))} | {_bytes(s.get('float_tflite'))} | {_bytes(s.get('int8_tflite'))} | {ratio} |")
    lines += ["", "## Latency per inference (one thread, same interpreter)", "", "| runtime | model | median ms | p95 ms |", "|---|---|---|---|"]
    for row in sorted(r.latency, key=lambda x: (x.runtime, x.model)):
        lines.append(f"| {row.runtime} | {row.model} | {row.median_ms:.4f} | {row.p95_ms:.4f} |")
    for rt in sorted({x.runtime for x in r.latency}):
        by = {x.model: x for x in r.latency if x.runtime == rt}
        if "int8" in by and "float" in by and by["float"].median_ms > 0:
            lines.append(f"\n{rt}: int8 / float median latency = {by['int8'].median_ms / by['float'].median_ms:.2f}x")
    t = r.thresholds
    lines += [
        "",
        "## Recommended thresholds",
        "",
        f"confidence >= **{t.confidence:.2f}** and margin >= **{t.margin:.2f}** "
        f"(the lowest values at which accepted int8 predictions reach {_pct(t.target_accuracy)} accuracy, "
        "half the model's overall error rate).",
        f"On the test split they accept {_pct(t.accepted_fraction)} of inputs at {_pct(t.accepted_accuracy)} accuracy; "
        f"the flagged rest is {_pct(t.flagged_accuracy)} accurate.",
        "",
    ]
    for section in r.sections:
        lines += [f"## {section.title}", "", section.markdown.rstrip(), ""]
    lines += [
        "## Plots",
        "",
    ]
    lines += [f"![{p[:-4]}]({p})" for p in PLOTS]
    return "\n".join(lines) + "\n"


def plots(r: "EvalReport", directory: Path) -> None:
    """confusion.png (int8), per_class.png (float vs int8 recall), latency.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(r.labels)
    cm = np.asarray(r.int8.confusion)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), r.labels, fontsize=7)
    ax.set_yticks(range(k), r.labels, fontsize=7)
    ax.set_xlabel("predicted (int8)")
    ax.set_ylabel("true")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6, color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_title("int8 confusion matrix")
    fig.tight_layout()
    fig.savefig(directory / "confusion.png", dpi=80)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3))
    pos = np.arange(k)
    if r.float is not None:
        ax.bar(pos - 0.2, r.float.recall, width=0.4, label="float")
    ax.bar(pos + (0.2 if r.float is not None else 0), r.int8.recall, width=0.4, label="int8")
    ax.set_xticks(pos, r.labels, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("per-class accuracy")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(directory / "per_class.png", dpi=80)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3))
    runtimes = sorted({x.runtime for x in r.latency})
    for n, which in enumerate(("float", "int8")):
        vals = [next((x.median_ms for x in r.latency if x.runtime == rt and x.model == which), 0.0) for rt in runtimes]
        ax.bar(np.arange(len(runtimes)) + (n - 0.5) * 0.4, vals, width=0.4, label=which)
    ax.set_xticks(range(len(runtimes)), runtimes, fontsize=8)
    ax.set_ylabel("median ms / inference")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(directory / "latency.png", dpi=80)
    plt.close(fig)
