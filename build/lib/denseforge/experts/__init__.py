"""Vision experts and their plugin registry.

A plugin subclasses `Expert`, registers under the entry-point group `denseforge.experts` and
checks itself with `check_expert(MyExpert)`.
"""

from denseforge.experts.base import Expert, ExpertInput, Resources, clip_box
from denseforge.experts.contract import ContractError, check_expert

__all__ = ["Expert", "ExpertInput", "Resources", "clip_box", "check_expert", "ContractError"]
