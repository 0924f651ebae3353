"""`denseforge status DIR`: how far a run got, read from its markers only (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

from denseforge.pipeline.rundir import RunDir
from denseforge.pipeline.stats import stage_counts


def describe_run(root: Path) -> str:
    rd = RunDir(root)
    rd.load_config()  # raises RunDirError for a foreign directory
    state = rd.read_state()
    lines = [f"run {root}: {state.get('state', 'unknown')}"]
    if state.get("reason"):
        lines.append(f"  reason: {state['reason']}")
        if state.get("ray_logs"):
            lines.append(f"  workers' logs: {state['ray_logs']}")
    holder = rd.holder()
    if holder is not None:
        lines.append(f"  driver: alive, {holder.get('command', '?')} on {holder.get('host')} pid {holder.get('pid')} "
                     f"since {holder.get('since', '?')}")
    elif state.get("state") == "running":
        lines.append("  driver: none holds the run (it was killed); continue with `denseforge resume`")
    if not rd.plan_file.exists():
        lines.append("  plan: not done (input not yet read)")
        return "\n".join(lines)
    plan = json.loads(rd.plan_file.read_text())
    units = plan["units"]
    rows = plan["rows"] if plan["rows"] is not None else "unknown until ingest"
    lines.append(f"  plan: {units} unit(s), {rows} input rows ({plan['kind']})")
    for phase in ("ingest", "embed", "write"):
        lines.append(f"  {phase}: {units - len(rd.pending(phase, units))}/{units} units")
    for name, c in stage_counts(rd).items():
        parts = [f"{c['items']} items"]
        if c["failed_total"]:
            parts.append(f"failed {c['failed_total']} ({', '.join(f'{k} {n}' for k, n in c['failed'].items())})")
        if c["rejected"]:
            parts.append(f"rejected {sum(c['rejected'].values())}")
        if c["removed"]:
            parts.append(f"removed {c['removed']}")
        lines.append(f"  stage {name}: {', '.join(parts)}")
    if rd.stats.exists():
        f = json.loads(rd.stats.read_text())["funnel"]
        lines.append(f"  funnel: {f['input_rows']} in = {f['written']} written + {f['rejected']} rejected"
                     f" + {f['removed']} removed (balanced: {f['balanced']})")
    elif state.get("state") != "complete":
        lines.append(f"  continue with: denseforge resume {root}")
    return "\n".join(lines)
