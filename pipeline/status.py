"""`denseforge status DIR [--json] [--watch]`: where a run is, from the files it writes (no Ray).

Everything comes from the run directory: run.json (state, reason, history), run.lock (which
driver holds the run, and whether it is alive), the plan, and the per-unit completion markers
(their counts, and their modification times for the throughput over the last minute and the ETA).
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from upath import UPath

from denseforge.pipeline.rundir import RunDir
from denseforge.pipeline.stats import stage_counts
from denseforge.storage import modified_times, read_json

PHASES: tuple[Literal["ingest", "embed", "write"], ...] = ("ingest", "embed", "write")
WINDOW_S = 60.0


def _recent(markers: list[UPath], now: float) -> int:
    """How many of `markers` were written in the last WINDOW_S seconds (one listing per folder)."""
    times: dict[str, float] = {}
    for folder in {m.parent for m in markers}:
        times.update(modified_times(folder))
    return sum(now - times[m.name] <= WINDOW_S for m in markers if m.name in times)


def run_status(root: UPath) -> dict[str, Any]:
    """The run's state as one JSON-able dict (what `status --json` prints)."""
    rd = RunDir(root)
    rd.check_run()
    state = rd.read_state()
    holder = rd.holder()
    out: dict[str, Any] = {
        "run": str(root),
        "state": state.get("state", "unknown"),
        "reason": state.get("reason"),
        "driver": {"alive": holder is not None, **(holder or {})},
        "ray_logs": state.get("ray_logs"),
        "invocations": len(state.get("history", [])),
    }
    if state.get("state") == "running" and holder is None:
        out["driver"]["note"] = "no driver holds the run (it was killed); continue with `denseforge resume`"
    if not rd.plan_file.exists():
        out["phase"] = "plan"
        return out
    plan = read_json(rd.plan_file)
    units, now = plan["units"], time.time()
    out["plan"] = {"units": units, "input_rows": plan["rows"], "kind": plan["kind"]}
    phases: dict[str, Any] = {}
    for phase in PHASES:
        markers = rd.markers(phase)
        done = len(markers)
        recent = _recent(markers, now)
        rate = recent / WINDOW_S  # units per second over the last minute
        phases[phase] = {
            "units_done": done,
            "units_total": units,
            "units_per_min": round(rate * 60, 2),
            "eta_s": round((units - done) / rate, 1) if rate > 0 and done < units else None,
        }
    phases["dedup"] = {"done": rd.dedup_summary.exists()}
    out["phases"] = phases
    current: str | None = next((p for p in PHASES if phases[p]["units_done"] < units), None)
    if current == "write" and not phases["dedup"]["done"] and phases["embed"]["units_done"] == units:
        current = "dedup"
    out["phase"] = current or ("done" if rd.stats.exists() else "finalize")
    written = rejected = removed = retries = 0
    for _, counts in rd.marker_counts("write"):
        written, rejected, removed = (
            written + counts["written"],
            rejected + counts["rejected"],
            removed + counts["removed"],
        )
        retries += counts.get("store_retries", 0)
    out["samples"] = {"written": written, "rejected": rejected, "removed": removed}
    stats = read_json(rd.stats) if rd.stats.exists() else None
    # a finished or failed run's counts are in its stats (a failed stage's units lost their markers
    # so that resume redoes them); a running one's are in the markers
    counts = stats["stages"] if stats is not None and out["state"] != "running" else stage_counts(rd)
    out["stages"] = {
        name: {
            k: c.get(k)
            for k in (
                "items",
                "failed_total",
                "failed",
                "rejected",
                "removed",
                "busy_s",
                "first_error",
                "counters",
                "nodes",
            )
        }
        for name, c in counts.items()
    }
    out["store_retries"] = stats["storage"]["retries"] if stats is not None and "storage" in stats else retries
    if stats is not None:
        out["funnel"] = stats["funnel"]
    return out


def describe_run(root: UPath) -> str:
    """The same, for a person."""
    s = run_status(root)
    lines = [f"run {root}: {s['state']}" + (f" (phase: {s['phase']})" if s["state"] == "running" else "")]
    if s["reason"]:
        lines.append(f"  reason: {s['reason']}")
        if s["ray_logs"]:
            lines.append(f"  workers' logs: {s['ray_logs']}")
    d = s["driver"]
    if d["alive"]:
        lines.append(
            f"  driver: alive, {d.get('command', '?')} on {d.get('host')} pid {d.get('pid')} "
            f"since {d.get('since', '?')}"
        )
    elif d.get("note"):
        lines.append(f"  driver: {d['note']}")
    if "plan" not in s:
        lines.append("  plan: not done (input not yet read)")
        return "\n".join(lines)
    p = s["plan"]
    rows = p["input_rows"] if p["input_rows"] is not None else "unknown until ingest"
    lines.append(f"  plan: {p['units']} unit(s), {rows} input rows ({p['kind']})")
    for phase in PHASES:
        ph = s["phases"][phase]
        speed = f", {ph['units_per_min']} units/min" if ph["units_per_min"] else ""
        eta = f", ETA {ph['eta_s']:.0f} s" if ph["eta_s"] is not None else ""
        lines.append(f"  {phase}: {ph['units_done']}/{ph['units_total']} units{speed}{eta}")
    lines.append(f"  dedup: {'done' if s['phases']['dedup']['done'] else 'not done'}")
    n = s["samples"]
    lines.append(f"  samples so far: {n['written']} written, {n['rejected']} rejected, {n['removed']} removed")
    if s["store_retries"]:
        lines.append(f"  store requests retried (throttling, dropped connections): {s['store_retries']}")
    for name, c in s["stages"].items():
        parts = [f"{c['items']} items"]
        if c["failed_total"]:
            parts.append(f"failed {c['failed_total']} ({', '.join(f'{k} {v}' for k, v in c['failed'].items())})")
        if c["rejected"]:
            parts.append(f"rejected {sum(c['rejected'].values())}")
        if c["removed"]:
            parts.append(f"removed {c['removed']}")
        parts += [f"{k} {v}" for k, v in sorted(c.get("counters", {}).items())]  # e.g. OCR lines dropped
        lines.append(f"  stage {name}: {', '.join(parts)}")
    if "funnel" in s:
        f = s["funnel"]
        lines.append(
            f"  funnel: {f['input_rows']} in = {f['written']} written + {f['rejected']} rejected"
            f" + {f['removed']} removed (balanced: {f['balanced']})"
        )
    elif s["state"] != "complete" and not d["alive"]:
        lines.append(f"  continue with: denseforge resume {root}")
    return "\n".join(lines)


def watch(root: UPath, every_s: float, as_json: bool, out) -> None:
    """Print the status every `every_s` seconds while a driver works on the run, then once more."""
    while True:
        s = run_status(root)
        print(json.dumps(s, sort_keys=True) if as_json else describe_run(root) + "\n", file=out, flush=True)
        if not s["driver"]["alive"]:
            return
        time.sleep(every_s)
