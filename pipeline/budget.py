"""The error budget: per stage, the share of items it failed on, checked as units finish.

Counts come from the units' completion markers (so a resumed run carries its history). A stage
past its `max_error_rate` after `run.error_rate_min_items` items fails the run; a stage that
failed on every item it was given fails it at the end whatever the counts (a dead expert on a
20-image run must not pass).
"""

from __future__ import annotations

from collections import Counter

from denseforge.errors import StageFailedError
from denseforge.pipeline.accounting import StageCounts, failures, merge_counts
from denseforge.pipeline.adapter import StageRun
from denseforge.pipeline.rundir import RunDir
from denseforge.stages.ingest import classify_failure


class ErrorBudget:
    def __init__(self, runs: list[StageRun], min_items: int):
        self.limits = {r.instance: r.max_error_rate for r in runs}
        self.min_items = min_items
        self.totals: dict[str, StageCounts] = {}

    def load(self, rd: RunDir, units: int) -> None:
        """Start from the counts of the units earlier invocations finished."""
        for phase in ("embed", "write"):
            for unit, counts in rd.marker_counts(phase):
                if unit < units:
                    self.add(counts.get("stages", {}))

    def add(self, counts: dict[str, StageCounts]) -> None:
        merge_counts(self.totals, counts)

    def check(self, final: bool = False) -> None:
        """Raise StageFailedError for the first stage over its budget (or dead, when final)."""
        for stage, c in self.totals.items():
            failed, items = failures(c), c["items"]
            if not failed:
                continue
            limit = self.limits.get(stage)
            over = limit is not None and items >= self.min_items and failed / items > limit
            if over or (final and failed == items):
                why = (
                    f"failed on {failed} of {items} items ({failed / items:.0%}, max_error_rate {limit})"
                    if over
                    else f"failed on every item it was given ({items})"
                )
                raise StageFailedError(stage, f"stage {stage!r} {why}; first error: {c['first_error']}")


def check_ingest(rd: RunDir, max_error_rate: float, min_items: int) -> None:
    """Fail the run when too many downloaded rows gave no image: past `ingest.max_error_rate` after
    `min_items` rows, or every row (units that failed as a whole count apart: exit 3)."""
    rows = images = 0
    reasons: Counter[str] = Counter()
    for _, counts in rd.marker_counts("ingest"):
        rows += counts.get("count", 0)
        images += counts.get("successes", 0)
        for message, n in counts.get("status_dict", {}).items():
            if message != "success":
                reasons[classify_failure("failed_to_download", message)] += n
    failed = rows - images
    if not rows or not failed:
        return
    if failed == rows or (rows >= min_items and failed / rows > max_error_rate):
        common = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common(3))
        raise StageFailedError(
            "ingest",
            f"ingest: {failed} of {rows} rows ({failed / rows:.0%}) gave no image (most often: {common}); "
            f"ingest.max_error_rate is {max_error_rate}. Check the URLs and the network, or raise "
            "ingest.max_error_rate for an old URL list",
        )
