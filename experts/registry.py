"""Plugin discovery through entry points: experts (`denseforge.experts`) and stages
(`denseforge.stages`), built-ins registered the same way as third-party packages."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Any

from denseforge.errors import ConfigError, DenseforgeError
from denseforge.experts.base import Expert

GROUP = "denseforge.experts"
STAGE_GROUP = "denseforge.stages"


@dataclass(frozen=True)
class PluginEntry:
    name: str
    target: str
    package: str


def entries(group: str = GROUP) -> dict[str, PluginEntry]:
    """Every plugin registered in `group` by name (not imported yet)."""
    found: dict[str, PluginEntry] = {}
    for ep in metadata.entry_points(group=group):
        package = ep.dist.name if ep.dist is not None else "?"
        found[ep.name] = PluginEntry(ep.name, ep.value, package)
    return dict(sorted(found.items()))


def load_plugin(group: str, name: str, base: type) -> Any:
    """Import the class registered as `name` in `group`; a clear error if it is missing, fails to
    import or is not a subclass of `base`."""
    what = "expert" if group == GROUP else "stage"
    for ep in metadata.entry_points(group=group):
        if ep.name == name:
            try:
                cls = ep.load()
            except Exception as exc:  # noqa: BLE001 - a plugin's import failure, reported with its name
                raise DenseforgeError(f"{what} plugin {name!r} ({ep.value}) failed to import: {exc}") from exc
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise DenseforgeError(
                    f"{what} plugin {name!r} ({ep.value}) is not a {base.__module__}.{base.__name__} subclass"
                )
            return cls
    known = ", ".join(entries(group)) or "none"
    raise ConfigError(f"no {what} plugin named {name!r} is installed (installed: {known})")


def load_expert_class(name: str) -> type[Expert]:
    return load_plugin(GROUP, name, Expert)


def describe_experts() -> list[dict[str, str]]:
    """Name, kind, resources and package of every installed expert and plugin stage (for
    `denseforge experts`)."""
    from denseforge.stages.stage import Stage

    rows = []
    for group, base in ((GROUP, Expert), (STAGE_GROUP, Stage)):
        for name, entry in entries(group).items():
            try:
                cls = load_plugin(group, name, base)
                r = cls.default_resources
                if base is Expert:
                    kind = cls.kind
                    consumes = (
                        ",".join(cls.consumes) or "-" if isinstance(cls.consumes, tuple) else "depends on options"
                    )
                else:
                    kind, consumes = "stage", "-"
                rows.append(
                    {
                        "name": name,
                        "kind": kind,
                        "consumes": consumes,
                        "resources": f"gpus={r.num_gpus} cpus={r.num_cpus} batch={r.batch_size} "
                        f"x{r.concurrency or 'tasks'}",
                        "package": entry.package,
                    }
                )
            except DenseforgeError as err:
                rows.append(
                    {
                        "name": name,
                        "kind": "?",
                        "consumes": "?",
                        "resources": f"unavailable: {err}",
                        "package": entry.package,
                    }
                )
    return rows
