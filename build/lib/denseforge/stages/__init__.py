"""Stages: pure per-sample transforms, no Ray inside. The protocol a plugin stage implements."""

from denseforge.stages.stage import Item, Rejection, Removal, Resources, Stage, Verdict

__all__ = ["Item", "Rejection", "Removal", "Resources", "Stage", "Verdict"]
