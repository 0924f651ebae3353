"""Starting Ray: an embedded local cluster by default, or joining one; shared resource settings."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

from denseforge.pipeline.config import RayConfig

OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "YOLO_OFFLINE", "YOLO_AUTOINSTALL",
                    "YOLO_CONFIG_DIR", "NO_ALBUMENTATIONS_UPDATE", "RAY_AUTH_MODE")
# Reading/writing units is I/O, not compute: a quarter CPU each leaves room for the model pools.
LIGHT_TASK_CPUS = 0.25


QUIET_RAY = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_USAGE_STATS_PROMPT_ENABLED": "0"}
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy",
              "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
# A closed port on this host: a request through it is refused before anything leaves the machine.
NOWHERE = "http://127.0.0.1:9"


@contextmanager
def _system_processes_offline():
    """Ray's dashboard process loads its usage-stats module even with include_dashboard=False and
    usage stats off, and that module asks cloud metadata endpoints (169.254.169.254,
    metadata.google.internal) at every start, through any http_proxy (Ray 2.5x; no switch turns
    it off). While `ray.init` spawns Ray's own processes they see a proxy that goes nowhere; the
    driver's environment is restored right after, and workers get the user's own proxy settings
    back through the job's runtime environment."""
    saved = {k: os.environ.get(k) for k in PROXY_VARS}
    for k in PROXY_VARS:
        os.environ.pop(k, None)
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        os.environ[k] = NOWHERE
    try:
        yield {k: v or "" for k, v in saved.items()}  # "" reads as unset for urllib, requests, httpx
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def one_off(fn, **options):
    """`fn` as a Ray task whose worker exits when it returns: for a task that loads models or
    imports torch once (an idle worker keeps that memory, ~0.8 GB for torch, for the whole run
    while the cluster has fewer workers than CPUs)."""
    import ray

    return ray.remote(max_calls=1, **options)(fn)


def start_ray(cfg: RayConfig, address: str | None) -> str | None:
    """Join `address`, or start an embedded local cluster sized by the config; returns the folder
    of the workers' logs when Ray tells it. A run sends nothing over the network of its own
    accord: usage stats and Ray's cloud probes stay off."""
    for key, value in QUIET_RAY.items():
        os.environ.setdefault(key, value)  # before ray.init: its processes inherit them
    import ray

    env = {k: os.environ[k] for k in (*OFFLINE_SWITCHES, *QUIET_RAY) if k in os.environ}
    # workers' own output (library warnings, tracebacks a library prints) stays in Ray's log files,
    # not on the console: there, progress and one line per problem
    common = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                  configure_logging=True)
    address = address or cfg.address
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, **common)
    else:
        with _system_processes_offline() as proxies:
            ray.init(num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_memory,
                     runtime_env={"env_vars": {**env, **proxies}}, **common)
    from ray.data import DataContext


    logging.getLogger("ray.data").setLevel(logging.ERROR)  # our own bars report progress
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # One block is one unit all the way to the writer, which checks it got the whole unit.
    ctx.target_max_block_size = 2 * 2**30
    try:  # where the workers' output went (a private attribute: best effort)
        return ray._private.worker._global_node.get_logs_dir_path()
    except Exception:  # noqa: BLE001
        return None
