"""`yolox`: YOLOX detectors exported to ONNX, on ONNX Runtime — a real COCO detector offline.

The YOLOX-Nano weights ship inside denseforge (`builtin:yolox_nano`, Apache-2.0, NOTICE beside
them), so a pip-installed denseforge detects people, cups and cats with no download. Any YOLOX
model exported to ONNX works too (`options.model: /path/model.onnx`, `input_size`, `class_names`).
Pre- and post-processing are YOLOX's: a ratio-keeping resize into the top-left corner padded with
114 (BGR, 0-255), grid decoding of the three strides, score = objectness x class probability,
then class-wise NMS (OpenCV's). CPU by default; the CUDA provider when the actor has a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from denseforge.errors import ModelLoadError
from denseforge.experts.base import Expert, ExpertInput, Resources, clip_box

MODELS = Path(__file__).parent / "models"
STRIDES = (8, 16, 32)


class YoloxOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field("builtin:yolox_nano", description="builtin:yolox_nano or a path to a YOLOX .onnx")
    input_size: int = Field(416, ge=32, description="the square side the model was exported for")
    score_threshold: float = Field(0.3, ge=0, le=1, description="objectness x class probability")
    nms_iou: float = Field(0.45, gt=0, le=1)
    class_names: str | list[str] = Field("builtin:objects", description="a vocabulary (the 80 COCO names) or a list")
    max_detections: int = Field(100, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


def letterbox(image_bgr: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """The image resized by r = min(size/h, size/w) into the top-left of a size x size canvas of
    114s, as a float32 CHW tensor; returns it and r."""
    import cv2

    h, w = image_bgr.shape[:2]
    r = min(size / h, size / w)
    resized = cv2.resize(image_bgr, (max(1, int(w * r)), max(1, int(h * r))), interpolation=cv2.INTER_LINEAR)
    canvas = np.full((size, size, 3), 114, dtype=np.uint8)
    canvas[: resized.shape[0], : resized.shape[1]] = resized
    return canvas.transpose(2, 0, 1).astype(np.float32), r


def decode(raw: np.ndarray, size: int) -> np.ndarray:
    """YOLOX head output (n, 5 + classes) to boxes in input pixels: centre offsets plus the grid
    cell, times the stride; log sizes exponentiated, times the stride."""
    grids: list[np.ndarray] = []
    strides: list[np.ndarray] = []
    for stride in STRIDES:
        cells = size // stride
        ys, xs = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
        grids.append(np.stack([xs, ys], axis=-1).reshape(-1, 2))
        strides.append(np.full((cells * cells, 1), stride))
    grid, offsets = np.concatenate(grids), np.concatenate(strides)
    out = raw.astype(np.float32).copy()
    out[:, :2] = (out[:, :2] + grid) * offsets
    out[:, 2:4] = np.exp(out[:, 2:4]) * offsets
    return out


class YoloxExpert(Expert[YoloxOptions]):
    name = "yolox"
    kind = "objects"
    default_resources = Resources(batch_size=8)
    Options = YoloxOptions

    def model_path(self) -> Path:
        spec = self.options.model
        return MODELS / f"{spec.split(':', 1)[1]}.onnx" if spec.startswith("builtin:") else Path(spec)

    def setup(self) -> None:
        import onnxruntime as ort

        from denseforge.experts.clip_tags import read_vocabulary

        o = self.options
        self.names = read_vocabulary(o.class_names) if isinstance(o.class_names, str) else list(o.class_names)
        providers = ["CPUExecutionProvider"]
        if o.device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        elif o.device == "cuda":
            raise ModelLoadError("yolox: device is cuda but onnxruntime has no CUDA provider here (onnxruntime-gpu)")
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = self.resources.threads  # the CPUs this actor was given
        try:
            self.session = ort.InferenceSession(str(self.model_path()), session_options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - missing files, not an ONNX model
            raise ModelLoadError(f"yolox: cannot load {o.model!r}: {type(exc).__name__}: {exc}") from None
        self.input = self.session.get_inputs()[0].name
        classes = self.session.get_outputs()[0].shape[-1] - 5
        if isinstance(classes, int) and classes != len(self.names):
            raise ModelLoadError(f"yolox: the model has {classes} classes but class_names lists {len(self.names)}")
        self.providers = self.session.get_providers()

    def detect(self, image_rgb: np.ndarray) -> list[dict[str, Any]]:
        import cv2

        o = self.options
        tensor, r = letterbox(np.ascontiguousarray(image_rgb[:, :, ::-1]), o.input_size)
        raw = self.session.run(None, {self.input: tensor[None]})[0][0]
        out = decode(raw, o.input_size)
        cls = out[:, 5:].argmax(1)
        scores = out[:, 4] * out[np.arange(len(out)), 5 + cls]
        keep = scores >= o.score_threshold
        if not keep.any():
            return []
        boxes_xywh = np.concatenate([out[keep, :2] - out[keep, 2:4] / 2, out[keep, 2:4]], axis=1) / r
        picked = cv2.dnn.NMSBoxesBatched(
            boxes_xywh.tolist(),
            scores[keep].tolist(),
            cls[keep].tolist(),
            o.score_threshold,
            o.nms_iou,
            top_k=o.max_detections,
        )
        found = []
        height, width = image_rgb.shape[:2]
        for i in np.asarray(picked, dtype=np.int64).reshape(-1):
            x, y, w, h = (float(v) for v in boxes_xywh[i])
            box = clip_box([x, y, x + w, y + h], width, height)  # boxes may overhang the image
            if box is not None:
                found.append(
                    {"label": self.names[int(cls[keep][i])], "score": round(float(scores[keep][i]), 4), "box": box}
                )
        return sorted(found, key=lambda d: -d["score"])

    def __call__(self, batch: list[ExpertInput]) -> list[list[dict[str, Any]]]:
        return [self.detect(np.asarray(item.image.convert("RGB"))) for item in batch]

    def provenance(self) -> dict[str, Any]:
        path = self.model_path()
        return {
            "plugin": self.name,
            "model": self.options.model,
            "weights": "pretrained (YOLOX-Nano, COCO, Apache-2.0; experts/models/NOTICE)"
            if self.options.model == "builtin:yolox_nano"
            else f"ONNX file {path.name}",
            "runtime": "onnxruntime",
            "providers": getattr(self, "providers", None),
        }
