"""The stage protocol: every per-sample phase between load and write is a `Stage`.

A stage has a name, declares its resources, loads its model once in `setup()` (called in the
worker that runs it, never on the driver) and turns a batch of `Item`s into one verdict per item:
`None` (the sample goes on, changed in place), a `Rejection` (a reject row with a reason), a
`Removal` (dropped as a duplicate or not selected) or an exception instance (this item failed).
A stage may also raise: the runner splits the batch down to the failing item, so one bad image
costs only itself. The runner (`denseforge.pipeline.adapter`) owns everything else — decoding,
skipping finished rows, isolation, out-of-memory batch shrinking, counting and re-encoding — so
a stage is testable with a list of items and no cluster.

Plugin packages add stages through the entry-point group `denseforge.stages`; a config entry
under `stages:` places them in the flow.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from denseforge.plugin import NoOptions, OptionsT, Resources, validated_options
from denseforge.stages.sample import Sample

# Setting names that change how a stage runs, not what it outputs (its workers, retries, where its
# server is): a resume may change them, and they are not part of a stage's cache fingerprint.
RUN_OPTIONS = (
    "concurrency|num_cpus|num_gpus|batch_size|max_error_rate|timeout_s|max_retries|check_server|api_key_env|base_url"
)
_RUN_OPTION = re.compile(rf"^(resources|{RUN_OPTIONS})$")
# Provenance entries no stage reads (who produced what, what came from the cache): not part of the
# record a cached stage's output is keyed by
UNREAD_PROVENANCE = ("experts", "cache")


def settings_fingerprint(settings: BaseModel | dict[str, Any]) -> str:
    """Canonical JSON of the settings that decide a stage's output (run options left out)."""

    def data(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: data(v) for k, v in value.items() if not _RUN_OPTION.match(k)}
        if isinstance(value, list):
            return [data(v) for v in value]
        return value

    dumped = settings.model_dump(mode="json") if isinstance(settings, BaseModel) else settings
    return json.dumps(data(dumped), sort_keys=True, separators=(",", ":"))


class WorkerSettings(BaseModel):
    """Settings of a model stage's workers, as config keys beside its other settings."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    concurrency: int = Field(1, ge=1, description="workers, each with the model loaded")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per worker")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per worker (fractions share one GPU)")
    batch_size: int = Field(16, ge=1, le=4096, description="items per call")
    max_error_rate: float | None = Field(0.05, ge=0, le=1, description="share of items it may fail on; null: no limit")

    @property
    def resources(self) -> Resources:
        return Resources(
            num_cpus=self.num_cpus, num_gpus=self.num_gpus, batch_size=self.batch_size, concurrency=self.concurrency
        )


@dataclass
class Item:
    """One sample on its way through a stage: the record, the stored image bytes, and the decoded
    image (decoded on first use, once per worker call: a group's stages share it). `outputs` holds
    per-item results that are not part of the sample record (the embed pass's vectors); `counts` are
    things the stage wants counted (summed per stage into stats.json, e.g. an expert's clipped boxes)."""

    unit: int
    sample: Sample
    data: bytes
    outputs: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    _image: Image.Image | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return self.sample.key

    @property
    def image(self) -> Image.Image:
        if self._image is None:
            self._image = Image.open(io.BytesIO(self.data)).convert("RGB")
        return self._image


@dataclass(frozen=True)
class Rejection:
    """The item is written to rejects.parquet with this reason (and detail). `stage` names an
    earlier phase when a stage relays that phase's verdict (dedup relays the embed pass's)."""

    reason: str
    detail: str = ""
    stage: str | None = None


@dataclass(frozen=True)
class Removal:
    """The item is dropped as a duplicate of `dup_of` (or not selected); dedup's table names it."""

    reason: str
    dup_of: str | None = None
    cluster: int | None = None


Verdict = Rejection | Removal | BaseException | None


class Stage(ABC, Generic[OptionsT]):
    """Base class of every per-sample phase; subclass it, give it a `name`, implement `process`.

    `error_reason` is the reject reason of an item the stage failed on (when the run's policy for
    this stage is to reject such items). `Options` is the pydantic model of the stage's settings:
    for built-in stages it is the config section itself; `Stage[ThatModel]` types `self.options`.
    """

    name: ClassVar[str]
    default_resources: ClassVar[Resources] = Resources(num_cpus=0.25, batch_size=64, concurrency=None)
    error_reason: ClassVar[str] = "stage_error"
    Options: ClassVar[type[BaseModel]] = NoOptions
    # True: its outputs are kept in the run's cache of stage outputs and reused wherever its
    # fingerprint and its input are the same (a stage that calls a model; it must be deterministic)
    cached: ClassVar[bool] = False

    def __init__(self, options: BaseModel | dict[str, Any] | None = None):
        self.options: OptionsT = validated_options(self.Options, options)

    def fingerprint(self) -> str:
        """What decides this stage's output besides its input: its class and its settings (a stage
        whose output depends on more, e.g. a prompt file's text, adds that)."""
        cls = type(self)
        return f"{cls.__module__}.{cls.__qualname__}:{settings_fingerprint(self.options)}"

    def cache_input(self, item: Item) -> Any:
        """What of the item this stage's output depends on (JSON): the whole record by default,
        but for the provenance no stage reads; a stage that reads less says so (an expert: the
        image and the kinds it consumes)."""
        record = item.sample.model_dump(mode="json")
        record["provenance"] = {k: v for k, v in record["provenance"].items() if k not in UNREAD_PROVENANCE}
        return record

    def evidence_input(self, item: Item) -> Any:
        """`cache_input` for a stage that reads the evidence as the captioner's prompt does: expert
        kinds with nothing found are left out, so an added expert that sees nothing in an image
        leaves the image's key as it was."""
        record = Stage.cache_input(self, item)
        record["experts"] = {kind: found for kind, found in record["experts"].items() if found}
        return record

    def cache_key(self, item: Item) -> str:
        blob = json.dumps(self.cache_input(item), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def setup(self) -> None:
        """Load models and open files; called once per worker before the first batch."""

    @abstractmethod
    def process(self, batch: list[Item]) -> list[Verdict]:
        """One verdict per item, in order; change `item.sample` in place to pass information on."""

    @classmethod
    def plan(cls, flow: Flow) -> list[StageRun] | None:
        """A built-in phase: the runs of it its config section asks for (none when it is off), in
        the place the flow gives its name. None (the default): a stage placed by a `stages:` entry."""
        return None


@dataclass
class StageRun:
    """A stage as the pipeline runs it: its instance name (in stats, errors and reject rows), its
    resources, what happens to an item it fails on, the share of failures the run tolerates, and
    the group whose worker it shares with the stages next to it (None: a worker of its own)."""

    stage: Stage
    instance: str
    resources: Resources
    on_error: Literal["reject", "keep"] = "reject"
    max_error_rate: float | None = 0.05
    group: str | None = None

    @classmethod
    def light(cls, stage: Stage, max_error_rate: float | None = 0.05) -> StageRun:
        """A stage without a model: it runs in the next CPU worker of the flow, with its default resources."""
        return cls(stage, stage.name, type(stage).default_resources, max_error_rate=max_error_rate)


@dataclass
class Flow:
    """What the built-in phases are planned from, in flow order: the run's config (each phase reads
    its own section), where dedup's decisions are, and what an earlier phase hands a later one
    (the experts' renderers for the captioner, whether the caption carries its own grounding)."""

    config: Any
    decisions: Any
    embed_rejects: Callable[[int], Any]
    handed_on: dict[str, Any] = field(default_factory=dict)
