"""ground: tie caption phrases to expert boxes (character spans <-> boxes).

Mentions of detected labels are found case- and plural-aware; a plural or counted mention ties
to every box of that label, a singular one to the next box not yet tied (largest first). OCR
lines found verbatim in the caption tie to their text boxes. The box-reference mode parses
`<ref id=N>phrase</ref>` markup a model was asked to write, strips it, and survives malformed
markup. Every entry satisfies `caption[span[0]:span[1]] == phrase`.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any, Literal

from pydantic import Field

from denseforge.stages.sample import Grounding
from denseforge.stages.stage import Flow, Item, Stage, StageRun, Verdict, WorkerSettings
from denseforge.stages.synonyms import SynonymConfig, SynonymMatcher


class GroundConfig(WorkerSettings):
    """How caption phrases are tied to boxes (the worker keys size the synonym model's worker)."""

    num_cpus: float = Field(0.25, gt=0, description="CPUs of the worker that holds the synonym model")
    batch_size: int = Field(32, ge=1, le=4096, description="captions per call")

    mode: Literal["mentions", "markup"] = Field(
        "mentions", description="markup: the model marks phrases <ref id=N>..</ref>; mentions: found afterwards"
    )
    aliases: str | None = Field(
        "builtin:aliases", description="fine-grained name -> detector label TSV for knowledge-aligned grounding"
    )
    synonyms: SynonymConfig = Field(default_factory=SynonymConfig)


IRREGULAR = {
    "person": "people",
    "man": "men",
    "woman": "women",
    "child": "children",
    "mouse": "mice",
    "knife": "knives",
    "sheep": "sheep",
    "fish": "fish",
    "bus": "buses",
    "glass": "glasses",
    "skis": "skis",
    "scissors": "scissors",
    "tv": "tvs",
}


def plural(noun: str) -> str:
    """English plural of the last word of a label ("wine glass" -> "wine glasses")."""
    head, _, last = noun.rpartition(" ")
    if last in IRREGULAR:
        word = IRREGULAR[last]
    elif re.search(r"(s|x|z|ch|sh)$", last):
        word = last + "es"
    elif re.search(r"[^aeiou]y$", last):
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


def _area(box: list[float]) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


@lru_cache(maxsize=8)
def read_aliases(spec: str | None) -> dict[str, str]:
    """Fine-grained name -> detector label, from `builtin:aliases` or a TSV path (None: no aliases)."""
    from pathlib import Path

    from denseforge.errors import ConfigError

    if spec is None:
        return {}
    path = Path(__file__).parent / "prompts" / "aliases.tsv" if spec == "builtin:aliases" else Path(spec)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"ground.aliases {spec!r} cannot be read: {exc.strerror}") from None
    pairs = [line.split("\t") for line in lines if line.strip() and not line.startswith("#")]
    bad = [p for p in pairs if len(p) != 2]
    if bad:
        raise ConfigError(f"ground.aliases {spec!r}: expected 'name<TAB>label' lines, got {bad[0]!r}")
    return {name.strip().lower(): label.strip().lower() for name, label in pairs}


_MODIFIER = r"(?:(?:[A-Z][\w'-]*|\d[\w.-]*)\s+){1,3}"  # capitalised or numeric words: "Falcon 9 ", "Golden "
DETERMINERS = frozenset(
    "the a an this that these those its their his her our my one two three four five six seven eight nine ten "
    "several some many both each every another other in on at with and of".split()
)


def ground_mentions(
    caption: str, experts: dict[str, list[dict[str, Any]]], aliases: dict[str, str] | None = None
) -> list[Grounding]:
    """Spans of object labels (with proper-name modifiers: "Falcon 9 rocket"), of fine-grained
    names that refine a detected label ("tabby cat" -> cat, via `aliases`) and of OCR strings."""
    out: list[Grounding] = []
    by_label: dict[str, list[int]] = {}
    objects = experts.get("objects", [])
    for i, obj in enumerate(objects):
        by_label.setdefault(obj["label"].lower(), []).append(i)
    names_for: dict[str, list[str]] = {label: [label] for label in by_label}
    for name, label in (aliases or {}).items():
        if label in names_for and name != label:
            names_for[label].append(name)
    taken = bytearray(len(caption))  # characters a mention already holds: linear, not quadratic
    # longest names first, so "hot dog" holds its characters before "dog" looks for its own
    for label, indices in sorted(by_label.items(), key=lambda item: (-max(map(len, names_for[item[0]])), item[0])):
        indices.sort(key=lambda i: -_area(objects[i]["box"]))
        forms = sorted({f for n in names_for[label] for f in (n, plural(n))}, key=len, reverse=True)
        plurals = {plural(n).lower() for n in names_for[label]} - {n.lower() for n in names_for[label]}
        # modifiers must be capitalised or numeric (case-sensitive); the names match in any case
        pattern = re.compile(rf"({_MODIFIER})?\b(?i:({'|'.join(map(re.escape, forms))}))\b")
        next_box = 0
        for match in pattern.finditer(caption):
            start, end = match.start(2), match.end(2)
            if match.group(1):
                words = match.group(1).split()
                while words and words[0].lower() in DETERMINERS:
                    words.pop(0)
                if words:
                    start = caption.rfind(words[0], match.start(1), end)
            if any(taken[start:end]):
                continue  # a longer name of another label already holds these characters
            taken[start:end] = b"\x01" * (end - start)
            is_plural = match.group(2).lower() in plurals
            chosen = indices if is_plural else [indices[next_box % len(indices)]]
            next_box += 0 if is_plural else 1
            for i in chosen:
                out.append(
                    Grounding(
                        phrase=caption[start:end], span=(start, end), box=objects[i]["box"], source=f"objects/{i}"
                    )
                )
    for i, line in enumerate(experts.get("ocr", [])):
        text = line.get("text", "").strip()
        if len(text) < 2:
            continue
        start, end = caption.find(text), -1
        if start >= 0:
            end = start + len(text)
        else:  # case- and space-insensitive ("OPEN24HOURS" read, "Open 24 hours" written), with
            # positions in the caption itself ("İ".lower() is two characters)
            loose = r"\s*".join(re.escape(c) for c in "".join(text.split()))
            found = re.search(loose, caption, re.IGNORECASE)
            if found:
                start, end = found.span()
        if start >= 0:
            out.append(Grounding(phrase=caption[start:end], span=(start, end), box=line["box"], source=f"ocr/{i}"))
    return sorted(out, key=lambda g: (g.span, g.source))


_REF = re.compile(r"<ref\s+id\s*=\s*[\"']?(\d+)[\"']?\s*>(.*?)</ref>", re.IGNORECASE | re.DOTALL)
_STRAY = re.compile(r"</?ref\b(?:[^<>]*>)?", re.IGNORECASE)


def parse_ref_markup(text: str, objects: list[dict[str, Any]]) -> tuple[str, list[Grounding]]:
    """Strip `<ref id=N>phrase</ref>` markup; return the clean caption and the phrase->box ties.
    Unknown ids keep their phrase without a box; unclosed or stray tags are dropped."""
    clean, groundings, cursor = [], [], 0
    length = 0
    for match in _REF.finditer(text):
        before = _STRAY.sub("", text[cursor : match.start()])
        clean.append(before)
        length += len(before)
        phrase = _STRAY.sub("", match.group(2))
        index = int(match.group(1))
        if phrase and 0 <= index < len(objects):
            groundings.append(
                Grounding(
                    phrase=phrase,
                    span=(length, length + len(phrase)),
                    box=objects[index]["box"],
                    source=f"objects/{index}",
                )
            )
        clean.append(phrase)
        length += len(phrase)
        cursor = match.end()
    clean.append(_STRAY.sub("", text[cursor:]))
    return "".join(clean), groundings


class GroundStage(Stage[GroundConfig]):
    """Ties the caption's mentions of detected labels, fine-grained aliases, synonyms (see
    `stages/synonyms.py`) and OCR lines to boxes; the synonyms it matched, and the labels they
    claim, go to the sample's provenance for the hallucination check."""

    name = "ground"
    Options = GroundConfig
    cached = True  # with synonyms it calls a sentence-embedding model

    def __init__(self, options: GroundConfig):
        super().__init__(options)
        self.aliases = read_aliases(options.aliases)  # a bad alias file fails here, on the driver
        self.matcher = SynonymMatcher(options.synonyms) if options.synonyms.enabled else None

    def cache_input(self, item: Item) -> Any:
        """Grounding reads the boxes and lines found, never an empty kind."""
        return self.evidence_input(item)

    def fingerprint(self) -> str:
        """Its settings and the aliases as read (an alias file edited in place is new aliases)."""
        return f"{super().fingerprint()}:{json.dumps(self.aliases, sort_keys=True)}"

    @classmethod
    def plan(cls, flow: Flow) -> list[StageRun]:
        """After the captioner, unless its caption carries its own grounding."""
        cfg = flow.config.ground
        if not flow.config.fuse.enabled or flow.handed_on.get("markup"):
            return []
        ground = cls(cfg)  # with synonyms a model to keep loaded (an actor), else tasks
        resources = cfg.resources if ground.matcher else cls.default_resources
        return [StageRun(ground, cls.name, resources, max_error_rate=cfg.max_error_rate)]

    def setup(self) -> None:
        if self.matcher is not None:
            self.matcher.setup()

    def process(self, batch: list[Item]) -> list[Verdict]:
        for item in batch:
            sample, aliases = item.sample, self.aliases
            caption = sample.caption or ""
            if self.matcher is not None:
                detected = sorted({o["label"].lower() for o in sample.experts.get("objects", [])})
                matches = self.matcher.match(caption, detected)
                aliases = {**self.aliases, **{w: label for w, (label, _) in matches.items() if label in detected}}
                sample.provenance["ground"] = dict(self.matcher.evidence(matches), **self.matcher.provenance)
            sample.grounding = ground_mentions(caption, sample.experts, aliases)
        return [None] * len(batch)
