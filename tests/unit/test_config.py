import pytest

from denseforge.errors import ConfigError
from denseforge.pipeline.config import apply_overrides, load_config, parse_config


def test_unknown_key_names_its_path_and_the_key_it_meant():
    with pytest.raises(ConfigError, match=r"ingest\.thredas: unknown key \(did you mean ingest\.threads\?\)"):
        parse_config({"input": {"path": "x.parquet"}, "ingest": {"thredas": 4}})
    with pytest.raises(
        ConfigError,
        match=r"perceive\.experts\.0\.optoins: unknown key \(did you mean "
        r"perceive\.experts\.0\.options\?\)",
    ):
        parse_config({"input": {"path": "x.parquet"}, "perceive": {"experts": [{"plugin": "yolox", "optoins": {}}]}})
    with pytest.raises(ConfigError, match=r"zzz: unknown key$"):
        parse_config({"input": {"path": "x.parquet"}, "zzz": 1})


def test_bad_value_names_path_and_expectation():
    with pytest.raises(ConfigError) as err:
        parse_config({"input": {"path": "x.parquet"}, "ingest": {"threads": "many", "resize_mode": "squash"}})
    text = str(err.value)
    assert "ingest.threads" in text and "integer" in text
    assert "ingest.resize_mode" in text and "keep_ratio" in text


def test_missing_input_path_is_an_error_unless_demo():
    with pytest.raises(ConfigError, match="input.path is required"):
        parse_config({})
    cfg = parse_config({"demo": {"enabled": True}, "ingest": {"allow_private_addresses": True}})
    assert cfg.demo.enabled


def test_demo_requires_private_addresses():
    with pytest.raises(ConfigError, match="allow_private_addresses"):
        parse_config({"demo": {"enabled": True}})


def test_set_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("input: {path: table.parquet}\ningest: {threads: 4}\n")
    cfg = load_config(path, ["ingest.threads=12", "output.samples_per_shard=50", "input.url_col=URL"])
    assert cfg.ingest.threads == 12 and cfg.output.samples_per_shard == 50 and cfg.input.url_col == "URL"
    assert cfg.input.path.endswith("table.parquet") and cfg.input.path.startswith("/")


def test_set_rejects_malformed_items():
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["ingest.threads"])
    with pytest.raises(ConfigError, match="is not a mapping"):
        apply_overrides({"ingest": 3}, ["ingest.threads=2"])


def test_set_reaches_into_lists_by_index():
    data = {"perceive": {"experts": [{"plugin": "yolox"}, {"plugin": "rapidocr", "resources": {"num_cpus": 0.5}}]}}
    apply_overrides(data, ["perceive.experts.1.resources.max_concurrency=2", "perceive.experts.0.name=det"])
    assert data["perceive"]["experts"] == [
        {"plugin": "yolox", "name": "det"},
        {"plugin": "rapidocr", "resources": {"num_cpus": 0.5, "max_concurrency": 2}},
    ]
    with pytest.raises(
        ConfigError, match=r"perceive.experts.2 - perceive.experts is a list of 2; give an index from 0 to 1"
    ):
        apply_overrides(data, ["perceive.experts.2.name=x"])
    with pytest.raises(ConfigError, match="is a list of 2"):
        apply_overrides(data, ["perceive.experts.name=x"])
    with pytest.raises(ConfigError, match=r"perceive.experts.0.name is not a mapping"):
        apply_overrides(data, ["perceive.experts.0.name.x=1"])


def test_set_with_unknown_key_fails_validation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("input: {path: t.parquet}\n")
    with pytest.raises(ConfigError, match=r"output\.per_shard: unknown key"):
        load_config(path, ["output.per_shard=3"])


def test_unreadable_and_non_mapping_configs(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)


def test_shipped_configs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    for path in sorted(root.glob("*.yaml")):
        load_config(path, ["input.path=x.parquet"] if "demo" not in path.name else [])


def _alias_levels(levels: int, under: str) -> str:
    """A YAML 'billion laughs': each level is nine aliases of the one before, `under` names the last."""
    lines = ['l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for n in range(1, levels):
        lines.append(f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 9)}]")
    return "\n".join(lines) + f"\n{under}: *l{levels - 1}\ninput: {{path: x}}\n"


def test_a_yaml_alias_bomb_is_refused_at_load_time_and_values_are_quoted_short(tmp_path):
    """Regression: nine levels of nine aliases under run.name — the validator's message repr'd the
    expanded value (killed at 120 s, 1.3 GB)."""
    import time

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_levels(9, "run: {name").replace("run: {name: *l8\n", "run: {name: *l8}\n"))
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases expand to more than 100000 values"):
        load_config(bomb)
    assert time.perf_counter() - start < 10  # refused, not expanded
    small = tmp_path / "small.yaml"  # 9**3 values: loads, and the type error quotes it cut short
    small.write_text(_alias_levels(3, "run: {name").replace("run: {name: *l2\n", "run: {name: *l2}\n"))
    with pytest.raises(ConfigError) as err:
        load_config(small)
    line = next(x for x in str(err.value).splitlines() if "run.name" in x)
    assert len(line) < 200 and "chars)" in line, line
    with pytest.raises(ConfigError, match="--set run.name: its YAML aliases expand"):
        apply_overrides({}, ["run.name=" + _alias_levels(9, "z")])
