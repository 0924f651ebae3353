import json

import pytest

from denseforge.pipeline.accounting import TraceEntry, count_traces, failures, merge_counts


def test_a_trace_entry_round_trips_through_its_short_json_keys():
    entry = TraceEntry(0.25, "node-a", failed="ValueError", message="bad", counters={"boxes_clipped": 2})
    assert entry.to_json() == {"s": 0.25, "n": "node-a", "f": "ValueError", "m": "bad", "c": {"boxes_clipped": 2}}
    assert TraceEntry.from_json(entry.to_json()) == entry
    assert TraceEntry(0.5, "n").to_json() == {"s": 0.5, "n": "n"}


def test_stage_counts_sum_the_entries_of_every_row_and_merge_across_units():
    rows = [
        {"qa": TraceEntry(0.1, "a").to_json()},
        {"qa": TraceEntry(0.2, "a", rejected="too_short").to_json()},
        {"qa": TraceEntry(0.3, "b", failed="KeyError", message="first").to_json()},
        {
            "qa": TraceEntry(0.4, "b", failed="KeyError", message="second").to_json(),
            "dedup": TraceEntry(0.0, "b", removed="exact").to_json(),
        },
    ]
    counts = count_traces([json.dumps(r) for r in rows] + [None])
    qa = counts["qa"]
    assert (qa["items"], qa["rejected"], qa["failed"], qa["first_error"]) == (
        4,
        {"too_short": 1},
        {"KeyError": 2},
        "first",
    )
    assert qa["nodes"] == {"a": {"items": 2, "busy_s": 0.3}, "b": {"items": 2, "busy_s": 0.7}} and qa["busy_s"] == 1.0
    assert counts["dedup"]["removed"] == 1 and failures(qa) == 2
    total: dict = {}
    merge_counts(total, counts)
    merge_counts(total, counts)
    assert (
        total["qa"]["items"] == 8
        and total["qa"]["failed"] == {"KeyError": 4}
        and total["qa"]["nodes"]["b"]["items"] == 4
    )


def test_the_ingest_budget_fails_past_its_rate_after_enough_rows_or_when_nothing_downloaded(tmp_path):
    from denseforge.errors import StageFailedError
    from denseforge.pipeline.budget import check_ingest
    from denseforge.pipeline.rundir import RunDir
    from denseforge.storage import write_json_atomic

    rd = RunDir(tmp_path)
    rd.raw.mkdir(parents=True)

    def units(*pairs):
        for unit, (rows, images) in enumerate(pairs):
            status = {"success": images, "HTTP Error 404: Not Found": rows - images}
            write_json_atomic(rd.ingest_marker(unit), {"count": rows, "successes": images, "status_dict": status})

    units((10, 1), (10, 1))  # 90 % of 20 rows gave no image: past 0.8
    with pytest.raises(
        StageFailedError, match=r"ingest: 18 of 20 rows \(90%\) gave no image \(most often: http_404 18\)"
    ):
        check_ingest(rd, 0.8, 20)
    check_ingest(rd, 0.95, 20)  # within a raised budget
    check_ingest(rd, 0.8, 21)  # too few rows to judge a rate
    units((10, 0), (10, 0))  # ... but nothing at all is never within budget
    with pytest.raises(StageFailedError, match="20 of 20 rows"):
        check_ingest(rd, 1.0, 1000)
    write_json_atomic(rd.ingest_marker(2), {"unit": 2, "failed": "worker died", "count": 0})
    units((10, 10), (10, 10))  # a unit that failed as a whole is counted apart (exit 3), not here
    check_ingest(rd, 0.0, 1)
