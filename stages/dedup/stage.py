"""The stage that applies dedup's finished decisions to each unit's samples."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from upath import UPath

from denseforge.stages.stage import Flow, Item, Rejection, Removal, Stage, StageRun, Verdict


class DecisionStage(Stage):
    """Applies dedup's decisions: removed samples name what they duplicate, kept ones get their
    cluster, and images the embed pass failed on become reject rows with its reason."""

    name = "dedup"

    def __init__(self, decisions: UPath | Path, embed_rejects: Callable[[int], UPath]):
        super().__init__()
        self.decisions, self.embed_rejects = decisions, embed_rejects

    @classmethod
    def plan(cls, flow: Flow) -> list[StageRun]:
        return [StageRun.light(cls(flow.decisions, flow.embed_rejects))] if flow.config.dedup.enabled else []

    def _unit(self, unit: int) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        from denseforge.storage import read_parquet

        decided = {r["key"]: r for r in read_parquet(self.decisions, filters=[("unit", "=", unit)]).to_pylist()}
        failed_file = self.embed_rejects(unit)
        failed = {r["key"]: r for r in read_parquet(failed_file).to_pylist()} if failed_file.exists() else {}
        return decided, failed

    def process(self, batch: list[Item]) -> list[Verdict]:
        units = {unit: self._unit(unit) for unit in sorted({item.unit for item in batch})}
        verdicts: list[Verdict] = []
        for item in batch:
            decided, failed = units[item.unit]
            if item.key in failed:
                verdicts.append(Rejection(failed[item.key]["reason"], failed[item.key]["detail"], "embed"))
                continue
            decision = decided.get(item.key)
            if decision is None:
                raise LookupError(f"sample {item.key} has no dedup decision; delete {self.decisions.parent} and resume")
            if decision["reason"]:
                verdicts.append(Removal(decision["reason"], decision["dup_of"], decision["cluster"]))
            else:
                item.sample.cluster = decision["cluster"]
                verdicts.append(None)
        return verdicts
