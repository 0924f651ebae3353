"""The benchmark corpus: distinct photos (scikit-image's, cropped and recoloured) as files."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path

from denseforge.pipeline.demo import PHOTOS, load_photo


def build_bench_corpus(root: Path, images: int, seed: int = 0) -> list[str]:
    """`images` distinct JPEGs (random 640x480-ish crops of real photos); returns file names."""
    rng = random.Random(seed)
    photos = [load_photo(name).convert("RGB") for name in PHOTOS]
    names = []
    root.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = photo.crop((x, y, x + cw, y + ch)).resize((640, max(1, round(640 * ch / cw))))
        name = f"{i:06d}.jpg"
        crop.save(root / name, format="JPEG", quality=90)
        names.append(name)
    return names


@contextlib.contextmanager
def served_corpus(root: Path, images: int) -> Iterator[Path]:
    """`images` distinct photos served on loopback HTTP while the block runs; yields the path of
    an input table (url, caption) that lists them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from denseforge.pipeline.demo import LoopbackImageServer

    names = build_bench_corpus(root / "files", images)
    with LoopbackImageServer(root / "files") as server:
        table = root / "urls.parquet"
        pq.write_table(
            pa.table({"url": [f"{server.base_url}/img/{n}" for n in names], "caption": [f"image {n}" for n in names]}),
            table,
        )
        yield table
