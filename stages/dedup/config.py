"""Dedup's and selection's settings, the keep policies and the reasons a row leaves."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from denseforge.plugin import Settings

KeepPolicy = Literal["nearest_centroid", "farthest_centroid", "largest_image", "first_key"]


class DedupConfig(Settings):
    """Exact, perceptual and semantic (SemDeDup) duplicates; needs embed.enabled."""

    enabled: bool = True
    exact: bool = True
    phash_max_distance: int | None = Field(
        12,
        ge=0,
        le=32,
        description="Hamming distance of the 64-bit pHashes (imagededup's default is 10); every "
        "match also needs the second witness below; null disables",
    )
    witness_max_fine_distance: int | None = Field(
        64, ge=0, le=256, description="a pHash match also needs the 256-bit pHashes this close; null: no witness"
    )
    witness_max_colour_difference: float | None = Field(
        0.6,
        ge=0,
        le=2,
        description="...and, when both have colour, their hue histograms this close (L1); null: no check",
    )
    epsilon: float | None = Field(0.05, gt=0, lt=2, description="duplicate when cosine > 1 - epsilon; null disables")
    sweep: list[float] = Field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1, 0.2, 0.4])
    clusters: int | None = Field(None, ge=1, description="k for k-means; null derives it from N")
    target_cluster_size: int = Field(1000, ge=1)
    kmeans_iters: int = Field(
        10,
        ge=1,
        description="k-means iterations; border rows make up for the rougher centroids of few "
        "iterations (docs/benchmarks.md: bench dedup)",
    )
    max_points_per_centroid: int = Field(
        256, ge=1, description="k-means trains on at most k x this many points (FAISS default)"
    )
    max_train_points: int = Field(
        65536,
        ge=1,
        description="...and on at most this many: training costs points x k, "
        "so a fixed sample keeps it linear in N (border rows recover the recall)",
    )
    border: float = Field(
        0.05,
        ge=0,
        le=2,
        description="a row is also deduplicated in the clusters whose centroid is "
        "within this cosine of its nearest (see border_clusters); 0: nearest only. Exact and pHash "
        "copies are only compared inside a cluster too: at 0.02 the demo lost a pHash copy whose "
        "random-weight embedding sat 0.02-0.05 across a boundary",
    )
    border_clusters: int = Field(
        2,
        ge=0,
        le=8,
        description="at most this many such clusters per row (and as many "
        "coarse cells above 4,096 clusters): more finds more near-copies that straddle a border, "
        "at the cost of more entries per row (docs/benchmarks.md: bench dedup)",
    )
    keep: KeepPolicy = "nearest_centroid"
    block_size: int = Field(2048, ge=16)
    matmul: Literal["auto", "bfloat16", "float32"] = Field(
        "auto",
        description="bfloat16: similarities first in bfloat16 (torch), every row near 1 - epsilon "
        "recomputed in float32, so decisions are float32's; the sweep's other values are then counted on "
        "bfloat16 similarities (within ~0.012); auto: bfloat16 where the CPU has bfloat16 instructions and a "
        "task's clusters are large enough to pay for importing torch (see use_bf16)",
    )
    buckets: int = Field(16, ge=1, description="parallel dedup tasks (clusters are hashed into buckets)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs for k-means training (faiss-gpu)")

    @model_validator(mode="after")
    def _sweep_in_range(self) -> DedupConfig:
        if any(not 0 < e < 2 for e in self.sweep):
            raise ValueError("dedup.sweep values must lie in (0, 2)")
        return self


class SelectConfig(Settings):
    """Prefilters and cluster-balanced selection (after dedup)."""

    min_short_edge: int = Field(0, ge=0, description="px, on the original image (DenseFusion: 448)")
    max_aspect_ratio: float | None = Field(None, ge=1)
    per_cluster: int | None = Field(None, ge=1, description="top n per cluster (DenseFusion: 20)")
    target_total: int | None = Field(None, ge=1, description="cluster-balanced down to this many")


KEPT = ""


EXACT, NEAR, SEMANTIC = "exact_duplicate", "near_duplicate", "semantic_duplicate"


TOO_SMALL, BAD_ASPECT, NOT_SELECTED = "too_small", "bad_aspect_ratio", "not_selected"
