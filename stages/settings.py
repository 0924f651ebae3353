"""The base of every settings model: the config sections are the stages' own settings."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Settings(BaseModel):
    """Unknown keys are errors; assignments are validated too (`--set`, the demo's input path)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def group_field() -> Any:
    """The `group` key of an expert and of a plugin stage."""
    return Field(
        None,
        min_length=1,
        description="stages with the same group, next to each other in the flow, share "
        "one worker: one process (and CUDA context) for their models, each "
        "image decoded once; the worker asks for the sum of their CPUs and "
        "GPUs, and they need the same concurrency",
    )
