"""The flow of one sample: the list of stages the config asks for, in the order they run.

    load ─► dedup ─► expert … expert ─► merge ─► fuse ─► ground ─► clip-score ─► qa ─► write
                (one stage per expert instance,        (plugin stages go wherever
                 producers before consumers)             `stages[].after` puts them)

`build_stages` is the whole per-sample flow; the adapter runs each entry the same way.
"""

from __future__ import annotations

from denseforge.errors import ConfigError, DenseforgeError
from denseforge.experts.base import Expert
from denseforge.pipeline.adapter import StageRun, check_groups
from denseforge.pipeline.config import Config, StageSpec
from denseforge.pipeline.rundir import RunDir
from denseforge.plugin import EXPERTS, STAGES, PluginEntry, Resources, configure, entries, load_entry, load_plugin
from denseforge.stages.embed import EmbedStage, PixelSpec, PixelStage
from denseforge.stages.perceive import plan_experts
from denseforge.stages.stage import Flow, Stage


def embed_stages(config: Config, spec: PixelSpec | None = None) -> list[StageRun]:
    """The embed pass: with CPU workers, `PixelStage` tasks (decode, hash, resize; `spec` from
    `pixel_spec`, resolved where torch may be imported) feeding the model workers; else the model
    workers alone. Without `spec` the pixel stage is listed for its name and budget only."""
    cfg = config.embed
    model = StageRun(EmbedStage(cfg), "embed", cfg.resources, max_error_rate=cfg.max_error_rate)
    if cfg.feeders() == 0:
        return [model]
    pixels = Resources(num_cpus=1, batch_size=cfg.batch_size, concurrency=cfg.feeders())
    return [StageRun(PixelStage(spec), PixelStage.name, pixels, max_error_rate=cfg.max_error_rate), model]


def describe_embed(config: Config, cpus: float) -> str:
    """The plan's line on who feeds whom in the embed pass, for a cluster with `cpus` CPUs."""
    cfg = config.embed
    where = f"{cfg.num_gpus:g} GPU each" if cfg.num_gpus else f"{cfg.num_cpus:g} CPU each"
    model = f"{cfg.concurrency} model worker(s) ({where}, batch {cfg.batch_size}, precision {cfg.precision})"
    if cfg.feeders() == 0:
        why = "auto on CPU" if cfg.cpu_workers == "auto" else "0"
        return f"embed: {model} decode, hash and resize their own images (embed.cpu_workers: {why})"
    feeders = cfg.feeders() or max(1, int(cpus - cfg.concurrency * cfg.num_cpus))
    auto = " (auto: the CPUs the model workers leave free)" if cfg.cpu_workers == "auto" else ""
    return f"embed: {feeders} CPU worker(s){auto} decode, hash and resize for {model}"


# The flow: the built-in phases in order, each a stage class (`module:attribute`, loaded as a plugin
# stage's entry point is) whose `plan` reads its own config section. Adding a phase is its module
# and its line here; plugin stages go where `stages[].after` says.
FLOW = {
    "dedup": "denseforge.stages.dedup:DecisionStage",
    "experts": "denseforge.stages.perceive:ExpertStage",
    "merge": "denseforge.stages.perceive:MergeStage",
    "fuse": "denseforge.stages.fuse:CaptionStage",
    "ground": "denseforge.stages.ground:GroundStage",
    "clip-score": "denseforge.stages.qa:ClipScoreStage",
    "qa": "denseforge.stages.qa:QaStage",
}


def phases() -> dict[str, PluginEntry]:
    """The flow's phases as plugin entries of the package itself."""
    return {name: PluginEntry(name, target, "denseforge") for name, target in FLOW.items()}


def build_stages(config: Config, rd: RunDir) -> list[StageRun]:
    """Every per-sample stage between load and write, in order (no model is loaded here)."""
    flow = Flow(config, rd.decisions, rd.embed_rejects_file)
    runs: list[StageRun] = []
    for name, entry in phases().items():
        planned = load_entry(STAGES, entry, Stage).plan(flow)
        if planned is None:
            raise ConfigError(f"the flow's phase {name!r} is registered by a stage that does not plan itself")
        runs += planned
    for i, spec in enumerate(config.stages):
        run = plugin_stage(spec, f"stages[{i}]")
        names = [r.instance for r in runs]
        if run.instance in names:
            raise ConfigError(f"stages[{i}]: a stage named {run.instance!r} already runs; give this one another name")
        if spec.after is None:
            runs.append(run)
        elif spec.after in names:
            runs.insert(names.index(spec.after) + 1, run)
        else:
            raise ConfigError(
                f"stages[{i}].after: no stage named {spec.after!r} runs in this config "
                f"(stages: {', '.join(names) or 'none'})"
            )
    check_groups(runs)
    return runs


def untrained_models(config: Config) -> list[str]:
    """The models of this config that have random weights (plumbing tests, the demo): the report,
    the dataset card and the epsilon sweep say so, since their outputs carry no meaning."""
    found = []
    if config.embed.enabled and config.embed.weights == "random":
        found.append(f"embed ({config.embed.model})")
    if config.perceive.enabled:
        found += [f"expert {spec.instance}" for spec, expert, _ in plan_experts(config.perceive) if expert.untrained()]
    clip = config.qa.clip
    if config.fuse.enabled and config.qa.enabled and clip is not None and clip.weights == "random":
        found.append(f"qa.clip ({clip.model})")
    return found


def plugin_stage(spec: StageSpec, where: str) -> StageRun:
    """A stage from a plugin package, its options and resources checked against its own models."""
    if spec.plugin in FLOW:
        raise ConfigError(f"{where}.plugin: {spec.plugin!r} is a built-in phase; set it up in its own section")
    cls = load_plugin(STAGES, spec.plugin, Stage)
    options, resources = configure(cls, spec, where)
    return StageRun(
        cls(options),
        spec.instance,
        resources,
        on_error=spec.on_error,
        max_error_rate=spec.max_error_rate,
        group=spec.group,
    )


def describe_plugins() -> list[dict[str, str]]:
    """Name, kind, resources and package of every installed expert and stage (built-in phases
    included), for `denseforge experts`."""
    rows = []
    for group, base, found in ((EXPERTS, Expert, entries(EXPERTS)), (STAGES, Stage, phases() | entries(STAGES))):
        for name, entry in found.items():
            try:
                cls = load_entry(group, entry, base)
                r = cls.default_resources
                if base is Expert:
                    kind = cls.kind
                    consumes = (
                        ",".join(cls.consumes) or "-" if isinstance(cls.consumes, tuple) else "depends on options"
                    )
                else:
                    kind, consumes = ("phase" if name in FLOW else "stage"), "-"
                resources = (
                    "its config section's"
                    if kind == "phase"
                    else f"gpus={r.num_gpus} cpus={r.num_cpus} batch={r.batch_size} x{r.concurrency or 'tasks'}"
                )
                rows.append(
                    {"name": name, "kind": kind, "consumes": consumes, "resources": resources, "package": entry.package}
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
