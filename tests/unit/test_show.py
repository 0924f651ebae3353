"""`denseforge show`: numbered tags that never overprint each other and read on any photo, and a
legend naming each box."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from denseforge.pipeline.show import COLOURS, place_labels, render_sample

from ..conftest import blank_sample


def test_labels_of_boxes_sharing_a_corner_do_not_overlap():
    spots = place_labels([(10, 10)] * 12 + [(300, 0)], (20, 18), (400, 300))
    rects = [(x, y, x + 20, y + 18) for x, y in spots]
    assert all(0 <= x <= 380 and 0 <= y <= 282 for x, y in spots)
    for i, a in enumerate(rects):
        for b in rects[i + 1 :]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    assert spots[0] == (10, 0) and spots[-1] == (300, 0)  # above its box where there is room, else inside


def test_tags_are_filled_so_they_read_on_a_photo_of_their_own_colour_and_a_legend_names_them():
    """Regression: labels were text in the box colour at the box's corner: overprinted each other
    at the top-left, and red text vanished on a red photo."""
    red = Image.new("RGB", (450, 300), COLOURS["objects"])
    data = io.BytesIO()
    red.save(data, format="PNG")
    boxes = [{"label": f"thing{i}", "score": 0.9, "box": [0, 0, 200 + i, 150]} for i in range(3)]
    sample = blank_sample(width=450, height=300, caption="three things", experts={"objects": boxes})
    canvas = render_sample(sample, data.getvalue(), width=900)
    picture = canvas.crop((0, 0, 900, 600))
    whites = int((np.asarray(picture) == 255).all(axis=2).sum())
    assert whites > 3 * 20  # three tags' white digits and borders stand out on the red photo
    assert canvas.height >= 600 + 22 * 3  # the legend: one line per box, under the picture
