"""Packaging: `denseforge/` is the package; its `pipeline`, `stages`, `experts` and `configs` are
links to the top-level folders (docs/design.md: the layout), so every tool resolves
`denseforge.*` imports to real files.

Every folder below it that holds an `__init__.py` is a package of the wheel, found here (links
followed) rather than listed by hand, so a new subfolder cannot import under `pip install -e` and
be missing from the wheel that cluster nodes install. CI builds that wheel and runs the demo from it.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["denseforge", "denseforge.*"]),
    package_data={
        "denseforge": ["model_configs/*.json"],
        "denseforge.stages": ["prompts/*.txt", "prompts/*.tsv"],
        "denseforge.experts": ["vocabularies/*.txt", "models/*.onnx", "models/NOTICE", "models/LICENSE.*"],
        "denseforge.configs": ["*.yaml"],
    },
)
