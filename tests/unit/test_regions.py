import pytest

from denseforge.pipeline.demo import load_photo
from denseforge.stages.fuse import TemplateCaptioner
from denseforge.stages.regions import STEPS, select_views, top_regions, view_box


def test_view_box_interpolates_between_the_region_and_the_image():
    box = [100.0, 50.0, 200.0, 150.0]
    assert view_box(box, 600, 400, 0.0) == box
    assert view_box(box, 600, 400, 1.0) == [0.0, 0.0, 600.0, 400.0]
    assert view_box(box, 600, 400, 0.5) == [50.0, 25.0, 400.0, 275.0]
    assert STEPS[0] == 0.1 and STEPS[-1] == 1.0 and len(STEPS) == 10


def test_select_views_keeps_the_tight_crop_and_is_deterministic():
    image = load_photo("chelsea").convert("RGB")  # 451 x 300
    box = [140.0, 60.0, 300.0, 220.0]
    views = select_views(image, box, views=4)
    assert views.ts[0] == 0.0 and len(views.ts) == 4 and views.ts == sorted(views.ts)
    assert views.crops[0].size == (160, 160)
    assert all(0 < t <= 1 for t in views.ts[1:])
    again = select_views(image, box, views=4)
    assert again.ts == views.ts
    assert select_views(image, box, views=1).ts == [0.0]


@pytest.mark.parametrize("k, expected", [(1, [1]), (2, [1, 0]), (5, [1, 0, 2])])
def test_top_regions_by_score_times_area(k, expected):
    objects = [
        {"label": "a", "score": 0.9, "box": [0, 0, 10, 10]},
        {"label": "b", "score": 0.5, "box": [0, 0, 30, 30]},
        {"label": "c", "score": 0.9, "box": [0, 0, 5, 5]},
    ]
    assert top_regions(objects, k) == expected


def test_template_region_caption():
    assert TemplateCaptioner().caption_region("dog", [0, 0, 10, 10], 100, 100, []) == "a dog at the top left"


class _Width:
    """A stand-in pHash: the 'distance' between two crops is a function of their widths."""

    def __init__(self, width: int, distance):
        self.width, self.distance = width, distance

    def __sub__(self, other: "_Width") -> float:
        return self.distance(self.width - other.width)


@pytest.mark.parametrize(
    "distance, expected",
    [
        (lambda grow: min(20, grow), [0.0, 0.1, 0.2]),  # capped: new content per unit of t falls as t grows
        (lambda grow: grow, [0.0, 0.1, 0.2]),  # proportional: every view ties, the smallest t wins
        (lambda grow: grow * grow, [0.0, 0.9, 1.0]),  # accelerating: the widest views add the most per t
    ],
)
def test_select_views_picks_the_most_new_content_per_unit_of_context(monkeypatch, distance, expected):
    """Mutation survivors: the view choice (distance / t, ties to the smaller t) was never pinned."""
    from PIL import Image

    import denseforge.stages.regions as regions

    monkeypatch.setattr(regions, "_phash", lambda crop: _Width(crop.width, distance))
    image = Image.new("RGB", (400, 100))
    views = select_views(image, [150.0, 0.0, 250.0, 100.0])  # width 100 + 300 t
    assert views.ts == expected and [c.width for c in views.crops] == [round(100 + 300 * t) for t in expected]


def test_a_degenerate_box_still_gives_a_one_pixel_crop_and_views_are_frozen():
    import dataclasses

    from PIL import Image

    views = select_views(Image.new("RGB", (50, 40)), [10.0, 10.0, 10.0, 10.0], views=1)
    assert views.crops[0].size == (1, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        views.ts = []


def test_top_regions_weighs_score_times_area_of_boxes_anywhere():
    objects = [
        {"label": "a", "box": [100, 50, 110, 60]},  # no score: 1.0 x 100 = 100
        {"label": "b", "score": 0.5, "box": [0, 0, 12, 12]},  # 72
        {"label": "c", "score": 0.1, "box": [5, 5, 35, 35]},  # 90
        {"label": "d", "score": 0.75, "box": [0, 0, 20, 10]},
    ]  # 150
    assert top_regions(objects, 4) == [3, 0, 2, 1]


def test_region_crops_are_encoded_as_rgb_jpeg_at_quality_90():
    import io

    from PIL import Image

    from denseforge.stages.regions import jpeg

    rgba = Image.new("RGBA", (30, 20), (200, 10, 10, 128))
    encoded = jpeg(rgba)
    decoded = Image.open(io.BytesIO(encoded))
    assert (decoded.format, decoded.mode, decoded.size) == ("JPEG", "RGB", (30, 20))
    reference = io.BytesIO()
    rgba.convert("RGB").save(reference, format="JPEG", quality=90)
    assert encoded == reference.getvalue()  # the same bytes every run: reruns stay byte-identical
