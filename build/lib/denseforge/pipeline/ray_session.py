"""Starting Ray: an embedded local cluster by default, or joining one; shared resource settings."""

from __future__ import annotations

import logging
import os

from denseforge.pipeline.config import RayConfig

OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "YOLO_OFFLINE", "YOLO_AUTOINSTALL",
                    "YOLO_CONFIG_DIR", "NO_ALBUMENTATIONS_UPDATE", "RAY_AUTH_MODE")
# Reading/writing units is I/O, not compute: a quarter CPU each leaves room for the model pools.
LIGHT_TASK_CPUS = 0.25


def start_ray(cfg: RayConfig, address: str | None) -> None:
    """Join `address`, or start an embedded local cluster sized by the config."""
    import ray

    env = {k: os.environ[k] for k in OFFLINE_SWITCHES if k in os.environ}
    common = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True,
                  runtime_env={"env_vars": env} if env else None, configure_logging=True)
    address = address or cfg.address
    if address:
        ray.init(address=address, **common)
    else:
        ray.init(num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_memory, **common)
    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # our own bars report progress
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # One block is one unit all the way to the writer, which checks it got the whole unit.
    ctx.target_max_block_size = 2 * 2**30
