"""`yolo`: ultralytics detectors — any YOLO model by name or path, and YOLO-World open-vocabulary
detection with classes from config or from the tagger's output for the same image."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, model_validator

from denseforge.errors import ModelLoadError
from denseforge.experts.base import Expert, ExpertInput, Resources


class YoloOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field("yolov8x.pt", description="a name ultralytics knows, a local .pt path, or a .yaml architecture")
    weights: Literal["pretrained", "random"] = Field(
        "pretrained", description="random builds the architecture (model with .yaml) untrained: tests and demos only"
    )
    conf: float = Field(0.25, ge=0, le=1)
    iou: float = Field(0.7, ge=0, le=1)
    imgsz: int = Field(640, ge=32)
    max_det: int = Field(100, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    classes: list[str] | None = Field(None, description="YOLO-World: the open vocabulary to detect")
    classes_from: Literal["tags"] | None = Field(None, description="YOLO-World: query with this image's tags")
    text_model: str = Field("ViT-B-32", description="open_clip text tower for YOLO-World class features")
    text_pretrained: str | None = "openai"
    text_weights: Literal["pretrained", "random"] = "pretrained"
    seed: int = 0

    @model_validator(mode="after")
    def _one_vocabulary(self) -> YoloOptions:
        if self.classes is not None and self.classes_from is not None:
            raise ValueError("set classes or classes_from, not both")
        return self

    @property
    def open_vocabulary(self) -> bool:
        return self.classes is not None or self.classes_from is not None


class YoloExpert(Expert[YoloOptions]):
    name = "yolo"
    kind = "objects"
    default_resources = Resources(batch_size=16)
    Options = YoloOptions

    @property
    def consumes(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("tags",) if self.options.classes_from == "tags" else ()

    def setup(self) -> None:
        import torch
        from ultralytics import YOLO

        o = self.options
        self.device = ("cuda:0" if torch.cuda.is_available() else "cpu") if o.device == "auto" else o.device
        source = str(Path(o.model).with_suffix(".yaml")) if o.weights == "random" else o.model
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(o.seed)
                self.model: Any = YOLO(source)
        except Exception as exc:  # noqa: BLE001 - offline downloads, bad paths, bad names
            raise ModelLoadError(
                f"yolo: cannot load {source!r}: {type(exc).__name__}: {exc}. Offline? "
                "Put the .pt file on disk and set options.model to its path."
            ) from None
        self._text_cache: dict[str, Any] = {}
        if o.open_vocabulary:
            if type(self.model.model).__name__ != "WorldModel":
                raise ModelLoadError(f"yolo: classes/classes_from need a YOLO-World model, {o.model!r} is not one")
            from denseforge.models import ClipModel, load_clip

            text_tower = ClipModel(
                model=o.text_model, pretrained=o.text_pretrained, weights=o.text_weights, device="cpu", seed=o.seed
            )
            self.clip, _, self._text_provenance = load_clip(text_tower, "cpu")
            import open_clip

            self.tokenizer = open_clip.get_tokenizer(o.text_model)

    def _set_classes(self, names: list[str]) -> None:
        """Give YOLO-World its vocabulary as CLIP text features (what `set_classes` does with the
        `clip` package, which is not on PyPI)."""
        import torch

        missing = [n for n in names if n not in self._text_cache]
        if missing:
            with torch.inference_mode():
                feats = self.clip.encode_text(self.tokenizer(missing)).float()
            for n, f in zip(missing, torch.nn.functional.normalize(feats, dim=-1), strict=True):
                self._text_cache[n] = f
        feats = torch.stack([self._text_cache[n] for n in names])[None]
        world = self.model.model
        world.txt_feats = feats.to(next(world.parameters()).device)
        world.model[-1].nc = len(names)
        world.names = dict(enumerate(names))
        if getattr(self.model, "predictor", None) is not None:
            self.model.predictor.model.names = world.names

    def _detect(self, images) -> list[list[dict[str, Any]]]:
        o = self.options
        results = self.model.predict(
            images, conf=o.conf, iou=o.iou, imgsz=o.imgsz, max_det=o.max_det, device=self.device, verbose=False
        )
        out = []
        for r in results:
            r = cast(Any, r)  # ultralytics types predict() as Results | Tensor
            names = r.names
            boxes = r.boxes
            out.append(
                [
                    {"label": names[int(c)], "score": round(float(s), 4), "box": [round(float(v), 2) for v in b]}
                    for b, s, c in zip(boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist(), strict=True)
                ]
            )
        return out

    def __call__(self, batch: list[ExpertInput]) -> list[list[dict[str, Any]]]:
        o = self.options
        if not o.open_vocabulary:
            return self._detect([item.image for item in batch])
        out: list[list[dict[str, Any]]] = [[] for _ in batch]
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, item in enumerate(batch):
            wanted = o.classes if o.classes is not None else [t["label"] for t in item.observations.get("tags", [])]
            if wanted:
                groups.setdefault(tuple(dict.fromkeys(wanted)), []).append(i)
        for names, members in groups.items():
            self._set_classes(list(names))
            for i, dets in zip(members, self._detect([batch[i].image for i in members]), strict=True):
                out[i] = dets
        return out

    def untrained(self) -> bool:
        return self.options.weights == "random"

    def provenance(self) -> dict[str, Any]:
        o = self.options
        info: dict[str, Any] = {
            "plugin": self.name,
            "model": o.model,
            "weights": "random (untrained architecture)" if o.weights == "random" else "pretrained",
        }
        if o.open_vocabulary:
            info["vocabulary"] = "tags of the same image" if o.classes_from else o.classes
            info["text_encoder"] = self._text_provenance
        return info
