"""OCR experts: `rapidocr` (PaddleOCR's PP-OCR models on ONNX Runtime, bundled, offline) and
`paddleocr` (the PaddleOCR package itself, optional)."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from denseforge.errors import ModelLoadError
from denseforge.experts.base import Expert, ExpertInput, Resources


class OcrOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_score: float = Field(0.5, ge=0, le=1)
    use_angle_cls: bool = True
    lang: str = Field("ch", description="paddleocr only: recognition language")


def _line(polygon, text: str, score: float) -> dict[str, Any]:
    pts = [[round(float(x), 2), round(float(y), 2)] for x, y in polygon]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return {"text": str(text), "score": round(float(score), 4), "box": [min(xs), min(ys), max(xs), max(ys)],
            "polygon": pts}


class RapidOcrExpert(Expert):
    """Text lines with polygons; the PP-OCRv4 det/rec/cls ONNX models ship in the wheel."""

    name = "rapidocr"
    kind = "ocr"
    default_resources = Resources(batch_size=4)
    Options = OcrOptions

    def setup(self) -> None:
        from rapidocr_onnxruntime import RapidOCR

        # its sessions take every core by default: several OCR actors on one node oversubscribe it
        self.engine = RapidOCR(intra_op_num_threads=self.resources.threads, inter_op_num_threads=1)

    def __call__(self, batch: list[ExpertInput]) -> list[list[dict[str, Any]]]:
        out = []
        for item in batch:
            result, _ = self.engine(np.asarray(item.image)[:, :, ::-1].copy(), use_cls=self.options.use_angle_cls)
            out.append([_line(poly, text, score) for poly, text, score in (result or [])
                        if float(score) >= self.options.min_score])
        return out

    def provenance(self) -> dict[str, Any]:
        from importlib import metadata

        return {"plugin": self.name, "model": "PP-OCRv4 det/rec/cls (ONNX, bundled with rapidocr-onnxruntime "
                f"{metadata.version('rapidocr-onnxruntime')})"}


class PaddleOcrExpert(RapidOcrExpert):
    """The PaddleOCR package as a backend (2.x `ocr()` API). Not installed by default; its models
    download from Baidu's servers on first use, so it does not work on an offline machine."""

    name = "paddleocr"

    def setup(self) -> None:
        try:
            from paddleocr import PaddleOCR
        except ImportError:
            raise ModelLoadError("the paddleocr expert needs `pip install paddleocr paddlepaddle`; "
                                 "the rapidocr expert runs the same PP-OCR models offline") from None
        self.engine = PaddleOCR(use_angle_cls=self.options.use_angle_cls, lang=self.options.lang, show_log=False)

    def __call__(self, batch: list[ExpertInput]) -> list[list[dict[str, Any]]]:
        out = []
        for item in batch:
            pages = self.engine.ocr(np.asarray(item.image)[:, :, ::-1].copy(), cls=self.options.use_angle_cls)
            lines = (pages or [None])[0] or []
            out.append([_line(poly, text, score) for poly, (text, score) in lines if float(score) >= self.options.min_score])
        return out

    def provenance(self) -> dict[str, Any]:
        return {"plugin": self.name, "model": f"paddleocr lang={self.options.lang}"}
