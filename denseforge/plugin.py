"""The layer under `stages/` and `experts/`: what a plugin is, for both.

A plugin (an expert or a stage, built in or from another package) is a class registered under an
entry-point group, with an `Options` settings model and `default_resources`; a config entry
(`PluginSpec`) names it and gives its options and resources, which `configure` checks against the
plugin's own models. Settings models (`Settings`) forbid unknown keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from denseforge.errors import ConfigError, DenseforgeError

EXPERTS = "denseforge.experts"
STAGES = "denseforge.stages"
WHAT = {EXPERTS: "expert", STAGES: "stage"}


class Settings(BaseModel):
    """Unknown keys are errors; assignments are validated too (`--set`, the demo's input path)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Resources(BaseModel):
    """What one worker of a stage (or expert) needs, and how many to run."""

    model_config = ConfigDict(extra="forbid")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per worker; fractions share a GPU")
    num_cpus: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1, description="items per call (halved on CUDA out-of-memory)")
    concurrency: int | None = Field(
        1, ge=1, description="workers kept alive with the model loaded; null: stateless tasks, as many as fit"
    )
    max_concurrency: int | None = Field(
        None,
        ge=1,
        description="let the pool grow to this many workers while it is the bottleneck and CPUs "
        "(GPUs) are free (Ray Data's autoscaling actor pool); null: fixed at concurrency",
    )

    @model_validator(mode="after")
    def _pool_bounds(self) -> Resources:
        if self.max_concurrency is not None:
            if self.concurrency is None:
                raise ValueError("max_concurrency sizes a worker pool; it needs concurrency (not null)")
            if self.max_concurrency < self.concurrency:
                raise ValueError(
                    f"max_concurrency ({self.max_concurrency}) is below concurrency "
                    f"({self.concurrency}), the pool's starting size"
                )
        return self

    @property
    def threads(self) -> int:
        """Intra-op threads for this worker's model: its CPUs, rounded (at least one). Ray sets
        OMP_NUM_THREADS to int(num_cpus), and ONNX Runtime takes every core unless told."""
        return max(1, round(self.num_cpus))


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


OptionsT = TypeVar("OptionsT", bound=BaseModel)


class PluginSpec(Settings):
    """A config entry that runs a plugin: which one, its instance name, options and resources."""

    plugin: str
    name: str | None = Field(None, description="instance name; defaults to the plugin name")
    options: dict[str, Any] = Field(default_factory=dict)
    resources: dict[str, Any] = Field(default_factory=dict, description="num_gpus, num_cpus, batch_size, concurrency")
    max_error_rate: float | None = Field(0.05, ge=0, le=1, description="share of items it may fail on; null: no limit")
    group: str | None = Field(
        None,
        min_length=1,
        description="stages with the same group, next to each other in the flow, share "
        "one worker: one process (and CUDA context) for their models, each "
        "image decoded once; the worker asks for the sum of their CPUs and "
        "GPUs, and they need the same concurrency",
    )

    @property
    def instance(self) -> str:
        return self.name or self.plugin


def validated_options(model: type[BaseModel], options: BaseModel | dict[str, Any] | None) -> Any:
    """A plugin's options: the model given as is, or validated from a config entry."""
    return options if isinstance(options, BaseModel) else model.model_validate(options or {})


def configure(cls: Any, spec: PluginSpec, where: str) -> tuple[BaseModel, Resources]:
    """A plugin's options and resources from a config entry, checked against the plugin's own
    models (`Options`, `default_resources`); errors name the config key path."""
    try:
        validated = cls.Options.model_validate(spec.options)
    except ValidationError as err:
        raise ConfigError(
            f"{_first_error(f'{where}.options', err)} (plugin {getattr(cls, 'name', cls.__name__)!r})"
        ) from None
    try:
        merged = Resources.model_validate({**cls.default_resources.model_dump(), **spec.resources})
    except ValidationError as err:
        raise ConfigError(_first_error(f"{where}.resources", err)) from None
    return validated, merged


def _first_error(key: str, err: ValidationError) -> str:
    """`key.path.in.it: what is wrong` for a validation error's first problem (a check across
    fields, such as max_concurrency against concurrency, has no field of its own in the path)."""
    first = err.errors()[0]
    return f"{'.'.join([key, *map(str, first['loc'])])}: {first['msg']}"


@dataclass(frozen=True)
class PluginEntry:
    name: str
    target: str
    package: str


def entries(group: str) -> dict[str, PluginEntry]:
    """Every plugin registered in `group` by name (not imported yet)."""
    found: dict[str, PluginEntry] = {}
    for ep in metadata.entry_points(group=group):
        package = ep.dist.name if ep.dist is not None else "?"
        found[ep.name] = PluginEntry(ep.name, ep.value, package)
    return dict(sorted(found.items()))


def load_entry(group: str, entry: PluginEntry, base: type) -> Any:
    """Import the class `entry` names (`module:attribute`); a clear error if it fails to import or
    is not a subclass of `base`."""
    what = WHAT[group]
    try:
        cls = metadata.EntryPoint(entry.name, entry.target, group).load()
    except Exception as exc:  # noqa: BLE001 - a plugin's import failure, reported with its name
        raise DenseforgeError(f"{what} plugin {entry.name!r} ({entry.target}) failed to import: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise DenseforgeError(
            f"{what} plugin {entry.name!r} ({entry.target}) is not a {base.__module__}.{base.__name__} subclass"
        )
    return cls


def load_plugin(group: str, name: str, base: type) -> Any:
    """Import the class installed as `name` in `group` (see `load_entry`)."""
    installed = entries(group)
    if name not in installed:
        known = ", ".join(installed) or "none"
        raise ConfigError(f"no {WHAT[group]} plugin named {name!r} is installed (installed: {known})")
    return load_entry(group, installed[name], base)
