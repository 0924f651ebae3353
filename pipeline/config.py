"""The run configuration: one YAML file validated by pydantic before anything runs.

Unknown keys and bad values fail with the key path and what was expected. `--set a.b=c` overrides
any key (the value is parsed as YAML, so `--set ingest.threads=8` gives an int).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from denseforge.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    name: str = "denseforge"
    seed: int = 0


class RayConfig(_Section):
    address: str | None = Field(None, description="None starts an embedded local cluster")
    num_cpus: int | None = Field(None, ge=1, description="local cluster only; None = all cores")
    object_store_memory: int | None = Field(None, ge=75 * 2**20, description="bytes, local only")


class InputConfig(_Section):
    kind: Literal["table", "folder", "webdataset"] = "table"
    path: str | None = Field(None, description="file, directory or glob; the demo makes its own")
    format: Literal["auto", "parquet", "csv", "jsonl"] = "auto"
    url_col: str = "url"
    caption_col: str | None = "caption"
    keep_cols: list[str] | None = Field(
        None, description="extra source columns carried into the sample JSON; None = all"
    )


class IngestConfig(_Section):
    processes: int = Field(2, ge=1, description="input shards downloaded at once (Ray tasks)")
    threads: int = Field(32, ge=1, le=1024, description="download threads per shard")
    timeout_s: float = Field(10.0, gt=0)
    retries: int = Field(0, ge=0, le=10)
    shard_retries: int = Field(2, ge=0, le=10, description="re-runs of a shard whose task died")
    image_size: int = Field(512, ge=16, le=16384)
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop"] = "keep_ratio"
    resize_only_if_bigger: bool = True
    min_image_size: int = Field(0, ge=0, description="reject if the short edge is smaller (px)")
    max_aspect_ratio: float = Field(10.0, ge=1.0)
    max_image_pixels: int = Field(
        89_478_485, ge=1, description="decoded pixel count above which an image is a bomb"
    )
    max_download_bytes: int = Field(32 * 2**20, ge=1024)
    encode_quality: int = Field(95, ge=1, le=100)
    allow_private_addresses: bool = Field(
        False, description="allow loopback/private/link-local targets (local mirrors, the demo)"
    )
    user_agent_token: str | None = "denseforge"


class EmbedConfig(_Section):
    """open_clip image embeddings for deduplication and selection."""

    enabled: bool = True
    model: str = "ViT-B-32"
    pretrained: str | None = "laion2b_s34b_b79k"
    checkpoint: str | None = Field(None, description="local weights file; wins over pretrained")
    weights: Literal["pretrained", "random"] = Field(
        "pretrained", description="random: an untrained architecture, for offline tests and the demo only")
    batch_size: int = Field(64, ge=1, le=4096)
    concurrency: int = Field(1, ge=1, description="embedding actors")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor (fractions share one GPU)")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class DedupConfig(_Section):
    """Exact, perceptual and semantic (SemDeDup) duplicates; needs embed.enabled."""

    enabled: bool = True
    exact: bool = True
    phash_max_distance: int | None = Field(4, ge=0, le=32, description="Hamming distance; null disables")
    epsilon: float | None = Field(0.05, gt=0, lt=2, description="duplicate when cosine > 1 - epsilon; null disables")
    sweep: list[float] = Field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1, 0.2, 0.4])
    clusters: int | None = Field(None, ge=1, description="k for k-means; null derives it from N")
    target_cluster_size: int = Field(1000, ge=1)
    kmeans_iters: int = Field(20, ge=1)
    max_points_per_centroid: int = Field(256, ge=1, description="k-means trains on at most k x this many points (FAISS default)")
    keep: Literal["nearest_centroid", "farthest_centroid", "largest_image", "first_key"] = "nearest_centroid"
    block_size: int = Field(2048, ge=16)
    buckets: int = Field(16, ge=1, description="parallel dedup tasks (clusters are hashed into buckets)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs for k-means training (faiss-gpu)")

    @model_validator(mode="after")
    def _sweep_in_range(self) -> "DedupConfig":
        if any(not 0 < e < 2 for e in self.sweep):
            raise ValueError("dedup.sweep values must lie in (0, 2)")
        return self


class SelectConfig(_Section):
    """Prefilters and cluster-balanced selection (after dedup)."""

    min_short_edge: int = Field(0, ge=0, description="px, on the original image (DenseFusion: 448)")
    max_aspect_ratio: float | None = Field(None, ge=1)
    per_cluster: int | None = Field(None, ge=1, description="top n per cluster (DenseFusion: 20)")
    target_total: int | None = Field(None, ge=1, description="cluster-balanced down to this many")


class ExpertSpec(_Section):
    """One expert instance: a plugin, its options (checked against the plugin's own model), resources."""

    plugin: str
    name: str | None = Field(None, description="instance name; defaults to the plugin name")
    options: dict[str, Any] = Field(default_factory=dict)
    resources: dict[str, Any] = Field(default_factory=dict, description="num_gpus, num_cpus, batch_size, concurrency")
    score_threshold: float = Field(0.0, ge=0, le=1, description="boxes below it are ignored when detectors merge")

    @property
    def instance(self) -> str:
        return self.name or self.plugin


class PerceiveConfig(_Section):
    enabled: bool = False
    experts: list[ExpertSpec] = Field(default_factory=list)
    on_error: Literal["keep", "reject"] = Field(
        "keep", description="an expert failing on an image: keep the sample (error recorded) or reject it")
    merge_iou: float = Field(0.65, gt=0, le=1, description="IoU at which boxes of several detectors agree")
    merge_min_votes: int = Field(1, ge=1, description="detectors that must agree on a box (GranD: 2)")

    @model_validator(mode="after")
    def _unique_names(self) -> "PerceiveConfig":
        names = [e.instance for e in self.experts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"perceive.experts: instance names must be unique, repeated: {', '.join(dupes)}")
        if self.enabled and not self.experts:
            raise ValueError("perceive.enabled needs at least one entry in perceive.experts")
        return self


class OpenAIBackendConfig(_Section):
    base_url: str = Field("http://127.0.0.1:8000/v1", description="an OpenAI-compatible server (vLLM, SGLang, ...)")
    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the key ('EMPTY' if unset)")
    max_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.2, ge=0, le=2)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(5, ge=0, description="retries with backoff on 429/5xx/connection errors")
    concurrency: int = Field(8, ge=1, description="requests in flight per captioner actor")


class TransformersBackendConfig(_Section):
    model: str = Field("Qwen/Qwen2.5-VL-7B-Instruct", description="hub name or local folder (model + processor)")
    max_new_tokens: int = Field(320, ge=1)
    batch_size: int = Field(4, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class FuseConfig(_Section):
    enabled: bool = False
    backend: Literal["template", "openai", "transformers"] = "template"
    prompt_file: str | None = Field(None, description="template with $word_limit and $perception; None = built-in")
    word_limit: int = Field(192, ge=10)
    grounding: Literal["mentions", "markup"] = Field(
        "mentions", description="markup: the model marks phrases <ref id=N>..</ref>; mentions: found afterwards")
    ground_aliases: str | None = Field(
        "builtin:aliases", description="fine-grained name -> detector label TSV for knowledge-aligned grounding")
    region_top_k: int = Field(0, ge=0, description="region captions for this many salient boxes (0: none)")
    region_views: int = Field(3, ge=1, le=11, description="DynRefer views per region, the tight crop included")
    openai: OpenAIBackendConfig = OpenAIBackendConfig()
    transformers: TransformersBackendConfig = TransformersBackendConfig()
    concurrency: int = Field(1, ge=1, description="captioner actors")
    num_cpus: float = Field(0.25, gt=0)
    num_gpus: float = Field(0.0, ge=0, description="GPUs per captioner actor (transformers backend)")


class QaConfig(_Section):
    enabled: bool = True
    min_words: int = Field(5, ge=0)
    max_words: int = Field(400, ge=1)
    max_repetition: float = Field(0.3, ge=0, le=1)
    max_hallucination: float = Field(0.5, ge=0, le=1)
    min_ocr_fidelity: float = Field(0.5, ge=0, le=1)
    ocr_min_score: float = Field(0.8, ge=0, le=1)
    vocabulary: str = Field("builtin:objects", description="nouns the hallucination check looks for")
    clip_model: str | None = Field(None, description="open_clip model for the image-text score; None: no score")
    clip_pretrained: str | None = "laion2b_s34b_b79k"
    clip_weights: Literal["pretrained", "random"] = "pretrained"
    min_clip_score: float | None = Field(None, ge=-1, le=1, description="reject below this CLIP cosine")
    clip_num_gpus: float = Field(0.0, ge=0)


class OutputConfig(_Section):
    samples_per_shard: int = Field(1000, ge=1, le=99_999)


class DemoConfig(_Section):
    """The offline demo: the run serves its own sample corpus on a loopback HTTP server."""

    enabled: bool = False
    copies: int = Field(2, ge=1, le=100, description="variants generated per bundled photo")
    include_broken: bool = Field(True, description="add a dead link, a 500, HTML and a truncated JPEG")


class Config(_Section):
    run: RunConfig = RunConfig()
    ray: RayConfig = RayConfig()
    input: InputConfig = InputConfig()
    ingest: IngestConfig = IngestConfig()
    embed: EmbedConfig = EmbedConfig()
    dedup: DedupConfig = DedupConfig()
    select: SelectConfig = SelectConfig()
    perceive: PerceiveConfig = PerceiveConfig()
    fuse: FuseConfig = FuseConfig()
    qa: QaConfig = QaConfig()
    output: OutputConfig = OutputConfig()
    demo: DemoConfig = DemoConfig()

    @model_validator(mode="after")
    def _demo_needs_loopback(self) -> "Config":
        if self.demo.enabled and not self.ingest.allow_private_addresses:
            raise ValueError(
                "demo.enabled serves images on 127.0.0.1; set ingest.allow_private_addresses: true"
            )
        if self.dedup.enabled and not self.embed.enabled:
            raise ValueError("dedup.enabled needs embed.enabled (semantic dedup works on embeddings)")
        chosen = self.select.model_dump(exclude_defaults=True)
        if chosen and not self.dedup.enabled:
            raise ValueError(f"select.{next(iter(chosen))} needs dedup.enabled (selection works on its clusters)")
        if not self.demo.enabled and self.input.path is None:
            raise ValueError("input.path is required (a table file, folder or shard glob)")
        return self


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"  {path}: required key is missing")
        else:
            got = e.get("input")
            shown = repr(got) if not isinstance(got, dict) else "a mapping"
            lines.append(f"  {path}: {e['msg']} (got {shown})")
    return "\n".join(lines)


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
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {dotted}: value {raw!r} is not valid YAML: {exc}") from exc
        node = data
        for i, k in enumerate(keys[:-1]):
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {dotted}: {'.'.join(keys[: i + 1])} is not a mapping")
            node = child
        node[keys[-1]] = value
    return data


def parse_config(data: Any, source: str = "<config>") -> Config:
    """Validate a mapping into a Config, raising ConfigError naming each bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply overrides, validate; a relative input path resolves against the cwd."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    config = parse_config(data, str(path))
    if config.input.path and "://" not in config.input.path:
        config.input.path = str(Path(config.input.path).expanduser().resolve())
    return config


def dump_config(config: Config) -> str:
    """The resolved config as YAML, as saved in the run directory."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
