"""Which flagged sample to label first: informativeness with diversity (Cluster-Margin).

A labeler's time is the scarce part of the loop. Labelling in arrival order spends it on
whatever the boards sent first; labelling the lowest-confidence samples first spends it on
the model's doubts, but ten copies of one blurry frame then cost ten labels. The
``informative`` order (after Citovsky et al., "Batch Active Learning at Scale", NeurIPS 2021):

1. **Embed** every sample once: the float model's penultimate layer (the input of its last
   weighted layer) when the bundle's ``float_model.keras`` is at hand (:class:`ModelEmbedder`),
   else a cheap stand-in (:func:`thumbnail_embedding`: a 8x8-per-channel thumbnail of the input,
   centred and scaled to unit length, beside the board's top-k scores).
2. **Cluster once** (k-means on the unit-length embeddings, about ``cluster_size`` samples a
   cluster, at least :data:`MIN_CLUSTERS`): near-duplicates share a cluster.
3. **Round-robin in margin order**: the queue is built in batches of ``batch``; each batch looks at
   the ``window`` lowest-margin samples not queued yet and takes one from each cluster present,
   clusters that have given fewer samples so far first, then the lowest margin (top-1 minus
   top-2 probability, as the board computed it); within a cluster the lowest margin goes first.

So the first labels go to the model's doubts, one per kind of input, and a second copy of
something already queued waits until every other kind in the window has had its turn.

The other orders: ``margin`` (lowest margin first), ``confidence`` (lowest top-1 first),
``arrival`` (as stored) and ``random`` (seeded).
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import DataError, ModelError
from .store import SampleRecord

__all__ = ["ORDERS", "order_samples", "cluster_margin_order", "cluster", "thumbnail_embedding", "thumbnail_features", "ModelEmbedder",
           "penultimate_model", "Embedder", "make_embedder"]

log = logging.getLogger(__name__)

ORDERS = ("informative", "margin", "confidence", "arrival", "random")

Embedder = Callable[[Sequence[SampleRecord]], np.ndarray]
"""Records to an (n, d) float array, one row a sample."""

THUMB = 8  # thumbnail side of the cheap embedding
MIN_CLUSTERS = 10
CLUSTER_SIZE = 30
BATCH = 10
WINDOW = 20
# CLUSTER_SIZE, BATCH and WINDOW were chosen on bench/bench_loop.py's seeds 0-4 (cluster sizes 2, 4, 8,
# 16 and 30, windows 5-20 batches: all within noise of each other at 25 labels; 30/20 best at 50);
# the bench reports on other seeds.


def order_samples(records: Sequence[SampleRecord], how: str = "informative", *, embed: Optional[Embedder] = None,
                  seed: int = 0, **params: Any) -> List[SampleRecord]:
    """``records`` in the order ``how`` (one of :data:`ORDERS`); ``embed`` defaults to the thumbnail."""
    if how not in ORDERS:
        raise DataError(f"order={how!r}, expected one of {', '.join(ORDERS)}")
    recs = list(records)
    if len(recs) < 2 or how == "arrival":
        return recs
    if how == "random":
        return [recs[i] for i in np.random.default_rng(seed).permutation(len(recs))]
    key = np.array([r.confidence if how == "confidence" else r.margin for r in recs], dtype=np.float64)
    if how in ("margin", "confidence"):
        return [recs[i] for i in np.argsort(key, kind="stable")]
    emb = (embed or thumbnail_embedding)(recs)
    labels = cluster(emb, seed=seed, cluster_size=params.pop("cluster_size", CLUSTER_SIZE))
    return [recs[i] for i in cluster_margin_order(key, labels, **params)]


def cluster(embeddings: np.ndarray, *, cluster_size: float = CLUSTER_SIZE, n_clusters: Optional[int] = None,
            seed: int = 0) -> np.ndarray:
    """One cluster id per row (k-means on unit-length rows; k = n / cluster_size, at least
    :data:`MIN_CLUSTERS`, unless given)."""
    x = np.asarray(embeddings, dtype=np.float64)
    n = len(x)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    k = int(n_clusters) if n_clusters else max(MIN_CLUSTERS, int(math.ceil(n / max(1.0, float(cluster_size)))))
    k = max(1, min(k, n))
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    x = x.reshape(n, -1)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    from sklearn.cluster import KMeans, MiniBatchKMeans

    algo = (KMeans(n_clusters=k, n_init=3, random_state=seed) if n <= 5000
            else MiniBatchKMeans(n_clusters=k, n_init=3, random_state=seed, batch_size=2048))
    return algo.fit_predict(x.astype(np.float32)).astype(np.int64)


def cluster_margin_order(margin: Sequence[float], clusters: Sequence[int], *, batch: int = BATCH,
                         window: int = WINDOW) -> np.ndarray:
    """Indices in Cluster-Margin order (see the module docstring).

    ``window`` is how many batches' worth of the lowest margins each batch chooses from.
    """
    m = np.asarray(margin, dtype=np.float64)
    cl = np.asarray(clusters)
    if len(m) != len(cl):
        raise DataError(f"{len(m)} margins but {len(cl)} cluster ids")
    if batch < 1 or window < 1:
        raise DataError(f"batch={batch} and window={window} must be >= 1")
    remaining = list(np.argsort(m, kind="stable"))
    given: Dict[Any, int] = defaultdict(int)  # samples each cluster has given so far
    out: List[int] = []
    while remaining:
        groups: Dict[Any, List[int]] = {}
        for i in remaining[: batch * window]:
            groups.setdefault(cl[i], []).append(i)  # each group in margin order
        take: List[int] = []
        while len(take) < batch and groups:
            for c in sorted(groups, key=lambda c: (given[c], m[groups[c][0]])):
                take.append(groups[c].pop(0))
                given[c] += 1
                if not groups[c]:
                    del groups[c]
                if len(take) == batch:
                    break
        taken = set(take)
        remaining = [i for i in remaining if i not in taken]
        out.extend(take)
    return np.asarray(out, dtype=np.int64)


def thumbnail_embedding(records: Sequence[SampleRecord]) -> np.ndarray:
    """The cheap embedding of stored samples: :func:`thumbnail_features` of their inputs and of the
    board's top-k scores. Needs no model."""
    n_classes = 1 + max([r.pred_index for r in records] + [int(k["index"]) for r in records for k in r.top_k
                                                           if isinstance(k.get("index"), int)])
    scores = np.zeros((len(records), max(1, n_classes)))
    for row, r in zip(scores, records):
        for k in r.top_k:
            i = k.get("index")
            if isinstance(i, int) and 0 <= i < len(row):
                row[i] = float(k.get("score", 0.0))
        if not r.top_k and 0 <= r.pred_index < len(row):
            row[r.pred_index] = r.confidence
    return thumbnail_features([r.array() for r in records], scores)


def thumbnail_features(inputs: Sequence[np.ndarray], scores: np.ndarray) -> np.ndarray:
    """Each input as a 8x8-per-channel thumbnail (block means; a 1-D input as 64 means), centred and
    scaled to unit length, followed by its class scores (by class index): near-duplicates land
    together, and what the model thought splits look-alikes of different classes."""
    rows = []
    for a in inputs:
        thumb = _thumb(a).ravel().astype(np.float64)
        thumb = thumb - thumb.mean()
        norm = np.linalg.norm(thumb)
        rows.append(thumb / norm if norm > 0 else thumb)
    width = max(len(v) for v in rows)
    thumbs = np.stack([np.pad(v, (0, width - len(v))) for v in rows])
    return np.concatenate([thumbs, np.asarray(scores, dtype=np.float64).reshape(len(rows), -1)], axis=1)


def _thumb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 3 and a.shape[-1] <= 4:
        return np.stack([_block_mean(a[..., c], THUMB, THUMB) for c in range(a.shape[-1])], axis=-1)
    if a.ndim == 2 and min(a.shape) > 4:
        return _block_mean(a, THUMB, THUMB)
    flat = a.ravel()
    return _block_mean(flat[None, :], 1, THUMB * THUMB) if flat.size else np.zeros(1)


def _block_mean(a: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Mean over a rows x cols grid of blocks (a block per cell; small inputs keep their size)."""
    h, w = a.shape
    rows, cols = min(rows, h), min(cols, w)
    r_edges = np.linspace(0, h, rows + 1).astype(int)
    c_edges = np.linspace(0, w, cols + 1).astype(int)
    out = np.empty((rows, cols))
    for i in range(rows):
        for j in range(cols):
            out[i, j] = a[r_edges[i]:max(r_edges[i + 1], r_edges[i] + 1), c_edges[j]:max(c_edges[j + 1], c_edges[j] + 1)].mean()
    return out


def penultimate_model(model: Any) -> Any:
    """A model giving ``model``'s penultimate features: the input of its last layer with weights
    (the classifier head), after any activation, softmax or dropout layers behind it."""
    from .._keras import keras

    weighted = [layer for layer in model.layers if layer.weights]
    if len(weighted) < 2:
        raise ModelError(f"model {model.name!r} has {len(weighted)} weighted layer(s); it has no penultimate layer "
                         "to embed with; order with the thumbnail embedding instead (no --float-model)")
    head = weighted[-1]
    return keras.Model(model.inputs, head.input, name=f"{model.name}_penultimate")


class ModelEmbedder:
    """The float model's penultimate features of each sample, through the bundle's preprocessing.

    ``ModelEmbedder.from_bundle(dir)`` uses the ``float_model.keras`` that ``edgekit convert`` and
    ``edgekit retrain`` keep beside the bundle. Features are cached by sample id.
    """

    def __init__(self, model: Any, preprocessing: Any, batch_size: int = 256) -> None:
        self._features = penultimate_model(model)
        self._pre = preprocessing
        self._batch = batch_size
        self._cache: Dict[str, np.ndarray] = {}

    @classmethod
    def from_bundle(cls, bundle: "str | os.PathLike[str]", float_model: "str | os.PathLike[str] | None" = None
                    ) -> "ModelEmbedder":
        from device_agent.update.manifest import load_bundle

        from ..convert.bundle import FLOAT_MODEL_NAME
        from ..convert.load import load_model

        b = load_bundle(bundle)
        path = Path(float_model) if float_model else Path(bundle) / FLOAT_MODEL_NAME
        if not path.exists():
            raise ModelError(f"{path} does not exist; pass --float-model (the Keras model the bundle came from), "
                             "or leave out --bundle to order with the thumbnail embedding")
        return cls(load_model(path), b.manifest.preprocessing)

    def __call__(self, records: Sequence[SampleRecord]) -> np.ndarray:
        from device_agent.inference.preprocess import preprocess

        todo = [r for r in records if r.sample_id not in self._cache]
        for i in range(0, len(todo), self._batch):
            chunk = todo[i:i + self._batch]
            try:
                x = np.stack([preprocess(r.array(), self._pre) for r in chunk]).astype(np.float32)
            except Exception as exc:  # InputError, shape mismatch
                raise DataError(f"samples do not fit the bundle's model ({exc}); filter by --model-version") from exc
            feats = np.asarray(self._features.predict(x, verbose=0, batch_size=self._batch))
            for r, f in zip(chunk, feats.reshape(len(chunk), -1)):
                self._cache[r.sample_id] = f
        return np.stack([self._cache[r.sample_id] for r in records])


def make_embedder(bundle: "str | os.PathLike[str] | None" = None,
                  float_model: "str | os.PathLike[str] | None" = None) -> Optional[Embedder]:
    """The penultimate-layer embedder when a float model is at hand (``float_model``, or the
    bundle's ``float_model.keras``), else None (the thumbnail embedding; the reason is logged)."""
    from ..convert.bundle import FLOAT_MODEL_NAME

    if float_model is None and bundle is not None and not (Path(bundle) / FLOAT_MODEL_NAME).exists():
        log.warning("no %s beside bundle %s: ordering with the thumbnail embedding (pass --float-model to use the "
                    "model's own features)", FLOAT_MODEL_NAME, bundle)
        return None
    if bundle is None:
        if float_model is not None:
            raise DataError("--float-model needs --bundle (its preprocessing turns stored inputs into model inputs)")
        return None
    return ModelEmbedder.from_bundle(bundle, float_model)
