"""The labelled set behind `denseforge bench quality`: its truth is checked here, on tiny inputs."""

from __future__ import annotations

import pytest

from denseforge.pipeline.bench import quality as q


def test_iou_exact_values():
    assert q.iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert q.iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert q.iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0


def test_the_phrase_set_is_large_balanced_and_unique():
    assert len(q.PHRASES) >= 100
    negatives = sum(1 for _, _, should in q.PHRASES if not should)
    assert 0.45 <= negatives / len(q.PHRASES) <= 0.55
    assert len({(p, label) for p, label, _ in q.PHRASES}) == len(q.PHRASES)


def test_hand_labels_lie_inside_their_photos():
    photos = q.labelled_photos()
    assert set(photos) == set(q.LABELLED)
    for name, objects in q.LABELLED.items():
        w, h = photos[name].size
        for _, (x0, y0, x1, y1) in objects:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, name


@pytest.fixture(scope="module")
def reader():
    from denseforge.experts.ocr import RapidOcrExpert

    r = RapidOcrExpert()
    r.setup()
    return r


def test_rendered_truth_boxes_agree_with_what_ocr_reads(reader):
    """The truth box of a straight and of a rotated line (box of the rotated corners) overlaps
    the box the real OCR reads by IoU >= 0.5, and the string is read verbatim."""
    from denseforge.experts.base import ExpertInput

    rendered = q.text_images()
    straight = next(r for r in rendered if r[1] == "MAIN STREET")
    rotated = next(r for r in rendered if r[1] == "WELCOME")
    for image, text, truth, _ in (straight, rotated):
        [lines] = reader([ExpertInput("k", image)])
        best = max(lines, key=lambda ln: q.iou(ln["box"], truth))
        assert q.iou(best["box"], truth) >= 0.5 and best["text"].replace(" ", "") == text.replace(" ", "")
    assert len(rendered) == len(q.TEXTS) * 3


def test_bench_stdout_is_the_json_alone(monkeypatch, capfd):
    """Regression: ultralytics prints a settings notice to stdout on its first run in a new
    config dir, so `denseforge bench quality | jq` failed on a fresh machine. Redirected at the
    file descriptor, so child processes (img2dataset's workers) are covered too."""
    import json
    import subprocess
    import sys

    from denseforge.pipeline import bench
    from denseforge.pipeline.cli import main

    def noisy(name, **options):
        print("Creating new Ultralytics Settings v0.0.8 file", flush=True)
        subprocess.run([sys.executable, "-c", "print('a worker process says hello')"], check=True)
        return {"benchmark": name}

    monkeypatch.setattr(bench, "run_benchmark", noisy)
    assert main(["bench", "quality"]) == 0
    captured = capfd.readouterr()
    assert json.loads(captured.out) == {"benchmark": "quality"}
    assert "Ultralytics" in captured.err and "worker process" in captured.err


def test_bench_experts_gpu_shares_one_gpu_and_says_when_there_is_none(monkeypatch):
    import pytest
    import torch

    from denseforge.errors import DenseforgeError
    from denseforge.pipeline.bench.experts import bench_experts, demo_experts, gpu_shared

    shared = gpu_shared(demo_experts())
    assert [e["resources"]["num_gpus"] for e in shared] == [0.333] * 3
    assert [e["resources"]["num_cpus"] for e in shared] == [e["resources"]["num_cpus"] for e in demo_experts()]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DenseforgeError, match="no CUDA device is visible here"):
        bench_experts(2, gpu=True)
