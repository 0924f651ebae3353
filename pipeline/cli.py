"""`denseforge` command line: run, resume, status, bench. Exit code 0 only on success."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from denseforge.errors import ConfigError, DenseforgeError, Interrupted
from denseforge.storage import is_local, location


def _cmd_run(args: argparse.Namespace) -> int:
    from denseforge.pipeline.config import dump_config
    from denseforge.pipeline.runner import run

    config = _load(args.config, args.set)
    out = location(args.out or f"runs/{config.run.name}-{time.strftime('%Y%m%d-%H%M%S')}", config.storage.options)
    if args.dry_run:
        from denseforge.pipeline.adapter import chains
        from denseforge.pipeline.ray_session import check_address, cluster_address, planned_resources
        from denseforge.pipeline.rundir import RunDir
        from denseforge.pipeline.runner import check_capacity, check_stores, preflight

        rd = RunDir(out)
        runs = preflight(config, rd)
        address = cluster_address(args.address, config.ray)
        check_address(address, config.ray.connect_timeout_s)
        check_stores(config, rd, fresh=True)
        check_capacity(config, runs, planned_resources(address, config.ray))
        if runs:
            steps = [
                c[0].instance
                if len(c) == 1
                else f"{' + '.join(r.instance for r in c)} (group {c[0].group}: one worker)"
                for c in chains(runs)
            ]
            print(f"# stages, in order: {', '.join(steps)}")
        print(dump_config(config), end="")
        return 0
    if args.source:
        from denseforge.pipeline.runner import derive

        if not args.out:
            raise ConfigError("--from needs --out: the new run's directory (the earlier run is never changed)")
        if args.against:
            raise ConfigError("--from and --against: derive the run first, then grow it in a run of its own")
        derive(config, out, location(args.source), args.address, args.allow_failed_units)
        return 0
    run(config, out, args.address, args.allow_failed_units, [location(a) for a in args.against])
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from denseforge.pipeline.bench import stdout_to_stderr
    from denseforge.pipeline.plan import load_cluster, make_plan, summary

    cluster = load_cluster(args.cluster)
    config = _load(args.config, args.set)
    with stdout_to_stderr():
        result = make_plan(config, args.pilot, args.target, cluster)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(summary(result))
    return 0


def _load(name: str, overrides: list[str]):
    """A config file, or the name of a shipped one, with `--set` overrides."""
    from denseforge.configs import shipped
    from denseforge.pipeline.config import load_config

    source = Path(name)
    builtin = shipped(name)
    if not source.exists() and builtin is not None:
        source = builtin  # `denseforge run demo`: a config that ships in the package
    return load_config(source, overrides)


def _cmd_cache(args: argparse.Namespace) -> int:
    from denseforge.pipeline.cache import check_root, prune, usage

    root = location(args.dir)
    if (root / "run.json").exists():  # a run directory: the cache it used
        from denseforge.pipeline.rundir import RunDir

        rd = RunDir(root)
        root = rd.cache_root(rd.load_config())
    check_root(root)
    if args.action == "prune":
        if args.max_gb is None and args.stage is None:
            raise ConfigError(
                "cache prune: say what to delete: --max-gb N (least recently used first) and/or --stage NAME"
            )
        n, size = prune(root, None if args.max_gb is None else int(args.max_gb * 2**30), args.stage)
        print(f"deleted {n} entries, {size / 2**20:.1f} MiB, from {root}")
        return 0
    rows = usage(root)
    if args.json:
        print(json.dumps({"cache": str(root), "stages": rows}, indent=1))
        return 0
    for row in rows:
        print(f"{row['stage']:<24} {row['entries']:>9} entries {row['bytes'] / 2**20:>10.1f} MiB  {row['folder']}")
    total = sum(r["bytes"] for r in rows)
    print(f"{'total':<24} {sum(r['entries'] for r in rows):>9} entries {total / 2**20:>10.1f} MiB  {root}")
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from denseforge.pipeline.runner import resume

    resume(location(args.dir), args.address, args.allow_failed_units, args.redo_changed)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from denseforge.pipeline.status import describe_run, run_status, watch

    root = location(args.dir)
    if args.watch is not None:
        watch(root, args.watch, args.json, sys.stdout)
    elif args.json:
        print(json.dumps(run_status(root), indent=1, sort_keys=True))
    else:
        print(describe_run(root))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from denseforge.pipeline.show import show

    print(show(location(args.dir), args.key, Path(args.out) if args.out else None))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from denseforge.pipeline.export_run import ExportSpec, export_run

    root = location(args.dir)
    spec = ExportSpec(
        args.format,
        args.layout,
        tuple(t.strip() for t in args.task.split(",") if t.strip()),
        args.negatives,
        args.min_pixels,
        args.max_pixels,
    )
    name = args.format if args.layout == "sharegpt" else f"{args.format}-{args.layout}"
    default = Path(str(root / "export" / name)) if is_local(root) else Path("export", name).resolve()
    out = Path(args.out) if args.out else default
    target, checked = export_run(root, spec, out, args.check, args.allow_incomplete, args.overwrite)
    print(target)
    if checked:
        bad = [c for c in checked if not c["ok"]]
        print(
            f"check: {len(checked) - len(bad)} of {len(checked)} records read back within the tolerance of "
            f"{spec.dialect().name}; pictures in {out / 'check'}",
            file=sys.stderr,
        )
        if bad:
            raise DenseforgeError(
                f"{len(bad)} of {len(checked)} exported records do not read back to their boxes "
                f"(first: {bad[0]['id']}); see {out / 'check' / 'check.json'}"
            )
    return 0


def _cmd_experts(args: argparse.Namespace) -> int:
    from denseforge.pipeline.flow import describe_plugins

    rows = describe_plugins()
    cols = ("name", "kind", "consumes", "resources", "package")
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) if rows else len(c) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in cols))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from denseforge.pipeline.bench import run_benchmark, stdout_to_stderr

    if args.name == "ingest":
        options = {
            "images": args.images or 1000,
            "processes": args.processes,
            "threads": args.threads,
            "repeats": args.repeats,
        }
    elif args.name == "fuse":
        options = {"samples": args.images or 256}
    elif args.name == "quality":
        options = {}
    elif args.name == "derive":
        options = {"images": args.images or 1000}
    elif args.name == "plan":
        options = {"images": args.images or 2000, "pilot": args.pilot or 200}
    elif args.name == "e2e":
        options = {"images": args.images or 1000, "overrides": tuple(args.set)}
    elif args.name == "io":
        options = {"images": 1000 if args.images is None else args.images, "store": args.store}
    elif args.name == "embed":
        options = {"images": args.images or 256, "batch_size": args.batch_size, "model": args.model}
    elif args.name == "dedup":
        from denseforge.pipeline.bench.dedup import Corpus

        options = {
            "sizes": tuple(args.sizes),
            "corpus": Corpus(kind=args.corpus),
            "epsilon": args.epsilon,
            "baseline_n": args.baseline_n,
            "pipeline": args.pipeline,
            "assign": args.assign,
            "overrides": tuple(args.set),
            "against": args.against_rows,
        }
    else:
        options = {"images": args.images or 96, "gpu": args.gpu}
    with stdout_to_stderr():
        result = run_benchmark(args.name, **options)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


def rows(text: str) -> int:
    """An argparse type: a number of rows, at least 1, in any float notation (1e9)."""
    try:
        value = float(text)
    except ValueError:
        value = 0
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of rows, at least 1 (e.g. 2000 or 1e9)")
    return int(value)


def count(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 0 or more")
    return value


def seconds(text: str) -> float:
    """An argparse type: a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    from denseforge.pipeline.export_run import FORMATS
    from denseforge.stages.export import LAYOUTS

    parser = argparse.ArgumentParser(prog="denseforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start a run from a YAML config")
    run.add_argument("config", help="a YAML file, or the name of a shipped config: demo, densefusion, laion")
    run.add_argument("--out", help="run directory (default runs/<run.name>-<time>)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="check what a run checks first (config, plugins, stores, the input is there, the worker pools "
        "fit the cluster) and print the stages and the resolved config; create nothing",
    )
    run.add_argument(
        "--from",
        dest="source",
        metavar="RUN_DIR",
        help="derive the new run (--out) from a finished one: its downloads, the phases the config leaves "
        "as they were and its cache of model outputs are reused; only what changed is computed",
    )
    run.add_argument(
        "--against",
        nargs="+",
        default=[],
        metavar="RUN_DIR",
        help="grow a dataset: remove from this run's input the copies (exact, perceptual, semantic) of images "
        "earlier runs wrote; dup_of names the run and key. The earlier runs are only read",
    )
    run.set_defaults(func=_cmd_run)
    resume = sub.add_parser("resume", help="finish a run that stopped (killed, crashed, interrupted)")
    resume.add_argument("dir")
    resume.add_argument(
        "--redo-changed",
        action="store_true",
        help="config.yaml changed what is written since the run started: redo the phases it affects for every unit",
    )
    resume.set_defaults(func=_cmd_resume)
    for p in (run, resume):
        p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
        p.add_argument(
            "--allow-failed-units",
            action="store_true",
            help="exit 0 even when some units failed to download (otherwise exit 3)",
        )
    p = sub.add_parser("status", help="where a run is: phase, units, samples, throughput, ETA, failures, driver")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true", help="one JSON object (for schedulers and monitoring)")
    p.add_argument(
        "--watch",
        type=seconds,
        nargs="?",
        const=10.0,
        default=None,
        metavar="SECONDS",
        help="print again every SECONDS (10) while a driver works on the run",
    )
    p.set_defaults(func=_cmd_status)
    p = sub.add_parser("show", help="render one sample with its boxes and caption to a PNG")
    p.add_argument("dir")
    p.add_argument("key")
    p.add_argument("--out", help="PNG path (default DIR/show/KEY.png)")
    p.set_defaults(func=_cmd_show)
    p = sub.add_parser("export", help="write a finished run in a training format")
    p.add_argument("dir")
    p.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="a table (llava, coco, refcoco) or the box dialect of the model you train (README: Export)",
    )
    p.add_argument(
        "--layout",
        default="sharegpt",
        choices=LAYOUTS,
        help="dialects: the fine-tuning framework's record layout (sharegpt: LLaVA/InternVL conversations)",
    )
    p.add_argument(
        "--task",
        default="caption,refer,region",
        help="dialects: comma list of caption, refer, region, kvg (default caption,refer,region)",
    )
    p.add_argument(
        "--negatives",
        action="store_true",
        help="kvg: also ask for an entity from another image that is not in this one (answer: not present)",
    )
    p.add_argument("--min-pixels", type=int, default=None, help="qwen2.5-vl: the processor's min_pixels (3136)")
    p.add_argument("--max-pixels", type=int, default=None, help="qwen2.5-vl: the processor's max_pixels (12845056)")
    p.add_argument("--check", type=count, default=0, metavar="N", help="dialects: read N records back, draw them")
    p.add_argument("--out", help="output folder, empty or new (default DIR/export/FORMAT[-LAYOUT])")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="export a run that is not complete (failed, interrupted, units missing); export.json records it",
    )
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser("cache", help="the cache of model outputs: its size per stage (du), or delete entries (prune)")
    p.add_argument("action", choices=["du", "prune"])
    p.add_argument("dir", help="a run directory (the cache it uses) or a cache folder (cache.path)")
    p.add_argument("--max-gb", type=float, default=None, help="prune: delete least recently used entries beyond this")
    p.add_argument("--stage", help="prune: delete every entry of this stage (an expert instance, fuse, clip-score)")
    p.add_argument("--json", action="store_true", help="du: one JSON object")
    p.set_defaults(func=_cmd_cache)
    p = sub.add_parser("plan", help="project a run's time, node-hours, cost and disk from pilot runs on your input")
    p.add_argument("config", help="a YAML file, or the name of a shipped config")
    p.add_argument("--pilot", type=count, required=True, metavar="N", help="pilot runs on the first N/4 and N rows")
    p.add_argument("--target", type=rows, required=True, metavar="M", help="input rows to project for, e.g. 1e9")
    p.add_argument("--cluster", metavar="FILE", help="YAML: nodes, cpus_per_node, gpus_per_node, price_per_node_hour")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--json", help="also write the whole plan (pilots, per-phase figures, assumptions) here")
    p.set_defaults(func=_cmd_plan)
    p = sub.add_parser("experts", help="list installed expert plugins")
    p.set_defaults(func=_cmd_experts)
    p = sub.add_parser("bench", help="benchmarks, JSON out")
    p.add_argument(
        "name", choices=["ingest", "dedup", "embed", "e2e", "derive", "plan", "experts", "fuse", "quality", "io"]
    )
    p.add_argument(
        "--images",
        type=int,
        default=None,
        help="ingest: corpus size (1000); embed: images (256); experts: images (96); fuse: samples (256); "
        "io: the whole run's images, 0 for files only (1000); derive: images (1000); plan: the real run (2000)",
    )
    p.add_argument("--pilot", type=count, default=None, help="plan: the pilot's rows (200)")
    p.add_argument("--batch-size", type=int, default=64, help="embed: images per forward pass (64)")
    p.add_argument("--model", default="ViT-B-32", help="embed: open_clip architecture, random weights (ViT-B-32)")
    p.add_argument("--processes", type=int, default=2, help="ingest: shards at once")
    p.add_argument("--threads", type=int, default=16, help="ingest: download threads per shard")
    p.add_argument("--repeats", type=int, default=2, help="ingest: alternating runs per side; the best counts")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="dedup: numbers of embeddings")
    p.add_argument("--epsilon", type=float, default=0.05, help="dedup: duplicate when cosine > 1 - epsilon")
    p.add_argument("--baseline-n", type=int, default=20_000, help="dedup: n for the brute-force baseline")
    p.add_argument(
        "--pipeline",
        type=int,
        default=0,
        metavar="N",
        help="dedup: instead, the run's own Ray dedup phase on N embeddings stored as float16 unit files",
    )
    p.add_argument(
        "--assign",
        type=int,
        default=0,
        metavar="K",
        help="dedup: instead, assignment of --sizes[0] rows to a two-level index of K centroids",
    )
    p.add_argument(
        "--against",
        dest="against_rows",
        type=count,
        default=0,
        metavar="M",
        help="dedup, with --pipeline N: run --against an earlier run of M images, N new rows of which 10%% copy them",
    )
    p.add_argument(
        "--corpus",
        choices=["isotropic", "hierarchical"],
        default="isotropic",
        help="dedup: topics drawn independently (the worst case), or inside broad topics as real embeddings are",
    )
    p.add_argument("--store", help="io: an object-store URL to measure (default: a loopback S3 server)")
    p.add_argument("--gpu", action="store_true", help="experts: share one GPU between the experts in equal fractions")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="e2e: change the demo's config, e.g. perceive.experts.0.resources.max_concurrency=3; "
        "dedup: its config, e.g. dedup.matmul=float32",
    )
    p.add_argument("--json", help="also write the result to this file")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    # albumentations (imported by img2dataset) phones home for updates unless told not to.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    args = build_parser().parse_args(argv)
    from denseforge.pipeline.progress import close_open_bars
    from denseforge.pipeline.ray_session import stop_cleanly_on_signals

    stop_cleanly_on_signals()
    try:
        code = args.func(args)
        sys.stdout.flush()  # inside the try: a reader that went away is a broken pipe here, not at exit
        return code
    except DenseforgeError as err:
        close_open_bars()
        print(f"denseforge: error: {err}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:  # `denseforge status DIR | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except OSError as err:  # before a run directory could log anything: read-only --out, a full disk
        close_open_bars()
        where = f" {err.filename}" if err.filename else ""
        print(f"denseforge: error: cannot write{where}: {err.strerror or err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        close_open_bars()
        how = "stopped by SIGTERM" if isinstance(err, Interrupted) and err.exit_code == 143 else "interrupted"
        print(f"denseforge: {how}; continue with `denseforge resume DIR`", file=sys.stderr)
        return err.exit_code if isinstance(err, Interrupted) else 130


if __name__ == "__main__":
    sys.exit(main())
