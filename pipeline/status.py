"""`denseforge status DIR`: how far a run got, read from its markers only (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

from denseforge.pipeline.rundir import RunDir


def describe_run(root: Path) -> str:
    rd = RunDir(root)
    rd.load_config()  # raises RunDirError for a foreign directory
    state = rd.read_state()
    lines = [f"run {root}: {state.get('state', 'unknown')}"]
    if not rd.plan_file.exists():
        lines.append("  plan: not done (input not yet read)")
        return "\n".join(lines)
    plan = json.loads(rd.plan_file.read_text())
    units = plan["units"]
    rows = plan["rows"] if plan["rows"] is not None else "unknown until ingest"
    ingested = len(list(rd.raw.glob("*.ingested.json"))) if rd.raw.exists() else 0
    written = len(list((rd.shards / "_done").glob("*.json"))) if (rd.shards / "_done").exists() else 0
    lines += [f"  plan: {units} unit(s), {rows} input rows ({plan['kind']})",
              f"  ingest: {ingested}/{units} units", f"  write: {written}/{units} units"]
    if rd.stats.exists():
        f = json.loads(rd.stats.read_text())["funnel"]
        lines.append(f"  funnel: {f['input_rows']} in = {f['written']} written + {f['rejected']} rejected"
                     f" + {f['removed']} removed (balanced: {f['balanced']})")
    elif state.get("state") != "complete":
        lines.append(f"  continue with: denseforge resume {root}")
    return "\n".join(lines)
