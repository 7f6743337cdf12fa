"""What pruning left in the int8 model: zeros per weight tensor of the .tflite, M:N structure, the gzip download
size a board fetches, and the manifest entry and report section that say it (edgekit.convert.prune prunes)."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..data import Dataset
from ..errors import ConversionError
from .prune import _WEIGHT_OPS, LayerSparsity, Pruned, WeightTensor, _by_note, _overall

__all__ = ["tflite_weights", "has_m_by_n", "measure", "gzip_size", "download_bytes", "manifest_entry", "report_section"]

def tflite_weights(model_bytes: bytes) -> List[WeightTensor]:
    """Every Conv / Depthwise / FullyConnected weight tensor of a ``.tflite`` model, read from the flatbuffer."""
    from .._keras import tflite_flatbuffer

    fb = tflite_flatbuffer()
    try:
        model = fb.read_model_from_bytearray(bytearray(model_bytes))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise ConversionError(f"cannot read the .tflite flatbuffer ({type(exc).__name__}: {exc})") from exc
    out: List[WeightTensor] = []
    for subgraph in model.subgraphs:
        for i, op in enumerate(subgraph.operators):
            name = fb.opcode_to_name(model, op.opcodeIndex) or "?"
            if name not in _WEIGHT_OPS or len(op.inputs) < 2 or op.inputs[1] < 0:
                continue
            tensor = subgraph.tensors[op.inputs[1]]
            data = model.buffers[tensor.buffer].data
            if data is None or getattr(tensor, "sparsity", None) is not None:
                continue  # computed at run time, or stored sparse-encoded (not counted here)
            dtype = str(fb.type_to_name(tensor.type) or "?").lower()
            np_dtype = {"int8": np.int8, "uint8": np.uint8, "float32": np.float32, "float16": np.float16,
                        "int16": np.int16}.get(dtype)
            if np_dtype is None:
                continue
            shape = tuple(int(d) for d in tensor.shape)
            values = np.frombuffer(bytes(data), dtype=np_dtype)
            if values.size != int(np.prod(shape)):
                continue
            values = values.reshape(shape)
            tname = tensor.name.decode("utf-8", "replace") if isinstance(tensor.name, bytes) else str(tensor.name)
            out.append(WeightTensor(i, name, tname, shape, dtype, float(np.mean(values == 0)) if values.size else 0.0, values))
    return out


def has_m_by_n(values: np.ndarray, m: int, n: int) -> bool:
    """True when every run of ``n`` consecutive weights along the last axis (TFLite's input channels) holds >= ``m`` zeros."""
    flat = np.asarray(values).reshape(-1, np.asarray(values).shape[-1]) if np.asarray(values).ndim else np.zeros((1, 1))
    pad = (-flat.shape[1]) % n
    if pad:
        flat = np.concatenate([flat, np.zeros((flat.shape[0], pad), dtype=flat.dtype)], axis=1)
    blocks = flat.reshape(flat.shape[0], -1, n)
    return bool(np.all(np.count_nonzero(blocks, axis=-1) <= n - m))


def _tflite_shape(kind: str, keras_shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """Where a Keras kernel's shape lands in TFLite: Conv2D [H, W, I, O] -> [O, H, W, I]; Dense [I, O] -> [O, I]."""
    if len(keras_shape) == 4 and kind != "DepthwiseConv2D":
        return (keras_shape[3],) + tuple(keras_shape[:3])
    if len(keras_shape) == 2:
        return (keras_shape[1], keras_shape[0])
    return tuple(keras_shape)


def measure(pruned: Pruned, int8_bytes: bytes) -> Tuple[LayerSparsity, ...]:
    """The pruned layers' sparsity (and m-by-n pattern) in the converted int8 model, matched to layers by name,
    else by order and shape."""
    tensors = tflite_weights(int8_bytes)
    shapes = {}
    for layer in pruned.model.layers:
        kernels = [w for w in layer.weights if re.search(r"(kernel|embeddings)[^/]*$", w.name.split(":")[0])]
        if kernels:
            shapes[layer.name] = _tflite_shape(type(layer).__name__, tuple(int(d) for d in kernels[0].shape))
    used: set = set()
    rows = []
    for row in pruned.layers:
        if row.keras is None:
            rows.append(row)
            continue
        match = None
        for t in tensors:
            parts = set(re.split(r"[/;]", t.name))
            if t.op_index not in used and (row.layer in parts or f"quant_{row.layer}" in parts):
                match = t
                break
        if match is None:
            match = next((t for t in tensors if t.op_index not in used and t.shape == shapes.get(row.layer)), None)
        if match is None:
            rows.append(replace(row, note="not found in the int8 model"))
            continue
        used.add(match.op_index)
        pattern = None
        if pruned.spec.structure is not None:
            pattern = has_m_by_n(match.values, *pruned.spec.structure)
        rows.append(replace(row, int8=match.zeros, pattern=pattern))
    return tuple(rows)


# --- what a board downloads --------------------------------------------------------------------------------------


def gzip_size(data: bytes) -> int:
    """Bytes of ``data`` gzip-compressed as the bundle archive compresses (level 9)."""
    return len(gzip.compress(data, compresslevel=9, mtime=0))


def download_bytes(bundle_dir: os.PathLike | str, name: Optional[str] = None) -> int:
    """Bytes of the archive ``edgekit fleet push`` sends for ``bundle_dir`` (``pack_bundle``), as if the
    directory were called ``name`` (the tar header holds the folder name)."""
    from device_agent.delivery.protocol import pack_bundle

    bundle_dir = Path(bundle_dir)
    if name is None or name == bundle_dir.name:
        return len(pack_bundle(bundle_dir))
    with tempfile.TemporaryDirectory(prefix="edgekit-pack-") as tmp:
        staged = Path(tmp) / name
        staged.mkdir()
        for f in ("manifest.json", "signature.json", "model.tflite"):
            if (bundle_dir / f).exists():
                shutil.copy2(bundle_dir / f, staged / f)
        return len(pack_bundle(staged))


def _reference_download(bundle_dir: Path, name: str, model_bytes: bytes) -> int:
    """The archive size of this very bundle with the unpruned model in place of the pruned one."""
    import hashlib

    from device_agent.delivery.protocol import pack_bundle
    from device_agent.update.manifest import MANIFEST_NAME, load_bundle

    manifest = load_bundle(bundle_dir).manifest
    manifest = replace(manifest, sha256=hashlib.sha256(model_bytes).hexdigest(), size_bytes=len(model_bytes))
    with tempfile.TemporaryDirectory(prefix="edgekit-pack-") as tmp:
        staged = Path(tmp) / name
        staged.mkdir()
        (staged / manifest.model_file).write_bytes(model_bytes)
        (staged / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        return len(pack_bundle(staged))


def manifest_entry(pruned: Pruned, rows: Sequence[LayerSparsity], mode: str) -> Dict[str, Any]:
    """The short record of pruning kept in ``manifest.json`` (``quantization.pruning``); details are in the report."""
    done = [r for r in rows if r.keras is not None]
    int8 = _overall(done, "int8")
    out = pruned.spec.to_dict()
    out.update({
        "pruned_layers": len(done),
        "dense_layers": len(rows) - len(done),
        "sparsity_int8": None if int8 is None else round(float(int8), 4),
        "kept_by": "qat with tfmot's prune-preserving scheme" if mode == "qat" else "ptq (zero weights quantize to zero)",
    })
    if pruned.spec.structure is not None:
        out["pattern_int8"] = all(bool(r.pattern) for r in done)
    return out


def _pct(v: Optional[float], digits: int = 2) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def _n(v: Optional[int]) -> str:
    return "n/a" if v is None else f"{v:,}"


def report_section(
    pruned: Pruned,
    rows: Sequence[LayerSparsity],
    bundle_dir: Path,
    name: str,
    rep: Any,
    data: Dataset,
    runtimes: Optional[Sequence[str]],
    baseline: Optional[os.PathLike | str],
    latency_runs: int = 200,
) -> Any:
    """The report's *Pruning* section: sparsity per layer (Keras and int8), accuracy, bytes a board downloads, latency."""
    from device_agent.update.manifest import load_bundle

    from .evaluate import Section, _latency, _metrics, _open

    bundle_dir = Path(bundle_dir)
    model_path = bundle_dir / "model.tflite"
    own = model_path.read_bytes()
    spec = pruned.spec
    done = [r for r in rows if r.keras is not None]
    mode = rep.quantization.get("mode", "?")
    x = data.model_inputs(data.x_test)
    rts = list(dict.fromkeys(r.runtime for r in rep.latency)) or list(runtimes or [])
    sizes: Dict[str, Dict[str, Optional[int]]] = {
        "pruned": {"tflite": len(own), "gzip": gzip_size(own), "download": download_bytes(bundle_dir, name)}
    }
    accuracy: Dict[str, Optional[float]] = {
        "unpruned_float_keras": pruned.unpruned_accuracy,
        "pruned_float_keras": pruned.pruned_accuracy,
        "pruned_float_tflite": rep.float.accuracy if rep.float else None,
        "pruned_int8": rep.int8.accuracy,
        "unpruned_int8_ptq": None,
    }
    latency: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgekit-prune-") as tmp:
        ref_path = None
        if pruned.reference_int8 is not None:
            ref_path = Path(tmp) / "unpruned.tflite"
            ref_path.write_bytes(pruned.reference_int8)
            sizes["unpruned_ptq"] = {"tflite": len(pruned.reference_int8), "gzip": gzip_size(pruned.reference_int8),
                                     "download": _reference_download(bundle_dir, name, pruned.reference_int8)}
            if rts:
                with _open(ref_path, rts[0]) as ref:
                    ref_pred = ref.predict(x).argmax(axis=1)
                accuracy["unpruned_int8_ptq"] = _metrics(data.y_test, ref_pred, data.num_classes).accuracy
        for rt in rts:  # side by side, one runtime at a time, so both see the same machine
            mine = _latency(model_path, "int8", [rt], x[0], latency_runs)
            ref_rows = _latency(ref_path, "int8", [rt], x[0], latency_runs) if ref_path is not None else []
            if mine:
                latency.append({"runtime": rt, "pruned_int8_ms": mine[0].median_ms,
                                "unpruned_int8_ms": ref_rows[0].median_ms if ref_rows else None})
    base: Optional[Dict[str, Any]] = None
    if baseline is not None:
        b = load_bundle(baseline)
        raw = b.model_path.read_bytes()
        sizes["baseline"] = {"tflite": len(raw), "gzip": gzip_size(raw), "download": download_bytes(b.path)}
        base = {"name": rep.baseline.name, "accuracy": rep.baseline.accuracy}
    overall_keras, overall_int8 = _overall(done, "keras"), _overall(done, "int8")
    data_out: Dict[str, Any] = {
        "spec": spec.to_dict(),
        "steps": pruned.steps,
        "seconds": round(pruned.seconds, 2),
        "kept_by": "qat with tfmot's prune-preserving scheme" if mode == "qat" else "ptq",
        "layers": [asdict(r) for r in rows],
        "sparsity": {"keras": overall_keras, "int8": overall_int8},
        "pattern_int8": (all(bool(r.pattern) for r in done) if spec.structure is not None else None),
        "accuracy": accuracy,
        "baseline": base,
        "size_bytes": sizes,
        "latency_ms": latency,
    }

    how = ("then quantization-aware training with tfmot's sparsity-preserving scheme (zero weights stay zero)"
           if mode == "qat" else "then post-training quantization (a zero weight quantizes to zero)")
    lines = [
        f"{spec.describe(pruned.steps)}, {how}; pruning wrappers stripped before conversion.",
        "",
        "| layer | kind | weights | zeros (float Keras) | zeros (int8 model.tflite) |"
        + (f" {spec.structure_name} in int8 |" if spec.structure else ""),
        "|---|---|---|---|---|" + ("---|" if spec.structure else ""),
    ]
    for r in rows:
        cells = [f"`{r.layer}`", r.kind, _n(r.weights), _pct(r.keras, 1) if r.keras is not None else "dense",
                 _pct(r.int8, 1) if r.int8 is not None else ("n/a" if r.keras is not None else "dense")]
        if spec.structure:
            cells.append("n/a" if r.pattern is None else ("yes" if r.pattern else "**NO**"))
        lines.append("| " + " | ".join(cells) + " |")
    total = sum(r.weights for r in done)
    lines.append(f"| all pruned layers | | {total:,} | {_pct(overall_keras, 1)} | {_pct(overall_int8, 1)} |"
                 + (f" {'yes' if data_out['pattern_int8'] else '**NO**'} |" if spec.structure else ""))
    for note, layers in _by_note(rows).items():
        lines.append(f"\n{note[0].upper()}{note[1:]}: " + ", ".join(f"`{n}`" for n in layers) + ".")
    lines += ["", "| model | top-1 |", "|---|---|",
              f"| unpruned, float (Keras, before pruning) | {_pct(accuracy['unpruned_float_keras'])} |",
              f"| pruned, float | {_pct(accuracy['pruned_float_tflite'] or accuracy['pruned_float_keras'])} |",
              f"| **pruned, int8 (this bundle)** | **{_pct(accuracy['pruned_int8'])}** |"]
    if accuracy["unpruned_int8_ptq"] is not None:
        lines.append(f"| unpruned, int8 PTQ (reference) | {_pct(accuracy['unpruned_int8_ptq'])} |")
    if base is not None:
        lines.append(f"| baseline bundle {base['name']} | {_pct(base['accuracy'])} |")
    ref_acc = base["accuracy"] if base is not None else accuracy["unpruned_float_keras"]
    ref_name = "the baseline bundle" if base is not None else "the unpruned float model"
    lines += ["", f"Pruning cost: this bundle minus {ref_name}: **{100 * (rep.int8.accuracy - ref_acc):+.2f} points** top-1."]
    lines += ["", "What a board downloads (bytes):", "",
              "| variant | model.tflite | model.tflite gzip | bundle archive (`fleet push`) |", "|---|---|---|---|"]
    labels = {"pruned": "**pruned (this bundle)**", "unpruned_ptq": "unpruned, int8 PTQ (same manifest)",
              "baseline": f"baseline bundle {base['name'] if base else ''}"}
    for key, row in sizes.items():
        lines.append(f"| {labels[key]} | {_n(row['tflite'])} | {_n(row['gzip'])} | {_n(row['download'])} |")
    ref_sizes = sizes.get("baseline") or sizes.get("unpruned_ptq")
    if ref_sizes:
        lines += ["", f"Raw model.tflite: {sizes['pruned']['tflite'] / ref_sizes['tflite']:.2f}x the unpruned one "
                  f"(int8 TFLite stores every weight, zero or not); the download: "
                  f"**{sizes['pruned']['download'] / ref_sizes['download']:.2f}x** (gzip squeezes the zeros)."]
    if latency:
        lines += ["", "Latency per inference (median ms, one thread, measured side by side):", "",
                  "| runtime | pruned int8 | unpruned int8 | pruned / unpruned |", "|---|---|---|---|"]
        for row in latency:
            un = row["unpruned_int8_ms"]
            ratio = f"{row['pruned_int8_ms'] / un:.2f}x" if un else "n/a"
            lines.append(f"| {row['runtime']} | {row['pruned_int8_ms']:.4f} | {'n/a' if un is None else f'{un:.4f}'} | {ratio} |")
    lines += ["", "int8 kernels multiply zero weights like any other, so pruning does not make this model faster; "
              "XNNPACK has sparse kernels only for float models (weights stored sparse, a 3x3 stride-2 first convolution "
              "on 3 channels, 1x1 convolutions at least 2/3 zero). What pruning buys here is a smaller download."]
    return Section("pruning", "Pruning", data_out, "\n".join(lines))
