"""report.html: one self-contained page to look at a run — charts, a gallery, examples of rejects.

Charts are drawn by matplotlib into inline SVG (vector, small, no script, nothing fetched at view
time). The gallery is a deterministic sample of written images as small JPEG thumbnails with
their boxes drawn, the caption with each grounded phrase highlighted in its box's colour, OCR
lines, tags, qa scores and provenance. Every string that comes from the data (alt text, captions,
OCR, URLs, reject details) is HTML-escaped. The page stays small however large the run: the
gallery and the examples have fixed sizes.
"""

from __future__ import annotations

import base64
import html
import io
import json
import tarfile
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw

from denseforge.pipeline.rundir import RunDir
from denseforge.stages.card import random_weights_line
from denseforge.stages.sample import Sample, safe_member_key
from denseforge.stages.write import read_member
from denseforge.storage import open_binary, read_parquet

GALLERY = 24
EXAMPLES = 3
THUMB = 260
COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324", "#469990"]


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def charts(stats: dict[str, Any], scores: list[dict[str, float]]) -> list[tuple[str, str]]:
    """(title, inline SVG) for the funnel, the epsilon sweep, qa score distributions and stages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    f = stats["funnel"]
    labels = (
        ["input rows", "written"]
        + [f"rejected: {r}" for r in f["rejected_by_reason"]]
        + [f"removed: {r}" for r in f["removed_by_reason"]]
    )
    values = (
        [f["input_rows"], f["written"]] + list(f["rejected_by_reason"].values()) + list(f["removed_by_reason"].values())
    )
    colours = (
        ["#888", "#3cb44b"] + ["#e6194b"] * len(f["rejected_by_reason"]) + ["#f58231"] * len(f["removed_by_reason"])
    )
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(labels) + 0.8))
    ax.barh(range(len(labels)), values, color=colours)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v}", va="center", fontsize=8)
    ax.set_xlabel("rows")
    out.append(("Funnel", _svg(fig)))
    sweep = (stats.get("dedup") or {}).get("epsilon_sweep") or {}
    if sweep:
        eps = sorted(sweep, key=float)
        fig, ax = plt.subplots(figsize=(5, 2.6))
        ax.plot([float(e) for e in eps], [sweep[e] for e in eps], marker="o")
        ax.set_xlabel("epsilon (duplicate when cosine > 1 - epsilon)")
        ax.set_ylabel("images kept")
        ax.set_xscale("log")
        random = any(m.startswith("embed ") for m in stats.get("untrained", []))
        if random:
            ax.set_title("random embedding weights: these counts carry no meaning", fontsize=8, color="#b00")
        out.append(("Epsilon sweep" + (" (random embedding weights)" if random else ""), _svg(fig)))
    names = sorted({k for s in scores for k in s})
    if names:
        fig, axes = plt.subplots(1, len(names), figsize=(2.2 * len(names), 2.0), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            ax.hist([s[name] for s in scores if name in s], bins=12, color="#4363d8")
            ax.set_title(name, fontsize=8)
            ax.tick_params(labelsize=7)
        out.append(("QA scores of written samples", _svg(fig)))
    stages = stats.get("stages") or {}
    if stages:
        names = list(stages)
        fig, ax = plt.subplots(figsize=(7, 0.3 * len(names) + 0.8))
        ax.barh(range(len(names)), [stages[n]["busy_s"] for n in names], color="#4363d8", label="busy seconds")
        ax.set_yticks(
            range(len(names)),
            [f"{n} ({stages[n]['items']} items, {stages[n]['failed_total']} failed)" for n in names],
            fontsize=8,
        )
        ax.invert_yaxis()
        ax.set_xlabel("busy seconds")
        out.append(("Busy time per stage", _svg(fig)))
    return out


def thumbnail(data: bytes, boxes: Sequence[tuple[list[float], str]] = ()) -> str:
    """A data: URL of a small JPEG with the boxes drawn in their colours ("" when the bytes are not
    an image: the report shows the record without it rather than failing)."""
    try:
        image = Image.open(io.BytesIO(data)).convert("RGB")
    except Exception:  # noqa: BLE001 - a report never fails on one picture
        return ""
    scale = THUMB / max(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    draw = ImageDraw.Draw(image)
    for box, colour in boxes:
        draw.rectangle([v * scale for v in box], outline=colour, width=3)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _colour(source: str) -> str:
    kind, _, index = source.partition("/")
    return COLOURS[(int(index) + (0 if kind == "objects" else 4)) % len(COLOURS)] if index.isdigit() else COLOURS[0]


def highlighted(sample: Sample) -> str:
    """The caption, escaped, with each grounded phrase marked in its box's colour."""
    caption = sample.caption or ""
    out, cursor = [], 0
    for g in sorted(sample.grounding, key=lambda g: (g.span[0], -g.span[1])):
        start, end = g.span
        if start < cursor or caption[start:end] != g.phrase:
            continue
        out.append(esc(caption[cursor:start]))
        out.append(
            f'<mark style="background:{_colour(g.source)}55;border-bottom:2px solid {_colour(g.source)}" '
            f'title="{esc(g.source)}">{esc(g.phrase)}</mark>'
        )
        cursor = end
    out.append(esc(caption[cursor:]))
    return "".join(out)


def _samples(rd: RunDir, keys: list[str]) -> dict[str, tuple[Sample, bytes]]:
    """The chosen written samples, read from their shards (each shard opened once)."""
    by_shard: dict[str, set[str]] = defaultdict(set)
    for key in keys:
        by_shard[f"{key[:7]}.tar"].add(safe_member_key(key))
    found: dict[str, dict[str, bytes]] = defaultdict(dict)
    for shard, stems in by_shard.items():
        path = rd.shards / shard
        if not path.exists():
            continue
        with open_binary(path) as source, tarfile.open(fileobj=source) as tar:
            for member in tar:
                stem, _, ext = member.name.partition(".")
                if stem in stems and ext in ("jpg", "json"):
                    found[stem][ext] = read_member(tar, member)
    return {
        json.loads(v["json"])["key"]: (Sample.model_validate_json(v["json"]), v["jpg"])
        for v in found.values()
        if "json" in v and "jpg" in v
    }


def gallery(rd: RunDir, keys: list[str]) -> str:
    if not keys:
        return "<p>No sample was written.</p>"
    step = max(1, len(keys) // GALLERY)
    chosen = keys[::step][:GALLERY]
    cards = []
    for key, (sample, data) in sorted(_samples(rd, chosen).items()):
        objects = sample.experts.get("objects", [])
        boxes = [(o["box"], _colour(f"objects/{i}")) for i, o in enumerate(objects)]
        boxes += [(o["box"], _colour(f"ocr/{i}")) for i, o in enumerate(sample.experts.get("ocr", []))]
        detected = ", ".join(
            f'<span style="color:{_colour(f"objects/{i}")}">{esc(o["label"])} {o.get("score", 1):.2f}</span>'
            for i, o in enumerate(objects)
        )
        ocr = "".join(f"<li>{esc(o['text'])}</li>" for o in sample.experts.get("ocr", []))
        tags = ", ".join(esc(t["label"]) for t in sample.experts.get("tags", []))
        scores = ", ".join(f"{esc(k)} {v:g}" for k, v in (sample.qa.scores if sample.qa else {}).items())
        cards.append(f"""<div class="card"><img class="thumb" src="{thumbnail(data, boxes)}" alt="{esc(key)}">
<p class="caption">{highlighted(sample)}</p>
<p class="meta"><b>{esc(key)}</b> {sample.width}x{sample.height}{" · objects: " + detected if detected else ""}
{" · tags: " + tags if tags else ""}{" · qa: " + scores if scores else ""}</p>
{'<ul class="ocr">' + ocr + "</ul>" if ocr else ""}
<p class="meta">alt text: {esc(sample.alt_text or "")}</p>
<details><summary>provenance</summary><pre>{esc(json.dumps(sample.provenance, indent=1))}</pre></details></div>""")
    return '<div class="gallery">' + "\n".join(cards) + "</div>"


def _raw_image(rd: RunDir, key: str) -> bytes | None:
    """A removed image, from its unit's raw img2dataset shard (removed images are not in the shards)."""
    unit = int(key[:7])
    table = rd.raw / f"{rd.unit_name(unit)}.parquet"
    if not table.exists():
        return None
    rows = [r for r in read_parquet(table, columns=["df_key", "key"]).to_pylist() if r["df_key"] == key]
    if not rows or not (rd.raw / f"{rd.unit_name(unit)}.tar").exists():
        return None
    with open_binary(rd.raw / f"{rd.unit_name(unit)}.tar") as source, tarfile.open(fileobj=source) as tar:
        try:
            return read_member(tar, f"{rows[0]['key']}.jpg")
        except KeyError:
            return None


def examples(rd: RunDir) -> str:
    parts = []
    if rd.rejects.exists():
        by_reason: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in read_parquet(rd.rejects).to_pylist():
            group = by_reason[f"{r['stage']}/{r['reason']}"]
            if len(group) < EXAMPLES:
                group.append(r)
        for reason, rows in sorted(by_reason.items()):
            items = "".join(
                f"<li><b>{esc(r['key'])}</b> {esc(r['url'] or '')}<br>"
                f"<small>{esc((r['detail'] or '')[:300])}</small></li>"
                for r in rows
            )
            parts.append(f"<h3>rejected: {esc(reason)}</h3><ul>{items}</ul>")
    if rd.decisions.exists():
        removed: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in read_parquet(rd.decisions, columns=["key", "reason", "dup_of"]).to_pylist():
            if r["reason"] and len(removed[r["reason"]]) < EXAMPLES:
                removed[r["reason"]].append(r)
        written = _samples(rd, [r["dup_of"] for rows in removed.values() for r in rows if r["dup_of"]])
        for reason, rows in sorted(removed.items()):
            pairs = []
            for r in rows:
                mine = _raw_image(rd, r["key"])
                kept = written.get(r["dup_of"]) if r["dup_of"] else None
                pics = (f'<img class="small" src="{thumbnail(mine)}" alt="{esc(r["key"])}">' if mine else "") + (
                    f' = <img class="small" src="{thumbnail(kept[1])}" alt="{esc(r["dup_of"])}">' if kept else ""
                )
                pairs.append(
                    f"<li>{pics}<br><b>{esc(r['key'])}</b>"
                    f"{' duplicates ' + esc(r['dup_of']) if r['dup_of'] else ''}</li>"
                )
            parts.append(f"<h3>removed: {esc(reason)}</h3><ul class='pairs'>{''.join(pairs)}</ul>")
    return "\n".join(parts) or "<p>Nothing was rejected or removed.</p>"


def random_line(untrained: list[str]) -> str:
    """One visible line naming the models with random weights, or nothing."""
    if not untrained:
        return ""
    style = "background:#fde8e8;padding:6px 10px;border-left:4px solid #b00"
    return f"<p style='{style}'><b>{esc(random_weights_line(untrained))}</b></p>\n"


def cache_line(cache: dict[str, Any]) -> str:
    """What the cache of stage outputs saved: hits and misses per cached stage, and the run this
    one was derived from."""
    if not cache.get("stages"):
        return ""
    per_stage = ", ".join(f"{esc(n)} {c['hits']} hits / {c['misses']} computed" for n, c in cache["stages"].items())
    source = cache.get("derived_from") or {}
    derived = f"; derived from {esc(source['run'])} (reused: {esc(', '.join(source['reused']))})" if source else ""
    corrupt = f"; {cache['corrupt']} corrupt entries recomputed" if cache["corrupt"] else ""
    return f"<h2>Cache</h2><p>{per_stage}{corrupt}{derived}</p>\n"


def render_report(rd: RunDir, stats: dict[str, Any]) -> str:
    """The whole page, self-contained."""
    f = stats["funnel"]
    keys, scores = [], []
    if rd.manifest.exists():
        for r in read_parquet(rd.manifest, columns=["key", "scores"]).to_pylist():
            keys.append(r["key"])
            scores.append(json.loads(r["scores"] or "{}"))
    figures = "".join(f"<h2>{esc(title)}</h2><div class='chart'>{svg}</div>" for title, svg in charts(stats, scores))
    stage_rows = "".join(
        f"<tr><td>{esc(name)}</td><td>{c['items']}</td><td>{c['failed_total']}</td>"
        f"<td>{esc(', '.join(f'{k} {n}' for k, n in c['failed'].items()))}</td>"
        f"<td>{sum(c['rejected'].values())}</td><td>{c['removed']}</td><td>{c['busy_s']}</td>"
        f"<td>{esc(c['first_error'] or '')}</td></tr>"
        for name, c in stats["stages"].items()
    )
    node_rows = "".join(
        f"<tr><td>{esc(name)}</td><td>{esc(node)}</td><td>{n['items']}</td><td>{n['busy_s']}</td></tr>"
        for name, c in stats["stages"].items()
        for node, n in sorted(c.get("nodes", {}).items())
    )
    removed = ", ".join(f"{n} {esc(r)}" for r, n in f["removed_by_reason"].items())
    title = esc(stats["run"]["name"])
    storage = stats.get("storage", {})
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>denseforge run: {title}</title>
<style>body{{font-family:sans-serif;max-width:72em;margin:2em auto;color:#222}}td,th{{padding:2px 10px;text-align:left}}
.gallery{{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:14px}}
.card{{border:1px solid #ddd;padding:8px;border-radius:6px}}.thumb{{max-width:100%}}.small{{height:90px}}
.caption{{font-size:14px}}.meta{{font-size:12px;color:#555}}mark{{color:inherit}}pre{{font-size:11px;white-space:pre-wrap}}
.chart svg{{max-width:100%;height:auto}}</style></head><body>
<h1>denseforge run: {esc(stats["run"]["name"])}{"" if stats["complete"] else " (failed, incomplete)"}</h1>
{random_line(stats.get("untrained", []))}
<p>{f["input_rows"]} input rows → {f["written"]} written, {f["rejected"]} rejected, {f["removed"]} removed
{("(" + removed + ")") if removed else ""} · balanced: {f["balanced"]}</p>
{figures}
<h2>Stages</h2><table><tr><th>stage</th><th>items</th><th>failed</th><th>by type</th><th>rejected</th>
<th>removed</th><th>busy s</th><th>first error</th></tr>{stage_rows}</table>
{cache_line(stats.get("cache") or {})}
<h2>Work per node</h2><table><tr><th>stage</th><th>node</th><th>items</th><th>busy s</th></tr>{node_rows}</table>
<h2>Gallery ({min(len(keys), GALLERY)} of {len(keys)} written samples)</h2>
{gallery(rd, keys)}
<h2>Rejected and removed: examples</h2>
{examples(rd)}
<h2>Timings (s)</h2><p>{esc(json.dumps(stats["timings"]))}</p>
<p>storage: {esc(str(storage.get("url", "")))}, {storage.get("retries", 0)} request(s) retried</p>
<p><small>versions: {esc(json.dumps(stats["versions"]))}</small></p></body></html>
"""
