import io

import numpy as np
import pytest
from PIL import Image

from denseforge.errors import ModelLoadError
from denseforge.pipeline.demo import load_photo
from denseforge.stages.embed import EmbedConfig, EmbedStage, embedding_table, embeddings_matrix, perceptual_hash
from denseforge.stages.sample import Sample
from denseforge.stages.stage import Item

TINY = EmbedConfig(model="df-tiny-clip", weights="random", batch_size=2, device="cpu")


@pytest.fixture(scope="module")
def images():
    out = []
    for name in ("coffee", "chelsea", "rocket"):
        buf = io.BytesIO()
        load_photo(name).convert("RGB").save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


def _items(images):
    return [Item(0, Sample(key=f"k{i}", width=1, height=1, sha256="0"), data) for i, data in enumerate(images)]


def _embed(images):
    stage = EmbedStage(TINY)
    stage.setup()
    items = _items(images)
    assert stage.process(items) == [None] * len(items)
    return stage, items


def test_tiny_random_clip_embeds_normalised_and_says_random(images):
    stage, items = _embed(images)
    vectors = np.stack([i.outputs["embedding"] for i in items])
    assert vectors.shape == (3, 64) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    _, first = _embed(images[:1])
    np.testing.assert_allclose(first[0].outputs["embedding"], vectors[0], rtol=1e-5, atol=1e-6)  # batching-independent
    assert "random weights" in stage.provenance["weights"] and stage.provenance["device"] == "cpu"
    _, again = _embed(images)
    np.testing.assert_array_equal(np.stack([i.outputs["embedding"] for i in again]), vectors)  # seeded: every worker agrees
    assert [i.outputs["phash"] for i in items] == [perceptual_hash(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]


def test_configured_weights_that_cannot_load_are_an_error_not_a_random_fallback(tmp_path):
    with pytest.raises(ModelLoadError, match="checkpoint"):
        EmbedStage(EmbedConfig(model="df-tiny-clip", checkpoint=str(tmp_path / "missing.pt"), device="cpu")).setup()
    with pytest.raises(ModelLoadError, match="set embed.pretrained or embed.checkpoint"):
        EmbedStage(EmbedConfig(model="df-tiny-clip", pretrained=None, device="cpu")).setup()


def test_embedding_table_round_trip():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    table = embedding_table(["a", "b", "c"], [0, 0, 1], x, {"sha256": ["1", "2", "3"]})
    np.testing.assert_array_equal(embeddings_matrix(table), x)
    assert table.column("unit").to_pylist() == [0, 0, 1]
