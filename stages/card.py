"""The dataset card: a README.md that lets Hugging Face `datasets` load a run directory.

`datasets` infers a webdataset's features from its first samples; ours vary (a `grounding` that is
empty in one sample and full in the next, plugin kinds and input columns only some samples have),
so the inference fails on a later sample. The card declares the features instead: the union of
every written sample's JSON structure (keys a sample lacks load as None, empty lists take the
element type other samples show), with the image and the caption, and points `configs` at the
shards. Then `datasets.load_dataset(RUN_DIR)` loads every shard with the right types.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import yaml

_SCALARS = {pa.bool_(): "bool", pa.int64(): "int64", pa.float64(): "float64", pa.string(): "string", pa.null(): "null"}


def merge_types(a: pa.DataType, b: pa.DataType) -> pa.DataType:
    """The narrowest type both values fit: structs by the union of their fields, lists by their
    elements, null by anything, int with float as float; any other clash as string."""
    if a == b:
        return a
    if pa.types.is_null(a):
        return b
    if pa.types.is_null(b):
        return a
    if pa.types.is_struct(a) and pa.types.is_struct(b):
        fields = {f.name: f.type for f in a}
        for f in b:
            fields[f.name] = merge_types(fields[f.name], f.type) if f.name in fields else f.type
        return pa.struct(list(fields.items()))
    if pa.types.is_list(a) and pa.types.is_list(b):
        return pa.list_(merge_types(a.value_type, b.value_type))
    numbers = {pa.int64(), pa.float64()}
    if a in numbers and b in numbers:
        return pa.float64()
    return pa.string()


def value_type(value: Any) -> pa.DataType:
    """The Arrow type of one JSON value, as `pa.array` infers it, except that a list whose items
    have no common type (a plugin's `["cup", 0.9]`) is a list of strings instead of an error: the
    card must never stop a unit from being written."""
    if value is None:
        return pa.null()
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        return pa.int64()
    if isinstance(value, float):
        return pa.float64()
    if isinstance(value, str):
        return pa.string()
    if isinstance(value, dict):
        return pa.struct([(k, value_type(v)) for k, v in value.items()])
    merged: pa.DataType = pa.null()
    for item in value:
        merged = merge_types(merged, value_type(item))
    return pa.list_(merged)


def json_type(samples: Iterable[dict[str, Any]]) -> pa.DataType:
    """The union type of many JSON objects (streaming: one sample at a time)."""
    merged: pa.DataType = pa.null()
    for sample in samples:
        merged = merge_types(merged, value_type(sample))
    return merged


def yaml_feature(dtype: pa.DataType) -> Any:
    """An Arrow type in the dataset card's feature notation."""
    if pa.types.is_struct(dtype):
        return {"struct": [{"name": f.name, **yaml_feature(f.type)} for f in dtype]}
    if pa.types.is_list(dtype):
        inner = yaml_feature(dtype.value_type)
        return {"list": inner["struct"] if "struct" in inner else inner.get("dtype", inner)}
    return {"dtype": _SCALARS.get(dtype, "string")}


def shard_pattern(names: list[str]) -> str | None:
    """A webdataset brace pattern for shard file names `0000000.tar` … when they run without a gap."""
    stems = sorted(n.removesuffix(".tar") for n in names)
    if not stems or not all(s.isdigit() for s in stems):
        return None
    first, last = int(stems[0]), int(stems[-1])
    if last - first + 1 != len(stems):
        return None
    return f"{stems[0]}.tar" if first == last else f"{{{stems[0]}..{stems[-1]}}}.tar"


def random_weights_line(untrained: list[str]) -> str:
    """The one line the card and the report show when models of the run have random weights (an
    embedder's decide dedup, so the line does not say what they never reach)."""
    return f"Random weights: {', '.join(untrained)}. Their outputs carry no meaning (a plumbing test or the demo)."


def dataset_card(
    sample_type: pa.DataType,
    name: str,
    funnel: dict[str, Any],
    shard_names: list[str],
    state: str = "complete",
    failed_units: int = 0,
    untrained: list[str] | None = None,
) -> str:
    """README.md with the YAML header `datasets` reads and a short card for people. A run that did
    not complete says so first, in the card and its tags: its shards are not a finished dataset."""
    features = [
        {"name": "__key__", "dtype": "string"},
        {"name": "__url__", "dtype": "string"},
        {"name": "jpg", "dtype": "image"},
        {"name": "txt", "dtype": "string"},
        {"name": "json", **yaml_feature(sample_type)},
    ]
    tags = ["denseforge", "dense-captions", "grounding", "webdataset"]
    warning = ""
    if state != "complete":
        tags.append("incomplete-run")
        warning = (
            f"> **WARNING: this run did not complete ({state}).** Its shards are what was written before it "
            "stopped, not a finished dataset: do not train on them. `run.json` says why; "
            "`denseforge resume` finishes the run and rewrites this card.\n\n"
        )
    elif failed_units:
        tags.append("failed-units")
        warning = (
            f"> **Note: {failed_units} input unit(s) failed to download**; their rows are `ingest/ingest_failed` "
            "rejects, and `denseforge resume` retries them.\n\n"
        )
    if untrained:
        tags.append("random-weights")
        warning += f"> **{random_weights_line(untrained)}**\n\n"
    header = {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "shards/*.tar"}]}],
        "dataset_info": {"features": features},
        "tags": tags,
    }
    pattern = shard_pattern(shard_names)
    read = "import webdataset as wds                 # or stream the shards directly\n"
    if pattern:
        read += f'shards = "path/to/this/run/shards/{pattern}"'
    else:
        read = "import glob\n" + read + 'shards = sorted(glob.glob("path/to/this/run/shards/*.tar"))'
    return f"""---
{yaml.safe_dump(header, sort_keys=False, allow_unicode=True)}---

# {name}

{warning}Image-text pairs with dense captions and grounded phrases, built by denseforge:
{funnel["input_rows"]} input rows -> {funnel["written"]} written, {funnel["rejected"]} rejected
(`rejects.parquet`, with the stage and reason), {funnel["removed"]} removed (`dedup/decisions.parquet`).
`stats.json` has the full funnel, `report.html` a visual summary, `manifest.parquet` one row per sample.

Each sample: `jpg` (the stored image), `txt` (the caption, when there is one) and `json` (the record:
expert observations, caption, grounding with character spans and pixel boxes, qa scores, provenance).
Boxes are absolute pixels `[x0, y0, x1, y1]` in the stored image; `caption[span[0]:span[1]] == phrase`.

```python
# pip install datasets   (or denseforge's extra: pip install "denseforge[hf]")
import datasets
ds = datasets.load_dataset("path/to/this/run", split="train")   # the features come from this card
print(ds[0]["json"]["grounding"])

{read}
for sample in wds.WebDataset(shards, shardshuffle=False):
    ...
```
"""


def encode_type(dtype: pa.DataType) -> str:
    """An Arrow type as text for a JSON marker (a serialized one-field schema, base64)."""
    import base64

    return base64.b64encode(pa.schema([("json", dtype)]).serialize().to_pybytes()).decode("ascii")


def decode_type(text: str) -> pa.DataType:
    import base64

    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text))).field("json").type
