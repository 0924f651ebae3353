"""The one adapter, without Ray: rows in, rows out; isolation, policies, traces, the error budget."""

from __future__ import annotations

import json
import pickle

import pyarrow as pa
import pytest
from PIL import Image

from denseforge.errors import StageFailedError
from denseforge.experts.base import Expert, Resources
from denseforge.pipeline.accounting import count_traces, merge_counts
from denseforge.pipeline.adapter import (
    ROW_SCHEMA,
    StageRun,
    StageWorker,
    Step,
    add_stages,
    call_isolated,
    chains,
    run_stage_task,
)
from denseforge.pipeline.budget import ErrorBudget
from denseforge.stages.perceive import ExpertStage, MergeStage, PerceiveConfig
from denseforge.stages.sample import Reject, Sample
from denseforge.stages.stage import Item, Rejection, Removal, Stage

from ..conftest import jpeg_bytes


def _rows(n: int, dead: int = 0) -> pa.Table:
    image = jpeg_bytes(Image.new("RGB", (16, 12), "red"))
    rows = []
    for i in range(n):
        sample = Sample(key=f"k{i}", url=f"http://x/{i}", width=16, height=12, sha256="0")
        rows.append(
            {
                "unit": 0,
                "unit_rows": n + dead,
                "key": sample.key,
                "image": image,
                "sample": sample.model_dump_json(),
                "reject": None,
                "removed": None,
                "trace": None,
                "outputs": None,
            }
        )
    for i in range(dead):
        reject = Reject(key=f"d{i}", stage="ingest", reason="http_404")
        rows.append(
            {
                "unit": 0,
                "unit_rows": n + dead,
                "key": reject.key,
                "image": None,
                "sample": None,
                "reject": reject.model_dump_json(),
                "removed": None,
                "trace": None,
                "outputs": None,
            }
        )
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


class Judge(Stage):
    """Rejects k1, removes k2, fails on k3, tags the rest (and sees decoded images)."""

    name = "judge"

    def process(self, batch: list[Item]):
        self.calls = getattr(self, "calls", []) + [len(batch)]
        if any(item.key == "k3" for item in batch):
            raise ValueError("cannot judge k3")
        verdicts = []
        for item in batch:
            assert item.image.size == (16, 12)
            if item.key == "k1":
                verdicts.append(Rejection("ugly", "too red"))
            elif item.key == "k2":
                verdicts.append(Removal("duplicate", dup_of="k0", cluster=3))
            else:
                item.sample.caption = f"judged {item.key}"
                item.outputs["vector"] = [1.0]
                verdicts.append(None)
        return verdicts


def _run(stage: Stage, table: pa.Table, on_error: str = "reject", batch_size: int = 8) -> list[dict]:
    run = StageRun(stage, stage.name, Resources(batch_size=batch_size, concurrency=None), on_error=on_error)
    return StageWorker(run)(table).to_pylist()


def test_verdicts_become_rows_and_dead_rows_pass_untouched():
    rows = _run(Judge(), _rows(5, dead=1))
    by_key = {r["key"]: r for r in rows}
    assert json.loads(by_key["k0"]["sample"])["caption"] == "judged k0"
    assert pickle.loads(by_key["k0"]["outputs"]) == {"vector": [1.0]}
    reject = Reject.model_validate_json(by_key["k1"]["reject"])
    assert (reject.stage, reject.reason, reject.detail, reject.url) == ("judge", "ugly", "too red", "http://x/1")
    assert by_key["k1"]["sample"] is None and by_key["k1"]["image"] is None
    assert json.loads(by_key["k2"]["removed"]) == {
        "key": "k2",
        "stage": "judge",
        "reason": "duplicate",
        "dup_of": "k0",
        "cluster": 3,
    }
    failed = Reject.model_validate_json(by_key["k3"]["reject"])
    assert (failed.stage, failed.reason, failed.detail) == ("judge", "stage_error", "ValueError: cannot judge k3")
    assert by_key["d0"]["trace"] is None and Reject.model_validate_json(by_key["d0"]["reject"]).reason == "http_404"
    counts = count_traces([r["trace"] for r in rows])["judge"]
    assert counts["items"] == 5 and counts["failed"] == {"ValueError": 1} and counts["rejected"] == {"ugly": 1}
    assert counts["removed"] == 1 and counts["first_error"] == "ValueError: cannot judge k3" and counts["busy_s"] >= 0


def test_keep_policy_records_the_error_on_the_unchanged_sample():
    rows = {r["key"]: r for r in _run(Judge(), _rows(5), on_error="keep")}
    kept = Sample.model_validate_json(rows["k3"]["sample"])
    assert kept.errors == {"judge": "ValueError: cannot judge k3"} and kept.caption is None
    assert rows["k3"]["reject"] is None


def test_a_failing_batch_is_split_down_to_the_failing_item():
    stage = Judge()
    _run(stage, _rows(8), batch_size=8)
    assert stage.calls == [8, 4, 2, 2, 1, 1, 4]  # halves without k3 run once, whole


def test_call_isolated_shrinks_on_out_of_memory_and_flags_wrong_lengths():
    class OutOfMemoryError(RuntimeError):
        pass

    items = [Item(0, Sample(key=f"k{i}", width=1, height=1, sha256="0"), b"") for i in range(8)]
    sizes, shrinks = [], []

    def process(batch):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [None] * len(batch)

    assert call_isolated(process, items, lambda: shrinks.append(1)) == [None] * 8
    assert sizes == [8, 4, 2, 2, 4, 2, 2] and len(shrinks) == 3
    wrong = call_isolated(lambda batch: [None] * (len(batch) + 1), items[:2])
    assert all(isinstance(v, TypeError) and "of length 2 for 1 items" in str(v) for v in wrong)


class MinCaptionWords(Stage):
    """The example from the README: a filter stage in one class, through the public protocol."""

    name = "min-caption-words"

    def process(self, batch):
        return [
            None if len((item.sample.caption or "").split()) >= 2 else Rejection("caption_too_short") for item in batch
        ]


def test_a_new_filter_stage_is_one_class():
    table = pa.Table.from_pylist(_run(Judge(), _rows(5)), schema=ROW_SCHEMA)
    rows = _run(MinCaptionWords(), table)
    # k0 and k4 were captioned "judged kN" (2 words): kept; the judge's rejects/removals pass through
    assert [r["key"] for r in rows if r["sample"]] == ["k0", "k4"]
    assert set(json.loads(rows[0]["trace"])) == {"judge", "min-caption-words"}


class Shouter(Expert):
    name = "shouter"
    kind = "shouts"

    def __call__(self, batch):
        if any(item.image.size[0] < 10 for item in batch):
            raise ValueError("too small")
        return [
            [{"text": "HEY", "box": [-5, 2, 8, 9]}, {"text": "gone", "box": [20, 20, 30, 30]}]
            if item.key != "k1"
            else "not a list"
            for item in batch
        ]


def test_an_expert_runs_as_a_stage_and_its_output_is_validated_per_image():
    rows = {r["key"]: r for r in _run(ExpertStage(Shouter(), "loud"), _rows(3), on_error="keep")}
    sample = Sample.model_validate_json(rows["k0"]["sample"])
    assert sample.experts == {"shouts@loud": [{"text": "HEY", "box": [0.0, 2.0, 8.0, 9.0]}]}
    assert sample.provenance["experts"]["loud"] == {"plugin": "shouter"}
    bad = Sample.model_validate_json(rows["k1"]["sample"])
    assert "invalid output" in bad.errors["loud"] and "shouts@loud" not in bad.experts
    merged = {
        r["key"]: r
        for r in _run(MergeStage(PerceiveConfig()), pa.Table.from_pylist(list(rows.values()), schema=ROW_SCHEMA))
    }
    assert Sample.model_validate_json(merged["k0"]["sample"]).experts == {
        "shouts": [{"text": "HEY", "box": [0.0, 2.0, 8.0, 9.0]}]
    }
    counters = count_traces([r["trace"] for r in rows.values()])["loud"]["counters"]
    assert counters == {"boxes_clipped": 2, "boxes_dropped": 2}  # k0 and k2, each one clipped and one outside


def test_error_budget_fails_past_the_rate_and_on_a_dead_stage():
    runs = [
        StageRun(Judge(), "judge", Resources(), max_error_rate=0.1),
        StageRun(Judge(), "lenient", Resources(), max_error_rate=None),
    ]
    budget = ErrorBudget(runs, min_items=20)
    part = {
        "judge": {
            "items": 10,
            "failed": {"ValueError": 2},
            "rejected": {},
            "removed": 0,
            "busy_s": 1.0,
            "first_error": "ValueError: boom",
        }
    }
    budget.add(part)
    budget.check()  # 10 items < min_items: not judged yet
    budget.add(part)
    with pytest.raises(
        StageFailedError,
        match=r"stage 'judge' failed on 4 of 20 items \(20%, max_error_rate 0.1\); "
        r"first error: ValueError: boom",
    ) as err:
        budget.check()
    assert err.value.stage == "judge" and err.value.exit_code == 1
    dead = ErrorBudget(runs, min_items=20)
    dead.add(
        {
            "lenient": {
                "items": 3,
                "failed": {"OSError": 3},
                "rejected": {},
                "removed": 0,
                "busy_s": 0.0,
                "first_error": "OSError: no model",
            }
        }
    )
    dead.check()  # no rate limit, too few items: only the final check catches a stage that never worked
    with pytest.raises(StageFailedError, match="failed on every item it was given"):
        dead.check(final=True)
    total: dict = {}
    merge_counts(total, part)
    merge_counts(total, part)
    assert total["judge"]["failed"] == {"ValueError": 4} and total["judge"]["busy_s"] == 2.0


def test_merge_keeps_random_weight_experts_out_of_the_evidence_and_says_so():
    table = _rows(1)
    row = table.to_pylist()[0]
    sample = Sample.model_validate_json(row["sample"])
    sample.experts = {
        "tags@tagger": [{"label": "banana", "score": 0.9}],
        "objects@det": [{"label": "dog", "score": 0.8, "box": [0, 0, 5, 5]}],
    }
    row["sample"] = sample.model_dump_json()
    stage = MergeStage(PerceiveConfig(), untrained=frozenset({"tagger"}))
    [out] = _run(stage, pa.Table.from_pylist([row], schema=ROW_SCHEMA))
    merged = Sample.model_validate_json(out["sample"])
    assert merged.experts == {"objects": [{"label": "dog", "score": 0.8, "box": [0, 0, 5, 5]}]}
    assert (
        merged.provenance["experts"]["tagger"]["excluded"]
        == "random weights: 1 observation(s) kept out of the evidence"
    )


class LeavesNumpy(Stage):
    """Puts a numpy scalar (not JSON) into k1's sample; passes the others."""

    name = "leaves-numpy"

    def process(self, batch: list[Item]):
        import numpy as np

        for item in batch:
            if item.key == "k1":
                item.sample.provenance["score"] = np.float32(0.5)
        return [None] * len(batch)


@pytest.mark.parametrize("on_error", ["reject", "keep"])
def test_a_value_that_is_not_json_fails_that_item_not_the_job(on_error):
    """Regression: the sample was serialised outside the isolation, so one numpy scalar left in
    one sample raised inside the Ray task and stopped the run."""
    rows = {r["key"]: r for r in _run(LeavesNumpy(), _rows(3), on_error=on_error)}
    assert json.loads(rows["k0"]["sample"])["key"] == "k0" and json.loads(rows["k2"]["sample"])["key"] == "k2"
    trace = json.loads(rows["k1"]["trace"])["leaves-numpy"]
    assert trace["f"] == "PydanticSerializationError" and "numpy.float32" in trace["m"]
    if on_error == "keep":  # the record as it came in, with why this stage has no output
        kept = Sample.model_validate_json(rows["k1"]["sample"])
        assert "score" not in kept.provenance and "numpy.float32" in kept.errors["leaves-numpy"]
    else:
        assert rows["k1"]["sample"] is None and Reject.model_validate_json(rows["k1"]["reject"]).reason == "stage_error"


def test_a_record_that_does_not_load_back_is_rejected_with_the_reason():
    """A record the stage before wrote but that does not validate (pydantic writes a NaN score as
    null, which a float field refuses) is rejected by the next stage, not raised."""
    table = _rows(2)
    rows = table.to_pylist()
    broken = json.loads(rows[1]["sample"])
    broken["qa"] = {"passed": True, "scores": {"clip": None}}
    rows[1]["sample"] = json.dumps(broken)
    out = {r["key"]: r for r in _run(Judge(), pa.Table.from_pylist(rows, schema=ROW_SCHEMA), on_error="keep")}
    assert json.loads(out["k0"]["sample"])["caption"] == "judged k0"
    reject = Reject.model_validate_json(out["k1"]["reject"])
    assert (reject.stage, reject.reason) == ("judge", "stage_error") and reject.detail.startswith("record unreadable: ")
    assert out["k1"]["sample"] is None and json.loads(out["k1"]["trace"])["judge"]["f"] == "ValidationError"
    assert count_traces([r["trace"] for r in out.values()])["judge"]["failed"] == {"ValidationError": 1}


class Second(Stage):
    """Runs after `Judge` in one worker: notes what it saw, counts per item, fails on k4."""

    name = "second"

    def process(self, batch: list[Item]):
        verdicts = []
        for item in batch:
            item.counts["seen"] = 1
            if item.key == "k4":
                verdicts.append(RuntimeError("second fails on k4"))
                continue
            item.sample.provenance["second_saw"] = {
                "caption": item.sample.caption,
                "errors": dict(item.sample.errors),
                "image_id": id(item.image),
                "judge_image_id": item.outputs.get("image_id"),
            }
            verdicts.append(None)
        return verdicts


class JudgeNotingImages(Judge):
    def process(self, batch: list[Item]):
        for item in batch:
            item.outputs["image_id"] = id(item.image)
        return super().process(batch)


def test_a_group_runs_its_stages_in_one_worker_each_with_its_own_verdicts_and_trace():
    """Two stages in one worker: a record parsed and an image decoded once; the second stage sees
    what the first left (its caption, or with `keep` the sample as it came in plus the error) and
    only the items the first let through; each has its own trace entry, counts and policy."""
    judge = StageRun(
        JudgeNotingImages(), "judge", Resources(batch_size=8, concurrency=None), on_error="keep", group="g"
    )
    second = StageRun(Second(), "second", Resources(batch_size=2, concurrency=None), on_error="reject", group="g")
    rows = {r["key"]: r for r in StageWorker(judge, second)(_rows(6, dead=1)).to_pylist()}
    seen = {k: Sample.model_validate_json(r["sample"]).provenance["second_saw"] for k, r in rows.items() if r["sample"]}
    assert sorted(seen) == ["k0", "k3", "k5"]
    assert seen["k0"]["caption"] == "judged k0" and seen["k0"]["errors"] == {}
    assert seen["k3"] == {**seen["k3"], "caption": None, "errors": {"judge": "ValueError: cannot judge k3"}}
    assert seen["k3"]["judge_image_id"] is None  # the failed stage's outputs were dropped with its changes
    assert seen["k0"]["image_id"] == seen["k0"]["judge_image_id"]  # decoded once for both stages
    assert Reject.model_validate_json(rows["k1"]["reject"]).stage == "judge"
    assert json.loads(rows["k2"]["removed"])["stage"] == "judge"
    assert Reject.model_validate_json(rows["k4"]["reject"]).detail == "RuntimeError: second fails on k4"
    traces = {k: json.loads(r["trace"]) if r["trace"] else {} for k, r in rows.items()}
    assert set(traces["k0"]) == {"judge", "second"} and set(traces["k1"]) == {"judge"} and traces["d0"] == {}
    assert traces["k0"]["second"]["c"] == {"seen": 1} and "c" not in traces["k0"]["judge"]
    counts = count_traces([r["trace"] for r in rows.values()])
    assert (counts["judge"]["items"], counts["second"]["items"]) == (6, 4)
    assert counts["second"]["failed"] == {"RuntimeError": 1} and counts["judge"]["failed"] == {"ValueError": 1}


def test_runs_of_one_group_next_to_each_other_share_a_worker():
    def run(name: str, group: str | None) -> StageRun:
        return StageRun(Second(), name, Resources(), group=group)

    runs = [run("a", None), run("b", "g"), run("c", "g"), run("d", "h"), run("e", "g"), run("f", None)]
    assert [[r.instance for r in chain] for chain in chains(runs)] == [["a"], ["b", "c"], ["d"], ["e"], ["f"]]


class RecordedStream:
    """Stands in for a Ray Data dataset: records each map_batches call."""

    def __init__(self):
        self.ops: list[tuple[object, dict]] = []

    def map_batches(self, fn, **kwargs):
        self.ops.append((fn, kwargs))
        return self


def test_light_stages_run_in_the_next_cpu_worker_and_the_sink_never_before_a_gpu_worker(monkeypatch):
    """No light stage runs as a Ray task where a CPU worker can take it (each burst of tasks paid a
    new process on small nodes); a GPU worker runs its model only; load runs in the first worker."""
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2})

    def run(name: str, concurrency: int | None = None, num_gpus: float = 0) -> StageRun:
        return StageRun(Second(), name, Resources(num_cpus=0.5, num_gpus=num_gpus, concurrency=concurrency))

    load, sink = Step(lambda b: b, {}), Step(lambda b: b, {})
    flow = [run("a"), run("cpu-model", 2), run("b"), run("gpu-model", 1, 1.0), run("c"), run("d")]
    ops = add_stages(RecordedStream(), flow, load=load, sink=sink).ops

    def names(op) -> list[str]:
        fn, kw = op
        runs = kw.get("fn_constructor_args") if fn is StageWorker else kw["fn_kwargs"]["runs"]
        return [r.instance for r in runs]

    assert [fn for fn, _ in ops] == [StageWorker, run_stage_task, StageWorker, StageWorker]
    assert [names(op) for op in ops] == [["a", "cpu-model"], ["b"], ["gpu-model"], ["c", "d"]]
    assert ops[0][1]["fn_constructor_kwargs"] == {"load": load, "cache": None} and ops[0][1]["num_cpus"] == 0.5
    assert ops[1][1]["fn_kwargs"]["load"] is None
    assert ops[2][1]["num_gpus"] == 1.0 and ops[2][1]["fn_constructor_kwargs"] == {"load": None, "cache": None}
    assert (
        ops[3][1]["fn_constructor_kwargs"] == {"load": None, "sink": sink, "cache": None} and ops[3][1]["num_cpus"] == 0
    )
    # a flow of light stages only: load, the stages and the sink in one worker
    [(fn, kw)] = add_stages(RecordedStream(), [run("a"), run("b")], load=load, sink=sink).ops
    assert fn is StageWorker and kw["fn_constructor_kwargs"] == {"load": load, "sink": sink, "cache": None}
