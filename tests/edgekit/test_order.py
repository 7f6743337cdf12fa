"""The informative order: margin first, one per cluster, so ten copies of one frame cost one label a round."""

from __future__ import annotations

import numpy as np
import pytest

from collecting import MODEL, prediction
from device_agent.delivery import protocol
from edgekit.errors import DataError
from edgekit.loop.order import (ModelEmbedder, cluster, cluster_margin_order, order_samples, penultimate_model,
                                thumbnail_embedding)
from edgekit.loop.store import open_store
from labeling import DIGITS


@pytest.fixture
def store(tmp_path):
    with open_store(f"sqlite:///{tmp_path}/samples.db") as s:
        yield s


def test_cluster_margin_takes_one_per_cluster_before_a_second():
    margin = np.array([0.01, 0.02, 0.03, 0.30, 0.40, 0.50, 0.60, 0.05])
    clusters = np.array([0, 0, 0, 1, 2, 3, 4, 0])  # cluster 0: four near-duplicates with the lowest margins
    order = list(cluster_margin_order(margin, clusters, batch=4, window=2))
    assert order[:6] == [0, 3, 4, 5, 6, 1]  # one of cluster 0, then every other cluster, by margin
    assert sorted(order) == list(range(8))
    # the window keeps a second look at an unsure cluster ahead of confident samples further down
    assert list(cluster_margin_order(margin, clusters, batch=2, window=1))[:4] == [0, 1, 2, 7]
    with pytest.raises(DataError, match="margins but"):
        cluster_margin_order(margin, clusters[:3])


def _put(store, raw, i, index, margin):
    p = protocol.sample_payload(device="cam-1", fleet="lab", seq=i, model=MODEL, reasons=["low_confidence"],
                                prediction=dict(prediction(index, 0.3 + margin), margin=margin), raw=raw)
    store.put_sample(p, "t")
    return p["sample_id"]


def test_ten_copies_of_one_frame_cost_one_label_a_round(store):
    blurry = np.clip(DIGITS["x"][0].astype(np.float32) * 0.5 + 60, 0, 255).astype(np.uint8)
    copies = {_put(store, blurry, i, 3, 0.01 + i / 1000) for i in range(10)}  # the least sure of all
    for i in range(40):
        _put(store, DIGITS["x"][i + 1], 100 + i, int(DIGITS["y"][i + 1]), 0.05 + i / 100)
    records = store.list_samples()
    ordered = [r.sample_id for r in order_samples(records, "informative", seed=0)]
    n_clusters = len(set(cluster(thumbnail_embedding(records), seed=0).tolist()))
    assert sorted(ordered) == sorted(r.sample_id for r in records)
    assert ordered[0] in copies  # the model's biggest doubt first ...
    assert len(copies & set(ordered[:n_clusters - 1])) == 1  # ... but once a round over the clusters
    by_margin = [r.sample_id for r in order_samples(records, "margin")]
    assert len(copies & set(by_margin[:10])) == 10  # what lowest-margin-first would have spent
    assert [r.sample_id for r in order_samples(records, "informative", seed=0)] == ordered  # deterministic
    assert [r.sample_id for r in order_samples(records, "arrival")] == [r.sample_id for r in records]
    with pytest.raises(DataError, match="order='best'"):
        order_samples(records, "best")


def test_the_thumbnail_embedding_takes_any_input_shape(store):
    _put(store, DIGITS["x"][0], 0, 1, 0.1)
    _put(store, np.sin(np.linspace(0, 9, 300)).astype(np.float32), 1, 2, 0.2)
    _put(store, np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8), 2, 4, 0.3)
    emb = thumbnail_embedding(store.list_samples())
    assert emb.shape[0] == 3 and np.isfinite(emb).all()
    assert len(order_samples(store.list_samples(), "informative")) == 3


@pytest.mark.slow
def test_the_bundles_float_model_gives_the_penultimate_embedding(store, ptq_result, digits):
    model = ModelEmbedder.from_bundle(ptq_result.bundle_path)
    for i in range(12):
        _put(store, digits.x_test[i].astype(np.uint8), i, int(digits.y_test[i]), 0.1 + i / 50)
    records = store.list_samples()
    emb = model(records)
    assert emb.shape == (12, 64)  # the example CNN's dense layer, before the classifier head
    same = ModelEmbedder.from_bundle(ptq_result.bundle_path)(records[:3])
    np.testing.assert_allclose(same, emb[:3], rtol=1e-5, atol=1e-6)
    assert len(order_samples(records, "informative", embed=model)) == 12


def test_a_model_without_a_hidden_layer_has_no_penultimate_embedding():
    from edgekit._keras import keras

    flat = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    from edgekit.errors import ModelError

    with pytest.raises(ModelError, match="no penultimate layer"):
        penultimate_model(flat)
    deep = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="relu"), keras.layers.Dropout(0.1),
                             keras.layers.Dense(3), keras.layers.Softmax()])
    assert penultimate_model(deep).output_shape == (None, 5)
