"""The base of every settings model: the config sections are the stages' own settings."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Settings(BaseModel):
    """Unknown keys are errors; assignments are validated too (`--set`, the demo's input path)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
