"""The flow is data: built-in phases are stages registered as plugins are, each planning its own runs."""

import pytest

from denseforge.errors import ConfigError
from denseforge.pipeline import flow
from denseforge.pipeline.config import parse_config
from denseforge.pipeline.rundir import RunDir
from denseforge.plugin import STAGES, entries
from denseforge.stages.sample import Sample
from denseforge.stages.stage import Item

CONFIG = {
    "input": {"path": "x"},
    "dedup": {"enabled": False},
    "embed": {"enabled": False},
    "perceive": {"enabled": True, "experts": [{"plugin": "yolox"}]},
    "fuse": {"enabled": True},
    "qa": {"enabled": True, "min_words": 1},
}


def test_every_phase_of_the_flow_is_a_registered_stage_that_plans_itself(tmp_path):
    assert not set(flow.FLOW) & set(entries(STAGES))  # the flow's phases are the package's, not plugins
    kinds = {row["name"]: row["kind"] for row in flow.describe_plugins()}  # `denseforge experts`
    assert all(kinds[name] == "phase" for name in flow.FLOW) and kinds["yolox"] == "objects"
    runs = flow.build_stages(parse_config(CONFIG), RunDir(tmp_path / "run"))
    assert [r.instance for r in runs] == ["yolox", "merge", "fuse", "ground", "qa"]
    on = {**CONFIG, "embed": {"enabled": True}, "dedup": {"enabled": True}, "qa": {"enabled": False}}
    assert [r.instance for r in flow.build_stages(parse_config(on), RunDir(tmp_path / "run"))] == [
        "dedup",
        "yolox",
        "merge",
        "fuse",
        "ground",
    ]


STAMP = """
from denseforge.stages.stage import Stage, StageRun


class Stamp(Stage):
    name = "stamp"

    @classmethod
    def plan(cls, flow):
        return [StageRun.light(cls())] if flow.config.fuse.enabled else []

    def process(self, batch):
        for item in batch:
            item.sample.provenance["stamp"] = item.sample.caption
        return [None] * len(batch)
"""


def test_adding_a_built_in_phase_is_one_file_and_its_line_in_the_flow(monkeypatch, tmp_path):
    (tmp_path / "stamp.py").write_text(STAMP)  # the file: what stages/stamp.py would hold
    monkeypatch.syspath_prepend(str(tmp_path))
    at = list(flow.FLOW).index("ground") + 1  # the entry: its line in FLOW, after ground
    entries = list(flow.FLOW.items())
    monkeypatch.setattr(flow, "FLOW", dict([*entries[:at], ("stamp", "stamp:Stamp"), *entries[at:]]))
    runs = flow.build_stages(parse_config(CONFIG), RunDir(tmp_path / "run"))
    assert [r.instance for r in runs] == ["yolox", "merge", "fuse", "ground", "stamp", "qa"]
    stamp = runs[4]
    item = Item(0, Sample(key="k", url="u", width=8, height=8, sha256="0" * 64, caption="a cat"), b"")
    assert stamp.stage.process([item]) == [None] and item.sample.provenance["stamp"] == "a cat"
    assert [
        r.instance for r in flow.build_stages(parse_config({**CONFIG, "fuse": {"enabled": False}}), RunDir(tmp_path))
    ] == ["yolox", "merge"]
    assert {"name": "stamp", "kind": "phase"} in [
        {k: row[k] for k in ("name", "kind")} for row in flow.describe_plugins()
    ]


def test_a_built_in_phase_is_not_placed_by_a_stages_entry(tmp_path):
    config = parse_config({**CONFIG, "stages": [{"plugin": "qa", "after": "fuse"}]})
    with pytest.raises(ConfigError, match=r"stages\[0\]\.plugin: 'qa' is a built-in phase"):
        flow.build_stages(config, RunDir(tmp_path / "run"))


def test_the_models_with_random_weights_are_named_for_the_report_card_and_sweep():
    config = parse_config(
        {
            **CONFIG,
            "embed": {"enabled": True, "model": "df-tiny-clip", "weights": "random"},
            "perceive": {
                "enabled": True,
                "experts": [
                    {"plugin": "yolox"},
                    {
                        "plugin": "clip-tags",
                        "name": "tagger",
                        "options": {"model": "df-tiny-clip", "weights": "random"},
                    },
                ],
            },
        }
    )
    assert flow.untrained_models(config) == ["embed (df-tiny-clip)", "expert tagger"]
    assert flow.untrained_models(parse_config(CONFIG)) == []  # real YOLOX weights, embed off
