"""OCR experts: `rapidocr` (PaddleOCR's PP-OCRv6 models on ONNX Runtime, bundled, offline) and
`paddleocr` (the PaddleOCR package itself, optional). Both report lines: PP-OCRv6's detector boxes
single words where a line's spaces are wide, so words side by side on one line are joined."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from denseforge.errors import ModelLoadError
from denseforge.experts.base import Expert, ExpertInput, Resources


class OcrOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_score: float = Field(0.5, ge=0, le=1)
    use_angle_cls: bool = True
    lang: str = Field("ch", description="paddleocr only: recognition language")
    limit_side_len: int = Field(
        960,
        ge=32,
        description="the detector's input: the image is scaled so that its "
        "longer side (limit_type max) is at most this, or its shorter (min) at least this",
    )
    limit_type: Literal["max", "min"] = Field(
        "max",
        description="PaddleOCR's default; rapidocr's own 736/min upsizes "
        "a 640x480 photo and takes longer for the same text read",
    )
    unclip_ratio: float = Field(
        1.2,
        gt=1,
        description="rapidocr: how far a detected text region is grown "
        "into its box (PP-OCRv6's own 1.6 pads boxes well beyond the text height)",
    )
    line_gap: float = Field(
        1.2,
        ge=0,
        description="words whose boxes share a line and are at most this "
        "many line heights apart are one line; 0 keeps the detector's boxes",
    )


def _line(polygon, text: str, score: float) -> dict[str, Any]:
    pts = [[round(float(x), 2), round(float(y), 2)] for x, y in polygon]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return {
        "text": str(text),
        "score": round(float(score), 4),
        "box": [min(xs), min(ys), max(xs), max(ys)],
        "polygon": pts,
    }


def join_words(lines: list[dict[str, Any]], max_gap: float) -> list[dict[str, Any]]:
    """Join word boxes into lines, left to right: a box joins a line when they overlap vertically
    by >= 60 % of the smaller height and the horizontal gap is at most `max_gap` heights (detector
    margins may overlap by up to half a height). Text joins with a space; the score is the lowest."""
    if max_gap <= 0:
        return lines
    joined: list[dict[str, Any]] = []
    for word in sorted(lines, key=lambda ln: (ln["box"][0], ln["box"][1])):
        x0, y0, x1, y1 = word["box"]
        for line in joined:
            lx0, ly0, lx1, ly1 = line["box"]
            height = min(y1 - y0, ly1 - ly0)
            overlap = min(y1, ly1) - max(y0, ly0)
            if overlap >= 0.6 * height and -0.5 * height <= x0 - lx1 <= max_gap * height:
                first, last = line["polygon"], word["polygon"]
                line.update(
                    text=f"{line['text']} {word['text']}",
                    score=min(line["score"], word["score"]),
                    box=[lx0, min(y0, ly0), max(x1, lx1), max(y1, ly1)],
                    polygon=[first[0], last[1], last[2], first[3]],
                )
                break
        else:
            joined.append(dict(word))
    return sorted(joined, key=lambda ln: (ln["box"][1], ln["box"][0]))


class RapidOcrExpert(Expert[OcrOptions]):
    """Text lines with polygons; the PP-OCRv6 det/rec and PP-OCR v2.0 cls ONNX models ship in the
    `rapidocr` wheel."""

    name = "rapidocr"
    kind = "ocr"
    default_resources = Resources(batch_size=4)
    Options = OcrOptions

    def setup(self) -> None:
        from rapidocr import RapidOCR

        # its sessions take every core by default: several OCR actors on one node oversubscribe it
        self.engine: Any = RapidOCR(
            params={
                "Global.log_level": "error",
                "EngineConfig.onnxruntime.intra_op_num_threads": self.resources.threads,
                "EngineConfig.onnxruntime.inter_op_num_threads": 1,
                # a worker given a GPU runs on it (needs onnxruntime-gpu)
                "EngineConfig.onnxruntime.use_cuda": self.resources.num_gpus > 0,
                "Det.limit_side_len": self.options.limit_side_len,
                "Det.limit_type": self.options.limit_type,
            }
        )
        # rapidocr loads each model on first use (downloading one that is missing): load them now,
        # so a broken install fails at setup, before any download of images
        try:
            for load in (self.engine._load_det_model, self.engine._load_cls_model, self.engine._load_rec_model):
                load()
        except Exception as exc:  # noqa: BLE001 - any loader failure is a setup failure
            raise ModelLoadError(
                f"rapidocr could not load its bundled PP-OCR models ({exc}); "
                "reinstall with `pip install --force-reinstall 'rapidocr>=3.10,<4'`"
            ) from exc

    def __call__(self, batch: list[ExpertInput]) -> list[list[dict[str, Any]]]:
        out = []
        for item in batch:
            result = self.engine(
                np.asarray(item.image)[:, :, ::-1].copy(),
                use_cls=self.options.use_angle_cls,
                unclip_ratio=self.options.unclip_ratio,
            )
            found = zip(
                result.boxes if result.boxes is not None else [], result.txts or (), result.scores or (), strict=True
            )
            out.append(
                join_words(
                    [_line(poly, text, score) for poly, text, score in found if float(score) >= self.options.min_score],
                    self.options.line_gap,
                )
            )
        return out

    def provenance(self) -> dict[str, Any]:
        from importlib import metadata

        return {
            "plugin": self.name,
            "model": "PP-OCRv6 small det/rec, PP-OCR mobile v2.0 cls (ONNX, bundled with rapidocr "
            f"{metadata.version('rapidocr')})",
        }


class PaddleOcrExpert(RapidOcrExpert):
    """The PaddleOCR package as a backend (2.x `ocr()` API). Not installed by default; its models
    download from Baidu's servers on first use, so it does not work on an offline machine."""

    name = "paddleocr"

    def setup(self) -> None:
        try:
            from paddleocr import PaddleOCR
        except ImportError:
            raise ModelLoadError(
                "the paddleocr expert needs `pip install paddleocr paddlepaddle`; "
                "the rapidocr expert runs the same PP-OCR models offline"
            ) from None
        self.engine: Any = PaddleOCR(
            use_angle_cls=self.options.use_angle_cls,
            lang=self.options.lang,
            show_log=False,
            det_limit_side_len=self.options.limit_side_len,
            det_limit_type=self.options.limit_type,
        )

    def __call__(self, batch: list[ExpertInput]) -> list[list[dict[str, Any]]]:
        out = []
        for item in batch:
            pages = self.engine.ocr(np.asarray(item.image)[:, :, ::-1].copy(), cls=self.options.use_angle_cls)
            lines = (pages or [None])[0] or []
            out.append(
                join_words(
                    [
                        _line(poly, text, score)
                        for poly, (text, score) in lines
                        if float(score) >= self.options.min_score
                    ],
                    self.options.line_gap,
                )
            )
        return out

    def provenance(self) -> dict[str, Any]:
        return {"plugin": self.name, "model": f"paddleocr lang={self.options.lang}"}
