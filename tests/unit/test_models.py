import pytest

from denseforge.errors import ModelLoadError
from denseforge.models import pick_device


def test_cuda_asked_where_no_gpu_is_seen_names_no_other_stage(monkeypatch):
    """Regression: the clip-tags expert, the qa score and the captioner said "embed.device is cuda"."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError) as caught:
        pick_device("cuda")
    assert "embed" not in str(caught.value) and "device: auto" in str(caught.value)
    assert pick_device("auto") == "cpu" and pick_device("cpu") == "cpu"
