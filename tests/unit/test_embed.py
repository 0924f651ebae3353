import io

import numpy as np
import pyarrow as pa
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
    np.testing.assert_array_equal(
        np.stack([i.outputs["embedding"] for i in again]), vectors
    )  # seeded: every worker agrees
    assert [i.outputs["phash"] for i in items] == [
        perceptual_hash(Image.open(io.BytesIO(b)).convert("RGB")) for b in images
    ]


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
    half = embedding_table(["a", "b", "c"], [0, 0, 1], x / 7, {"sha256": ["1", "2", "3"]}, dtype="float16")
    assert half.column("embedding").type.value_type == pa.float16()
    back = embeddings_matrix(half)
    assert back.dtype == np.float32 and np.abs(back - x / 7).max() <= 1e-3 * np.abs(x / 7).max()


def test_embeddings_files_store_vectors_without_a_dictionary(tmp_path):
    """float16 vectors repeat values, so parquet's default dictionary-encodes them, and reading
    that back was 3.6x slower; the file still reads back as written."""
    import pyarrow.parquet as pq

    from denseforge.stages.embed import write_embeddings_file

    x = np.random.default_rng(0).normal(size=(500, 64)).astype(np.float16)
    table = embedding_table(
        [str(i) for i in range(500)], [0] * 500, x, {"sha256": [str(i) for i in range(500)]}, dtype="float16"
    )
    write_embeddings_file(tmp_path / "unit.parquet", table)
    column = pq.read_metadata(tmp_path / "unit.parquet").row_group(0).column(2)
    assert column.path_in_schema.startswith("embedding") and "RLE_DICTIONARY" not in column.encodings
    assert pq.read_table(tmp_path / "unit.parquet").equals(table)


# -- the CPU side of the embed pass: PixelStage feeding EmbedStage ------------------------------

SHAPES = [
    ("coffee", None),
    ("chelsea", None),
    ("rocket", None),
    ("astronaut", None),
    ("coffee", (97, 61)),
    ("rocket", (1000, 223)),
    ("chelsea", (224, 224)),
    ("astronaut", (225, 3000)),
]


def _pictures():
    out = []
    for name, size in SHAPES:
        image = load_photo(name).convert("RGB")
        out.append(image.resize(size, Image.Resampling.BILINEAR) if size else image)
    return out


@pytest.mark.parametrize(
    "settings", [TINY, EmbedConfig(model="ViT-B-32", weights="random", device="cpu")], ids=["df-tiny-clip", "ViT-B-32"]
)
def test_cpu_pixels_equal_open_clips_own_transform(settings):
    """Up-, down-sized, square, tall and wide photos: our uint8 pixels, normalised, equal
    open_clip's preprocess output (same resize, same crop offsets)."""
    import open_clip
    import torch

    from denseforge.models import MODEL_CONFIGS
    from denseforge.stages.embed import pixel_spec, to_pixels

    open_clip.add_model_config(MODEL_CONFIGS)
    _, _, preprocess = open_clip.create_model_and_transforms(settings.model, pretrained=None, load_weights=False)
    spec = pixel_spec(settings)
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    for image in _pictures():
        theirs = preprocess(image)
        ours = (torch.from_numpy(to_pixels(image, spec)).permute(2, 0, 1).float() / 255 - mean) / std
        assert ours.shape == theirs.shape
        assert float((ours - theirs).abs().max()) <= 1e-6, image.size


def test_pixel_spec_takes_the_pretrained_tags_preprocessing_without_weights():
    from denseforge.stages.embed import pixel_spec

    clip = pixel_spec(EmbedConfig(model="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    assert clip.size == (224, 224) and clip.resize_mode == "shortest" and clip.interpolation == "bicubic"
    assert clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    siglip = pixel_spec(EmbedConfig(model="ViT-B-16-SigLIP", pretrained="webli"))
    assert siglip.size == (224, 224) and siglip.resize_mode == "squash" and siglip.mean == (0.5, 0.5, 0.5)


def test_embeddings_from_cpu_pixels_equal_the_in_worker_path_on_real_photos():
    """A real-size model (ViT-B-32, random weights): vectors from PixelStage's pixels and from the
    model worker's own preprocessing agree within 1e-3; hashes are the same."""
    from denseforge.stages.embed import PixelStage, pixel_spec

    settings = EmbedConfig(model="ViT-B-32", weights="random", device="cpu", batch_size=4)
    data = []
    for image in _pictures():
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=92)
        data.append(buf.getvalue())
    model = EmbedStage(settings)
    model.setup()
    split = _items(data)
    assert PixelStage(pixel_spec(settings)).process(split) == [None] * len(split)
    assert all(i.outputs["pixels"].shape == (224, 224, 3) and i.outputs["pixels"].dtype == np.uint8 for i in split)
    model.process(split)
    alone = _items(data)
    model.process(alone)
    assert all("pixels" not in i.outputs for i in split)  # consumed by the model worker, not carried to the writer
    a, b = (np.stack([i.outputs["embedding"] for i in items]) for items in (split, alone))
    assert float(np.abs(a - b).max()) <= 1e-3
    for key in ("phash", "fingerprint"):
        assert [i.outputs[key] for i in split] == [i.outputs[key] for i in alone]
    assert model.provenance["precision"] == "float32"


def test_a_cpu_transform_that_disagrees_with_the_model_fails_setup(monkeypatch):
    from denseforge.stages import embed

    real = embed.pixel_spec(TINY)
    monkeypatch.setattr(
        embed,
        "pixel_spec",
        lambda settings: embed.PixelSpec(
            size=(real.size[0] + 1, real.size[1]),
            mean=real.mean,
            std=real.std,
            interpolation=real.interpolation,
            resize_mode=real.resize_mode,
        ),
    )
    with pytest.raises(ModelLoadError, match="set embed.cpu_workers: 0"):
        EmbedStage(TINY.model_copy(update={"cpu_workers": 1})).setup()
    EmbedStage(TINY.model_copy(update={"cpu_workers": 0})).setup()  # the in-worker path needs no agreement


def test_pixels_travel_between_stages_through_the_adapters_rows(images):
    """PixelStage -> EmbedStage as the Ray adapter runs them: the pixels ride in the row's outputs."""
    import pyarrow as pa

    from denseforge.pipeline.adapter import ROW_SCHEMA, StageRun, StageWorker
    from denseforge.stages.embed import PixelStage, pixel_spec
    from denseforge.stages.stage import Resources

    rows = [
        {
            "unit": 0,
            "unit_rows": len(images),
            "key": f"k{i}",
            "image": data,
            "sample": Sample(key=f"k{i}", width=1, height=1, sha256="0").model_dump_json(),
            "reject": None,
            "removed": None,
            "trace": None,
            "outputs": None,
        }
        for i, data in enumerate(images)
    ]
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    table = StageWorker(StageRun(PixelStage(pixel_spec(TINY)), "embed-pixels", Resources(concurrency=None)))(table)
    table = StageWorker(StageRun(EmbedStage(TINY), "embed", Resources(batch_size=2)))(table)
    import pickle

    outputs = [pickle.loads(o) for o in table.column("outputs").to_pylist()]
    assert all(set(o) == {"phash", "fingerprint", "embedding", "provenance"} for o in outputs)
    _, direct = _embed(images)
    np.testing.assert_allclose(
        np.stack([o["embedding"] for o in outputs]), np.stack([i.outputs["embedding"] for i in direct]), atol=1e-5
    )


def test_the_plan_says_who_feeds_whom():
    from denseforge.pipeline.config import parse_config
    from denseforge.pipeline.flow import describe_embed, embed_stages

    def parse_config(raw, parse=parse_config):
        return parse(dict(raw, input={"kind": "folder", "path": "/data/images"}))

    gpu = parse_config({"embed": {"num_gpus": 1, "num_cpus": 2, "cpu_workers": "auto", "batch_size": 512}})
    assert describe_embed(gpu, 16) == (
        "embed: 14 CPU worker(s) (auto: the CPUs the model workers leave free) decode, "
        "hash and resize for 1 model worker(s) (1 GPU each, batch 512, precision auto)"
    )
    assert [r.instance for r in embed_stages(gpu)] == ["embed-pixels", "embed"]
    own = parse_config({"embed": {"cpu_workers": 0}})
    assert [r.instance for r in embed_stages(own)] == ["embed"] and "embed.cpu_workers: 0" in describe_embed(own, 2)
    on_cpu = parse_config({"embed": {"cpu_workers": "auto"}})  # no GPU: feeders would only take the model's cores
    assert [r.instance for r in embed_stages(on_cpu)] == [
        "embed"
    ] and "(embed.cpu_workers: auto on CPU)" in describe_embed(on_cpu, 2)
    fixed = embed_stages(parse_config({"embed": {"cpu_workers": 3}}))[0]
    assert fixed.resources.concurrency == 3
    with pytest.raises(Exception, match="cpu_workers"):
        parse_config({"embed": {"cpu_workers": -1}})
