"""The cache of stage outputs: keys, patches, hits and misses, corrupt entries, sharing, pruning."""

from __future__ import annotations

import json
import os
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import pytest
from PIL import Image

from denseforge.errors import StorageError
from denseforge.experts.base import Expert
from denseforge.pipeline.adapter import StageRun, StageWorker
from denseforge.pipeline.cache import CORRUPT, HIT, MISS, OutputCache, check_root, diff, patch, prune, usage
from denseforge.plugin import Resources, Settings
from denseforge.stages.perceive import ExpertStage
from denseforge.stages.stage import Item, Rejection, Stage

from ..conftest import blank_sample, jpeg_bytes
from .test_adapter import _rows


class Counting(Stage):
    """A cached stage that writes a caption from the key and rejects keys ending in 3; it counts
    its setups and the items it saw."""

    name = "counting"
    cached = True
    setups = 0
    seen: ClassVar[list[str]] = []

    def setup(self) -> None:
        type(self).setups += 1

    def process(self, batch: list[Item]) -> list:
        out: list = []
        for item in batch:
            type(self).seen.append(item.key)
            item.counts["words"] = 2
            if item.key.endswith("3"):
                out.append(Rejection("odd", f"key {item.key}"))
            elif item.key.endswith("4"):
                out.append(RuntimeError("flaky"))
            else:
                item.sample.caption = f"caption of {item.key}"
                item.sample.provenance["counting"] = {"model": "m"}
                out.append(None)
        return out


def _items(n: int) -> list[Item]:
    return [Item(0, blank_sample(key=f"k{i}", sha256=f"{i:064x}"), b"") for i in range(n)]


@pytest.fixture(autouse=True)
def _reset():
    Counting.setups, Counting.seen = 0, []


def _verdicts(cache: OutputCache, items: list[Item], stage: Stage | None = None) -> list:
    run = StageRun(stage or Counting(), "counting", Resources())
    return cache.verdicts(run, items, lambda batch: run.stage.process(batch))


def test_diff_and_patch_rebuild_any_change_of_a_record():
    rng = random.Random(0)

    def value(depth: int) -> Any:
        if depth < 3 and rng.random() < 0.5:
            return {rng.choice("abcde"): value(depth + 1) for _ in range(rng.randint(0, 4))}
        return rng.choice([None, 1, "x", [1, 2], {"k": None}, []])

    for _ in range(500):
        before, after = value(0), value(0)
        if isinstance(before, dict) and isinstance(after, dict):
            assert patch(json.loads(json.dumps(before)), diff(before, after)) == after
    record = {"caption": None, "experts": {"ocr@a": [1], "tags@b": [2]}, "provenance": {"experts": {"a": {}}}}
    changed = {"caption": "c", "experts": {"ocr@a": [1]}, "provenance": {"experts": {"a": {}, "b": {"m": 1}}}}
    change = diff(record, changed)
    assert change == {
        "set": [[["caption"], "c"], [["provenance", "experts", "b"], {"m": 1}]],
        "del": [["experts", "tags@b"]],
    }
    # the patch touches only what the stage changed: other entries of a dict stay
    other = {"caption": None, "experts": {"ocr@a": [1], "tags@b": [2], "x@c": [3]}, "provenance": {"experts": {"c": 1}}}
    assert patch(other, change) == {
        "caption": "c",
        "experts": {"ocr@a": [1], "x@c": [3]},
        "provenance": {"experts": {"c": 1, "b": {"m": 1}}},
    }


def test_a_second_pass_takes_every_output_from_the_cache_and_calls_the_stage_for_none(tmp_path):
    cache = OutputCache(tmp_path / "cache", origin="run-a")
    first = _items(6)
    verdicts = _verdicts(cache, first)
    assert [type(v).__name__ for v in verdicts] == ["NoneType"] * 3 + ["Rejection", "RuntimeError", "NoneType"]
    assert all(item.counts[MISS] == 1 and item.counts["words"] == 2 for item in first)
    assert len(Counting.seen) == 6

    Counting.seen = []
    again = _items(6)
    verdicts = _verdicts(cache, again)
    assert Counting.seen == ["k4"]  # a failure is tried again; everything else came from the cache
    assert verdicts[3] == Rejection("odd", "key k3")
    assert [item.sample.model_dump() for item in again if item.key != "k4"] == [
        item.sample.model_dump() for item in first if item.key != "k4"
    ]  # the same run: no provenance mark, the same bytes as computing it
    assert [HIT in item.counts for item in again] == [True, True, True, True, False, True]
    assert again[0].counts == {HIT: 1, "words": 2}


def test_an_entry_made_by_another_run_is_marked_in_the_provenance(tmp_path):
    _verdicts(OutputCache(tmp_path / "shared", origin="run-a"), _items(1))
    derived = OutputCache(tmp_path / "own", origin="run-b", also=(tmp_path / "shared",))
    [item] = _items(1)
    _verdicts(derived, [item])
    assert Counting.seen == ["k0"] and item.sample.provenance["cache"] == {"counting": "run-a"}
    assert usage(tmp_path / "own") == []  # a hit writes nothing


def test_settings_or_input_changes_miss_and_run_options_do_not(tmp_path):
    cache = OutputCache(tmp_path / "cache", origin="run-a")
    _verdicts(cache, _items(1))
    [changed] = _items(1)
    changed.sample.alt_text = "other alt text"
    _verdicts(cache, [changed])
    assert Counting.seen == ["k0", "k0"]

    class Tuned(Stage):
        name, cached = "tuned", True

        class Options(Settings):
            threshold: float = 0.5
            batch_size: int = 16
            timeout_s: float = 10.0

        def process(self, batch):
            return [None] * len(batch)

    a, b, c = (
        Tuned({"threshold": 0.5}),
        Tuned({"threshold": 0.5, "batch_size": 2, "timeout_s": 1}),
        Tuned({"threshold": 0.6}),
    )
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


class Seer(Expert):
    name, kind = "seer", "sights"
    consumes = ("objects",)

    def __call__(self, batch):
        return [[{"label": f"{len(i.observations.get('objects', []))} objects"}] for i in batch]


def test_an_expert_is_keyed_by_its_image_and_the_kinds_it_consumes_only(tmp_path):
    stage = ExpertStage(Seer(), "seer")
    [item] = _items(1)
    key = stage.cache_key(item)
    item.sample.experts["tags@tagger"] = [{"label": "cat"}]  # another expert's output: not read
    item.sample.provenance["experts"] = {"tagger": {"plugin": "clip-tags"}}
    item.sample.alt_text = "a cat"
    assert stage.cache_key(item) == key
    item.sample.experts["objects@yolox"] = [{"label": "cat", "box": [0, 0, 1, 1], "score": 0.9}]
    assert stage.cache_key(item) != key
    item.sample.sha256 = "f" * 64
    assert ExpertStage(Seer(), "seer").cache_key(_items(1)[0]) == key


def test_a_corrupt_entry_is_recomputed_counted_and_repaired(tmp_path):
    cache = OutputCache(tmp_path / "cache", origin="run-a")
    _verdicts(cache, _items(2))
    [entry, *_] = sorted((tmp_path / "cache").rglob("*/??/*.json"))
    for damage in (lambda b: b[: len(b) // 2], lambda b: b.replace(b"caption of", b"caption 0f")):
        good = entry.read_bytes()
        entry.write_bytes(damage(good))
        Counting.seen = []
        items = _items(2)
        _verdicts(cache, items)
        bad = [item for item in items if CORRUPT in item.counts]
        assert len(bad) == 1 and bad[0].counts[MISS] == 1 and Counting.seen == [bad[0].key]
        assert bad[0].sample.caption == f"caption of {bad[0].key}"  # computed, never the damaged value
        assert entry.read_bytes() == good  # written again whole


def _share(args: tuple[str, int]) -> list[str | None]:
    root, seed = args
    cache = OutputCache(Path(root), origin=f"run-{seed}")
    items = _items(40)
    random.Random(seed).shuffle(items)
    out = []
    for start in range(0, 40, 5):
        _verdicts(cache, items[start : start + 5])
    for item in sorted(items, key=lambda i: i.key):
        out.append(item.sample.caption)
    return out


def test_runs_sharing_one_cache_at_once_corrupt_nothing(tmp_path):
    with ProcessPoolExecutor(4) as pool:
        results = list(pool.map(_share, [(str(tmp_path / "c"), seed) for seed in range(8)]))
    assert all(r == results[0] for r in results)
    items = _items(40)
    cache = OutputCache(tmp_path / "c", origin="check")
    _verdicts(cache, items)
    assert not any(CORRUPT in item.counts for item in items)
    assert sum(HIT in item.counts for item in items) == 36  # all but the 4 that always fail (k4, k14, ...)
    assert not list((tmp_path / "c").rglob(".*.tmp"))


def test_a_worker_whose_items_all_hit_never_loads_the_model(tmp_path):
    cache = OutputCache(tmp_path / "cache", origin="run-a")
    run = StageRun(Counting(), "counting", Resources(batch_size=4))
    rows = _rows(6)
    StageWorker(run, cache=cache)(rows)
    assert Counting.setups == 1
    Counting.setups = 0
    out = StageWorker(run, cache=cache)(_rows(5)).to_pylist()  # k0..k4: k4 failed before, k3 rejected
    assert Counting.setups == 1 and Counting.seen[-1:] == ["k4"]
    Counting.setups = 0
    out = StageWorker(run, cache=cache)(_rows(4)).to_pylist()
    assert Counting.setups == 0
    assert [json.loads(r["reject"])["reason"] if r["reject"] else None for r in out] == [None, None, None, "odd"]
    assert json.loads(out[0]["trace"])["counting"]["c"] == {HIT: 1, "words": 2}
    StageWorker(run)(_rows(1))  # without a cache it loads as ever
    assert Counting.setups == 1


def test_prune_deletes_a_stage_or_the_least_recently_used(tmp_path):
    root = tmp_path / "cache"
    cache = OutputCache(root, origin="run-a")
    items = _items(10)
    _verdicts(cache, items)
    entries = sorted(root.rglob("*/??/*.json"), key=lambda p: p.name)
    assert len(entries) == 9  # k4 failed: nothing kept
    for age, entry in enumerate(entries):
        os.utime(entry, (1000 + age, 1000 + age))
    [hit] = _items(1)
    _verdicts(cache, [hit])  # a hit makes its entry the most recently used
    assert hit.counts[HIT] == 1
    newest_first = sorted(entries, key=lambda p: -p.stat().st_mtime)
    assert newest_first[0].stat().st_mtime > 2000
    [row] = usage(root)
    assert (row["stage"], row["entries"], row["bytes"]) == ("counting", 9, sum(p.stat().st_size for p in entries))
    keep = newest_first[:5]
    deleted, freed = prune(root, max_bytes=sum(p.stat().st_size for p in keep))
    assert sorted(p for p in entries if p.exists()) == sorted(keep) and deleted == 4 and freed > 0
    assert prune(root, stage="counting")[0] == 5 and usage(root) == []
    with pytest.raises(StorageError, match="no cache there"):
        check_root(tmp_path / "nothing")


def test_an_image_stays_out_of_the_key_but_its_hash_is_in(tmp_path):
    stage = Counting()
    a = Item(0, blank_sample(sha256="a" * 64), jpeg_bytes(Image.new("RGB", (4, 4))))
    b = Item(0, blank_sample(sha256="a" * 64), b"")
    assert stage.cache_key(a) == stage.cache_key(b)
    b.sample.sha256 = "b" * 64
    assert stage.cache_key(a) != stage.cache_key(b)


def test_a_replay_writes_the_units_the_cache_holds_whole_and_leaves_the_rest(tmp_path):
    import pyarrow as pa

    from denseforge.pipeline.adapter import Step, replay_units, replayable

    cache = OutputCache(tmp_path / "cache", origin="run-a")
    run = StageRun(Counting(), "counting", Resources(batch_size=4, concurrency=1))
    assert not replayable([run], cache)  # nothing cached yet: no replay pass
    StageWorker(run, cache=cache)(_rows(3))
    assert replayable([run], cache) and not replayable([run], None)
    Counting.setups, Counting.seen = 0, []

    def load(batch: pa.Table) -> pa.Table:
        unit = batch.column("unit")[0].as_py()
        return (
            _rows(3 if unit == 0 else 5)
            .drop_columns(["unit"])
            .add_column(0, "unit", pa.array([unit] * (3 if unit == 0 else 5)))
        )

    def sink(batch: pa.Table) -> pa.Table:
        traces = [json.loads(t) for t in batch.column("trace").to_pylist()]
        return pa.table({"unit": batch.column("unit")[:1], "counts": [json.dumps(traces)]})

    out = replay_units(pa.table({"unit": pa.array([0, 1], pa.int64())}), [run], Step(load, {}), Step(sink, {}), cache)
    assert out.column("unit").to_pylist() == [0]  # unit 1 holds k3 and k4, which the cache does not
    assert [t["counting"]["c"] for t in json.loads(out.column("counts")[0].as_py())] == [{HIT: 1, "words": 2}] * 3
    assert Counting.setups == 0 and Counting.seen == []  # no model loaded, nothing computed
