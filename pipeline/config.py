"""The run configuration: one YAML file validated by pydantic before anything runs.

The sections are the stages' own settings models (`IngestConfig`, `EmbedConfig`, `QaConfig`, ...
live beside the code that reads them); this module composes them.

Unknown keys and bad values fail with the key path and what was expected. `--set a.b=c` overrides
any key (the value is parsed as YAML, so `--set ingest.threads=8` gives an int).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator
from upath import UPath

from denseforge.errors import ConfigError, shorten
from denseforge.plugin import PluginSpec, Settings
from denseforge.stages.dedup import DedupConfig, SelectConfig
from denseforge.stages.embed import EmbedConfig
from denseforge.stages.fuse import FuseConfig
from denseforge.stages.ground import GroundConfig
from denseforge.stages.ingest import IngestConfig
from denseforge.stages.perceive import PerceiveConfig
from denseforge.stages.qa import QaConfig
from denseforge.stages.stage import RUN_OPTIONS


class RunConfig(Settings):
    name: str = "denseforge"
    seed: int = Field(0, description="seeds k-means, sampling and random-weight models")
    error_rate_min_items: int = Field(
        20, ge=1, description="items a stage must have seen before its max_error_rate can fail the run"
    )


class RayConfig(Settings):
    address: str | None = Field(None, description="None starts an embedded local cluster")
    num_cpus: int | None = Field(None, ge=1, description="local cluster only; None = all cores")
    object_store_memory: int | None = Field(None, ge=75 * 2**20, description="bytes, local only")
    connect_timeout_s: float = Field(30.0, gt=0, description="how long to wait for --address to answer")
    node_loss_timeout_s: float = Field(
        300.0, gt=0, description="after a node is lost, how long the run may make no progress before it fails"
    )


class StorageConfig(Settings):
    """Where a run's files live: `--out` and `input.path` take local paths and s3://, gs://,
    az:// or abfs:// URLs. Credentials come from the store's standard chain (AWS_*, profiles,
    AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*)."""

    options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options (endpoint_url, region, profile, ...); a secret "
        "only as ${ENV_VAR}, never literally",
    )
    scratch: str | None = Field(
        None,
        description="node-local folder for temporaries (DENSEFORGE_SCRATCH "
        "overrides it per node); null: the system's temp dir",
    )
    shared_local: bool = Field(
        False,
        description="a local --out is on a disk every Ray node mounts at the same "
        "path (NFS, Lustre): allow it on a multi-node cluster",
    )

    @model_validator(mode="after")
    def _no_secrets(self) -> StorageConfig:
        from denseforge.storage import check_options

        check_options(self.options)
        return self


class CacheConfig(Settings):
    """The cache of model stages' outputs (experts, the captioner, CLIP scores): an output is
    reused wherever the stage's settings and what it read are the same, by a resume, a run derived
    with `--from`, or any run given the same `path`."""

    enabled: bool = True
    path: str | None = Field(
        None, description="a folder or object-store URL several runs may share; null: the run's cache/ folder"
    )
    max_gb: float | None = Field(
        None, gt=0, description="after a run, the least recently used entries beyond this are deleted; null: no bound"
    )


class InputConfig(Settings):
    kind: Literal["table", "folder", "webdataset"] = "table"
    path: str | None = Field(None, description="file, directory or glob; the demo makes its own")
    format: Literal["auto", "parquet", "csv", "jsonl"] = "auto"
    url_col: str = "url"
    caption_col: str | None = "caption"
    keep_cols: list[str] | None = Field(
        None, description="extra source columns carried into the sample JSON; None = all"
    )
    follow_symlinks: bool = Field(False, description="folder input: read links that lead outside the folder")
    limit: int | None = Field(
        None, ge=1, description="tables and folders: read only the first N rows (a pilot, `denseforge plan`)"
    )


class StageSpec(PluginSpec):
    """A stage from a plugin package (entry-point group `denseforge.stages`) placed in the flow."""

    after: str | None = Field(
        None,
        description="run after this stage (dedup, merge, fuse, ground, qa, an expert "
        "instance or another plugin stage); null: last, before write",
    )
    on_error: Literal["reject", "keep"] = "reject"


class OutputConfig(Settings):
    samples_per_shard: int = Field(1000, ge=1, le=99_999)


class DemoConfig(Settings):
    """The offline demo: the run serves its own sample corpus on a loopback HTTP server."""

    enabled: bool = False
    copies: int = Field(2, ge=1, le=100, description="variants generated per bundled photo")
    include_broken: bool = Field(True, description="add a dead link, a 500, HTML and a truncated JPEG")


class Config(Settings):
    run: RunConfig = RunConfig()
    ray: RayConfig = RayConfig()
    storage: StorageConfig = StorageConfig()
    cache: CacheConfig = CacheConfig()
    input: InputConfig = InputConfig()
    ingest: IngestConfig = IngestConfig()
    embed: EmbedConfig = EmbedConfig()
    dedup: DedupConfig = DedupConfig()
    select: SelectConfig = SelectConfig()
    perceive: PerceiveConfig = PerceiveConfig()
    fuse: FuseConfig = FuseConfig()
    ground: GroundConfig = GroundConfig()
    qa: QaConfig = QaConfig()
    stages: list[StageSpec] = Field(default_factory=list, description="plugin stages (entry points denseforge.stages)")
    output: OutputConfig = OutputConfig()
    demo: DemoConfig = DemoConfig()

    @model_validator(mode="after")
    def _demo_needs_loopback(self) -> Config:
        if self.demo.enabled and not self.ingest.allow_private_addresses:
            raise ValueError("demo.enabled serves images on 127.0.0.1; set ingest.allow_private_addresses: true")
        if self.dedup.enabled and not self.embed.enabled:
            raise ValueError("dedup.enabled needs embed.enabled (semantic dedup works on embeddings)")
        chosen = self.select.model_dump(exclude_defaults=True)
        if chosen and not self.dedup.enabled:
            raise ValueError(f"select.{next(iter(chosen))} needs dedup.enabled (selection works on its clusters)")
        if not self.demo.enabled and self.input.path is None:
            raise ValueError("input.path is required (a table file, folder or shard glob)")
        return self


def _meant(loc: tuple[Any, ...]) -> str | None:
    """The key an unknown one was probably meant to be: the closest name beside it."""
    import difflib

    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        model = _model_of(field.annotation) if field is not None else None
        if model is None:
            return None
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return ".".join([*map(str, loc[:-1]), close[0]]) if close else None


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            meant = _meant(e["loc"])
            lines.append(f"  {path}: unknown key" + (f" (did you mean {meant}?)" if meant else ""))
        elif e["type"] == "missing":
            lines.append(f"  {path}: required key is missing")
        else:
            got = e.get("input")
            shown = shorten(got) if not isinstance(got, dict) else "a mapping"
            lines.append(f"  {path}: {e['msg']} (got {shown})")
    return "\n".join(lines)


# More values than any real config holds: YAML aliases that expand past it are refused at load time
# (nine levels of nine aliases are 9**9 values that a validator or a dump would walk).
MAX_VALUES = 100_000


def check_size(data: Any, source: str) -> Any:
    """`data` as loaded, refused when its aliases expand to more than MAX_VALUES values (counted
    through shared nodes once each, so the check itself stays cheap)."""
    sizes: dict[int, int] = {}

    def size(node: Any) -> int:
        if not isinstance(node, dict | list):
            return 1
        if id(node) not in sizes:
            sizes[id(node)] = 0  # a node that contains itself counts once
            children = node.values() if isinstance(node, dict) else node
            total = 1
            for child in children:
                total += size(child)
                if total > MAX_VALUES:
                    break
            sizes[id(node)] = total
        return sizes[id(node)]

    if size(data) > MAX_VALUES:
        raise ConfigError(
            f"{source}: its YAML aliases expand to more than {MAX_VALUES} values; write the values out instead"
        )
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides to a nested mapping; the value is parsed as YAML."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set ingest.threads=8")
        dotted, raw = item.split("=", 1)
        keys = [k for k in dotted.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = check_size(yaml.safe_load(raw), f"--set {dotted}")
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {dotted}: value {shorten(raw)} is not valid YAML: {exc}") from exc
        node: Any = data
        for i, k in enumerate(keys):
            key: Any = k
            if isinstance(node, list):  # a list entry by its index: perceive.experts.0.resources
                if not (k.isdigit() and int(k) < len(node)):
                    raise ConfigError(
                        f"--set {dotted}: {'.'.join(keys[: i + 1])} - {'.'.join(keys[:i])} is a "
                        f"list of {len(node)}; give an index from 0 to {len(node) - 1}"
                    )
                key = int(k)
            elif not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: {'.'.join(keys[:i])} is not a mapping")
            if i == len(keys) - 1:
                node[key] = value
            else:
                node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]
    return data


def parse_config(data: Any, source: str = "<config>") -> Config:
    """Validate a mapping into a Config, raising ConfigError naming each bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path | UPath, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply overrides, validate; a relative input path resolves against the cwd."""
    from denseforge.storage import location

    where = location(path)
    try:
        text = where.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {where}: {exc.strerror}") from None
    try:
        data = check_size(yaml.safe_load(text), str(where)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    config = parse_config(data, str(where))
    if config.input.path and "://" not in config.input.path:
        config.input.path = str(Path(config.input.path).expanduser().resolve())
    return config


def dump_config(config: Config) -> str:
    """The resolved config as YAML, as saved in the run directory."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# Settings that change how a run goes, not what it writes: a resume may change them freely.
HOW_KEYS = re.compile(
    rf"^(ray|storage|cache)\.|^run\.(name|error_rate_min_items)$|\.({RUN_OPTIONS})$"
    r"|^ingest\.(processes|threads|download_deadline_s|retries|unit_retries|user_agent_token)$|^embed\.cpu_workers$"
)


def data_settings(config: Config) -> dict[str, Any]:
    """Every setting that decides what a run writes, by dotted key (a list of plugin entries is one
    value, without their resources and error budgets)."""
    found: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else k)
        elif not HOW_KEYS.search(key):
            if isinstance(value, list) and value and all(isinstance(v, dict) and "plugin" in v for v in value):
                value = [
                    {k: v for k, v in entry.items() if k not in ("resources", "max_error_rate")} for entry in value
                ]
            found[key] = value

    walk(config.model_dump(mode="json"), "")
    return found


def changed_settings(before: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """key: (before, now) for every data setting that differs."""
    return {k: (before.get(k), now.get(k)) for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)}


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if getattr(annotation, "__args__", None) is None else None
    text = text or str(annotation)
    return re.sub(r"\b(typing|pathlib|denseforge\.[\w.]+)\.", "", text).replace("NoneType", "None").replace("|", "\\|")


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The settings model a field holds: itself, or a list's items (`perceive.experts[]`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows, nested = [], []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        inner = _model_of(field.annotation)
        if inner is not None:
            nested.append((f"{key}[]." if "list" in str(field.annotation) else f"{key}.", inner))
            continue
        default = "(required)" if field.is_required() else field.get_default(call_default_factory=True)
        shown = json.dumps(default, default=str) if not isinstance(default, str) or default != "(required)" else default
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{key}` | {_type_name(field.annotation)} | `{shown}` | {description} |")
    for sub, inner in nested:
        rows += _rows(inner, sub)
    return rows


def reference() -> str:
    """docs/configuration.md: every key of a run's config with its type, default and description,
    made from the settings models themselves (a test fails when the page is stale)."""
    out = [
        "# Configuration reference",
        "",
        "Every key of a run's YAML config (`--set KEY=VALUE` overrides any of them). Generated from the "
        'settings models: `python -c "from denseforge.pipeline.config import reference; '
        "print(reference(), end='')\" > docs/configuration.md`.",
        "",
    ]
    for name, field in Config.model_fields.items():
        model = _model_of(field.annotation)
        out += [f"## {name}", ""]
        doc = (model.__doc__ or "").strip() if model is not None else ""
        if doc and not doc.startswith(("Usage docs", "!!!")):
            out += [" ".join(doc.split()), ""]
        out += [
            "| key | type | default | description |",
            "|---|---|---|---|",
            *(_rows(model, f"{name}.") if model is not None else []),
            "",
        ]
    return "\n".join(out)
