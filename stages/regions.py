"""Region captions from multi-view crops (DynRefer).

For a region b inside the image B, the view at t is b(t) = b + t·(B − b), t in {0, 0.1, …, 1}: t = 0
is the tight crop, t = 1 the whole image. The tight crop is always kept; the other views are picked
greedily by the pHash Hamming distance of their crop to the tight crop divided by t — views that
add the most new content per unit of context expansion come first.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from PIL import Image

STEPS = tuple(round(0.1 * i, 1) for i in range(1, 11))


def view_box(box: list[float], width: int, height: int, t: float) -> list[float]:
    """b(t) = b + t·(B − b) with B = [0, 0, width, height]."""
    whole = (0.0, 0.0, float(width), float(height))
    return [b + t * (w - b) for b, w in zip(box, whole, strict=True)]


def _crop(image: Image.Image, box: list[float]) -> Image.Image:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    return image.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))


def _phash(image: Image.Image):
    import imagehash

    return imagehash.phash(image)


@dataclass(frozen=True)
class RegionViews:
    box: list[float]
    ts: list[float]
    crops: list[Image.Image]


def select_views(image: Image.Image, box: list[float], views: int = 3) -> RegionViews:
    """The tight crop plus the `views - 1` most informative wider views (see module doc)."""
    tight = _crop(image, box)
    base = _phash(tight)
    scored = []
    for t in STEPS:
        crop = _crop(image, view_box(box, image.width, image.height, t))
        scored.append(((_phash(crop) - base) / t, -t, t, crop))
    scored.sort(key=lambda item: (item[0], item[1]), reverse=True)
    chosen = sorted(scored[: max(0, views - 1)], key=lambda item: item[2])
    return RegionViews(box, [0.0] + [c[2] for c in chosen], [tight] + [c[3] for c in chosen])


def top_regions(objects: list[dict[str, Any]], k: int) -> list[int]:
    """Indices of the k most salient boxes (score x area), for region captioning."""

    def weight(i: int) -> float:
        b = objects[i]["box"]
        return objects[i].get("score", 1.0) * (b[2] - b[0]) * (b[3] - b[1])

    return sorted(range(len(objects)), key=lambda i: (-weight(i), i))[:k]


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=90)
    return out.getvalue()
