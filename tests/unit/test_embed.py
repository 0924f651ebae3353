import io

import numpy as np
import pytest

from denseforge.errors import ModelLoadError
from denseforge.pipeline.demo import load_photo
from denseforge.stages.embed import ClipImageEmbedder, EmbedSettings, embedding_table, embeddings_matrix

TINY = EmbedSettings(model="df-tiny-clip", weights="random", batch_size=2, device="cpu")


@pytest.fixture(scope="module")
def images():
    out = []
    for name in ("coffee", "chelsea", "rocket"):
        buf = io.BytesIO()
        load_photo(name).convert("RGB").save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


def test_tiny_random_clip_embeds_normalised_and_says_random(images):
    embedder = ClipImageEmbedder(TINY)
    vectors = embedder(images)
    assert vectors.shape == (3, 64) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(embedder(images[:1]), vectors[:1], rtol=1e-5, atol=1e-6)  # batching-independent
    assert "random weights" in embedder.provenance["weights"] and embedder.provenance["device"] == "cpu"
    np.testing.assert_array_equal(ClipImageEmbedder(TINY)(images), vectors)  # seeded: every actor agrees


def test_configured_weights_that_cannot_load_are_an_error_not_a_random_fallback(tmp_path):
    with pytest.raises(ModelLoadError, match="checkpoint"):
        ClipImageEmbedder(EmbedSettings(model="df-tiny-clip", checkpoint=str(tmp_path / "missing.pt"), device="cpu"))
    with pytest.raises(ModelLoadError, match="set embed.pretrained or embed.checkpoint"):
        ClipImageEmbedder(EmbedSettings(model="df-tiny-clip", pretrained=None, device="cpu"))


def test_embedding_table_round_trip():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    table = embedding_table(["a", "b", "c"], [0, 0, 1], x, {"sha256": ["1", "2", "3"]})
    np.testing.assert_array_equal(embeddings_matrix(table), x)
    assert table.column("unit").to_pylist() == [0, 0, 1]
