"""Expert discovery through the entry-point group `denseforge.experts` (built-ins included)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata

from denseforge.errors import ConfigError, DenseforgeError
from denseforge.experts.base import Expert

GROUP = "denseforge.experts"


@dataclass(frozen=True)
class ExpertEntry:
    name: str
    target: str
    package: str


def entries() -> dict[str, ExpertEntry]:
    """Every registered expert plugin by name (not imported yet)."""
    found: dict[str, ExpertEntry] = {}
    for ep in metadata.entry_points(group=GROUP):
        package = ep.dist.name if ep.dist is not None else "?"
        found[ep.name] = ExpertEntry(ep.name, ep.value, package)
    return dict(sorted(found.items()))


def load_expert_class(name: str) -> type[Expert]:
    """Import the class registered as `name`; a clear error if it is missing or not an Expert."""
    for ep in metadata.entry_points(group=GROUP):
        if ep.name == name:
            try:
                cls = ep.load()
            except Exception as exc:  # noqa: BLE001 - a plugin's import failure, reported with its name
                raise DenseforgeError(f"expert plugin {name!r} ({ep.value}) failed to import: {exc}") from exc
            if not (isinstance(cls, type) and issubclass(cls, Expert)):
                raise DenseforgeError(f"expert plugin {name!r} ({ep.value}) is not a denseforge.experts.Expert subclass")
            return cls
    known = ", ".join(entries()) or "none"
    raise ConfigError(f"no expert plugin named {name!r} is installed (installed: {known})")


def describe_experts() -> list[dict[str, str]]:
    """Name, kind, resources and package of every installed expert (for `denseforge experts`)."""
    rows = []
    for name, entry in entries().items():
        try:
            cls = load_expert_class(name)
            r = cls.default_resources
            rows.append({"name": name, "kind": cls.kind, "consumes": ",".join(cls.consumes) or "-",
                         "resources": f"gpus={r.num_gpus} cpus={r.num_cpus} batch={r.batch_size} x{r.concurrency}",
                         "package": entry.package})
        except DenseforgeError as err:
            rows.append({"name": name, "kind": "?", "consumes": "?", "resources": f"unavailable: {err}",
                         "package": entry.package})
    return rows
