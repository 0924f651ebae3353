"""Starting Ray: an embedded local cluster by default, or joining one; shared resource settings."""

from __future__ import annotations

import _thread
import logging
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any

from denseforge.errors import Interrupted, NodeLostError, SetupError
from denseforge.pipeline.config import Config, RayConfig

OFFLINE_SWITCHES = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "YOLO_OFFLINE",
    "YOLO_AUTOINSTALL",
    "YOLO_CONFIG_DIR",
    "NO_ALBUMENTATIONS_UPDATE",
    "RAY_AUTH_MODE",
)
# Reading/writing units is I/O, not compute: a quarter CPU each leaves room for the model pools.
LIGHT_TASK_CPUS = 0.25


QUIET_RAY = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_USAGE_STATS_PROMPT_ENABLED": "0"}
PROXY_VARS = (
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
)
LOOPBACK = "127.0.0.1,localhost,::1"
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
        # "" reads as unset for urllib, requests, httpx. Loopback never goes through a proxy: with
        # ray[default] installed each worker exports metrics over gRPC to its node's agent on
        # 127.0.0.1, and gRPC honours http_proxy (seen: CONNECTs to the user's proxy)
        restored = {k: v or "" for k, v in saved.items()}
        for k in ("no_proxy", "NO_PROXY"):
            restored[k] = ",".join(filter(None, (restored[k], LOOPBACK)))
        yield restored
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
    common: dict[str, Any] = dict(
        include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False, configure_logging=True
    )
    address = cluster_address(address, cfg)
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, **common)
    else:
        with _system_processes_offline() as proxies:
            ray.init(
                address="local",  # a new embedded cluster even when `ray start` left one on this machine
                num_cpus=cfg.num_cpus,
                object_store_memory=cfg.object_store_memory,
                runtime_env={"env_vars": {**env, **proxies}},
                **common,
            )
    from ray.data import DataContext

    stop_cleanly_on_signals()  # after ray.init, which installs a SIGTERM handler of its own
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # our own bars report progress
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # One block is one unit all the way to the writer, which checks it got the whole unit.
    ctx.target_max_block_size = 2 * 2**30
    try:  # where the workers' output went (a private attribute: best effort)
        node: Any = ray._private.worker._global_node
        return node.get_logs_dir_path()
    except Exception:  # noqa: BLE001
        return None


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def stop_cleanly_on_signals() -> None:
    """SIGTERM (scancel, preemption, a Kubernetes pod's end) and SIGINT raise `Interrupted` in the
    driver: the run is recorded `interrupted` and Ray is shut down, exit 143 / 130. Ray's own
    SIGTERM handler calls sys.exit, which skipped both and crashed Ray's core worker at exit."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _interrupt)


def cluster_address(address: str | None, cfg: RayConfig) -> str | None:
    """The cluster to join: `--address`, else `ray.address`, else RAY_ADDRESS (set by `ray job
    submit` for the job's driver); None starts an embedded local cluster."""
    return address or cfg.address or os.environ.get("RAY_ADDRESS") or None


def planned_resources(address: str | None, cfg: RayConfig) -> dict[str, float]:
    """The CPUs and GPUs a run would get, for `--dry-run`: a running cluster's totals (joined and
    left; nothing is started there), else what the embedded cluster would see on this machine."""
    if address:
        import ray

        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        try:
            return dict(ray.cluster_resources())
        finally:
            ray.shutdown()
    import torch

    return {"CPU": float(cfg.num_cpus or os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def check_address(address: str | None, timeout_s: float) -> None:
    """An unreachable `--address` is one line within `timeout_s`, before anything is created
    (`ray.init` would retry for minutes). `auto` and `local` are Ray's to resolve."""
    if not address or address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise SetupError(
            f"--address {address!r}: expected HOST:PORT (the head's GCS port, 6379 by default) or ray://HOST:PORT"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise SetupError(
            f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}; is `ray start --head` "
            f"running there (and the port open)?"
        ) from None


def alive_nodes() -> dict[str, str]:
    """Node id -> a readable name (IP and the id's start) of every node alive now."""
    import ray

    return {
        n["NodeID"]: f"{n.get('NodeManagerAddress', '?')} ({n['NodeID'][:8]})" for n in ray.nodes() if n.get("Alive")
    }


def check_nodes(root_is_local: bool, config: Config, inputs_local: bool) -> None:
    """On a cluster of several nodes, nothing may assume a worker sees the driver's disk: a local
    `--out` (or local webdataset / folder input, read by workers) is refused unless the config says
    it is on a disk every node mounts (`storage.shared_local`)."""
    nodes = alive_nodes()
    if len(nodes) < 2 or config.storage.shared_local:
        return
    if root_is_local:
        raise SetupError(
            f"the Ray cluster has {len(nodes)} nodes but --out is a local folder, which the other "
            "nodes cannot see; use an object store URL (s3://, gs://, az://) or, if the folder is on a "
            "disk every node mounts at the same path, set storage.shared_local: true"
        )
    if inputs_local:
        raise SetupError(
            f"the Ray cluster has {len(nodes)} nodes but input.path ({config.input.path}) is local and "
            f"input.kind {config.input.kind} is read by the workers; put it in the object store or set "
            "storage.shared_local: true"
        )


class NodeWatch:
    """Watches the cluster's nodes from the driver while a run works. A lost node is reported at
    once; Ray's retries usually finish its work elsewhere. If the run then makes no progress (no
    unit finishes) for `timeout_s`, the driver is interrupted with `NodeLostError`, naming the
    node, instead of waiting forever for a worker pool that cannot be placed again."""

    def __init__(self, timeout_s: float, progress: Any, every_s: float = 5.0):
        self.timeout_s, self.progress, self.every_s = timeout_s, progress, every_s
        self.lost: dict[str, float] = {}
        self.reason: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="denseforge-nodes", daemon=True)

    def __enter__(self) -> NodeWatch:
        self._known = alive_nodes()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, self._fail)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.every_s + 5)

    def _fail(self, signum: int, frame: Any) -> None:
        raise NodeLostError(self.reason or "a Ray node was lost")

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                now_alive = alive_nodes()
            except Exception:  # noqa: BLE001 - the head itself is going: ray.get reports that
                continue
            for node, name in self._known.items():
                if node not in now_alive and name not in self.lost:
                    self.lost[name] = time.monotonic()
                    self.progress.warn(f"Ray node {name} was lost; its work is retried on the other nodes")
            self._known.update(now_alive)
            if not self.lost:
                continue
            since = max(max(self.lost.values()), self.progress.last_update)
            if time.monotonic() - since > self.timeout_s:
                names = ", ".join(self.lost)
                self.reason = (
                    f"Ray node {names} was lost and the run made no progress for {self.timeout_s:.0f} s "
                    "(ray.node_loss_timeout_s); bring nodes back or lower the stages' worker pools, then "
                    "`denseforge resume`"
                )
                _thread.interrupt_main(signal.SIGUSR1)
                return
