"""Synonym-aware grounding with the packaged all-MiniLM-L6-v2 (real weights, offline)."""

from __future__ import annotations

import pytest

from denseforge.errors import ModelLoadError
from denseforge.stages.ground import GroundConfig, GroundStage
from denseforge.stages.qa import QaConfig, assess
from denseforge.stages.sample import Sample
from denseforge.stages.stage import Item
from denseforge.stages.synonyms import SynonymConfig, SynonymMatcher, singular


@pytest.fixture(scope="module")
def matcher():
    m = SynonymMatcher(SynonymConfig())
    m.setup()
    return m


@pytest.fixture(scope="module")
def ground():
    stage = GroundStage(GroundConfig())
    stage.setup()
    return stage


@pytest.mark.parametrize(
    "word,expected",
    [
        ("puppies", "puppy"),
        ("boxes", "box"),
        ("cars", "car"),
        ("glass", "glass"),
        ("bus", "bus"),
        ("benches", "bench"),
        ("sofa", "sofa"),
        ("dogs", "dog"),
    ],
)
def test_singular(word, expected):
    assert singular(word) == expected


def test_synonyms_map_to_their_label_and_nothing_else(matcher):
    caption = (
        "A puppy naps on the sofa next to a mug; an automobile, a cat, a desk, a stool and a red "
        "bright scene with several large windows."
    )
    found = matcher.match(caption, ["dog", "couch", "cup", "car"])
    assert {w: label for w, (label, _) in found.items()} == {
        "puppy": "dog",
        "sofa": "couch",
        "mug": "cup",
        "automobile": "car",
    }
    assert all(0.7 <= score <= 1 for _, score in found.values())
    # "cat" is a label itself (exact matching handles it; it is never a synonym of dog); "desk" and
    # "stool" are near chair/couch/toilet but not clearly nearest; colours and filler words are skipped


def _sample(caption: str, labels: list[str]) -> Sample:
    objects = [
        {"label": label, "score": 0.9, "box": [10.0 * i, 10.0 * i, 10.0 * i + 8, 10.0 * i + 8]}
        for i, label in enumerate(labels)
    ]
    return Sample(key="k", width=100, height=100, sha256="0", caption=caption, experts={"objects": objects})


def test_ground_ties_synonyms_to_detected_boxes_only(ground):
    sample = _sample("Two puppies chase a mug past an automobile.", ["dog", "dog", "cup"])
    ground.process([Item(0, sample, b"")])
    tied = [(g.phrase, g.source) for g in sample.grounding]
    assert tied == [("puppies", "objects/0"), ("puppies", "objects/1"), ("mug", "objects/2")]  # plural: both dogs
    evidence = sample.provenance["ground"]
    assert evidence["synonyms"]["automobile"]["label"] == "car" and evidence["claims"] == ["car", "dog"]
    assert 0.7 <= evidence["synonyms"]["automobile"]["score"] <= 1  # a struct: a [label, score] list has no Arrow type
    assert "Apache-2.0" in evidence["weights"] and "pretrained" in evidence["weights"]


def test_proper_names_stay_in_the_phrase_and_aliases_still_apply(ground):
    sample = _sample("A Golden Retriever sleeps beside a tabby cat.", ["dog", "cat"])
    ground.process([Item(0, sample, b"")])
    assert [(g.phrase, g.source) for g in sample.grounding] == [
        ("Golden Retriever", "objects/0"),
        ("tabby cat", "objects/1"),
    ]


def test_the_hallucination_check_counts_synonym_claims(ground):
    settings = QaConfig(min_words=1, max_hallucination=0.5)
    claimed = _sample("An automobile is parked here.", ["person"])
    ground.process([Item(0, claimed, b"")])
    report = assess(claimed, settings)
    assert report.scores["hallucination"] == 1.0 and "hallucination" in report.reasons  # no expert saw a car
    seen = _sample("An automobile is parked here.", ["car"])
    ground.process([Item(0, seen, b"")])
    assert assess(seen, settings).scores["hallucination"] == 0.0
    sign = _sample("A sign reads OPEN.", ["person"])  # "sign" is 0.74 from stop sign: grounds, never claims
    ground.process([Item(0, sign, b"")])
    assert sign.provenance["ground"]["claims"] == [] and assess(sign, settings).scores["hallucination"] == 0.0


def test_without_synonyms_the_stage_has_no_model():
    stage = GroundStage(GroundConfig(synonyms={"enabled": False}))
    assert stage.matcher is None
    sample = _sample("An automobile sniffs a cellphone.", ["car", "cell phone"])  # in no alias table
    stage.process([Item(0, sample, b"")])
    assert sample.grounding == [] and "ground" not in sample.provenance
    with_synonyms = GroundStage(GroundConfig())
    with_synonyms.setup()
    with_synonyms.process([Item(0, sample, b"")])
    assert [(g.phrase, g.source) for g in sample.grounding] == [("automobile", "objects/0"), ("cellphone", "objects/1")]


def test_a_synonym_model_that_cannot_load_says_what_to_do(tmp_path):
    with pytest.raises(ModelLoadError, match="set ground.synonyms.enabled: false"):
        SynonymMatcher(SynonymConfig(model=str(tmp_path / "missing"))).setup()
