"""An example plugin package, written the way a third party would (no denseforge code changed):
an expert (dominant colours) and a stage (a minimum caption length gate)."""

from pydantic import BaseModel, ConfigDict, Field

from denseforge.experts import Expert, ExpertInput, Resources
from denseforge.stages import Rejection, Stage

NAMED = {
    "red": (200, 30, 30),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (230, 210, 50),
    "white": (240, 240, 240),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "brown": (120, 80, 40),
}


class ColorOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(3, ge=1)
    fail_below_px: int = Field(0, ge=0, description="raise on images with a shorter edge (to test isolation)")


class DominantColorExpert(Expert):
    name = "colors"
    kind = "colors"
    default_resources = Resources(batch_size=8)
    Options = ColorOptions

    def __call__(self, batch: list[ExpertInput]) -> list[list[dict]]:
        out = []
        for item in batch:
            if min(item.image.size) < self.options.fail_below_px:
                raise ValueError(f"image {item.key} is too small for this example")
            small = item.image.convert("RGB").resize((32, 32))
            counts = dict.fromkeys(NAMED, 0)
            for pixel in small.getdata():
                nearest = min(NAMED, key=lambda n: sum((a - b) ** 2 for a, b in zip(pixel, NAMED[n], strict=True)))
                counts[nearest] += 1
            ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: self.options.top_k]
            out.append([{"label": name, "score": round(n / 1024, 4)} for name, n in ranked if n])
        return out

    def render(self, observations, width, height) -> str:
        return "dominant colours: " + ", ".join(o["label"] for o in observations)


class MinWordsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_words: int = Field(8, ge=1)


class MinCaptionWords(Stage):
    """A filter stage: captions shorter than `min_words` words become reject rows."""

    name = "min-caption-words"
    Options = MinWordsOptions

    def process(self, batch):
        verdicts = []
        for item in batch:
            words = len((item.sample.caption or "").split())
            ok = words >= self.options.min_words
            verdicts.append(None if ok else Rejection("caption_too_short", f"{words} < {self.options.min_words} words"))
        return verdicts
