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
    objects = [{"label": "a", "score": 0.9, "box": [0, 0, 10, 10]},
               {"label": "b", "score": 0.5, "box": [0, 0, 30, 30]},
               {"label": "c", "score": 0.9, "box": [0, 0, 5, 5]}]
    assert top_regions(objects, k) == expected


def test_template_region_caption():
    assert TemplateCaptioner().caption_region("dog", [0, 0, 10, 10], 100, 100, []) == "a dog at the top left"
