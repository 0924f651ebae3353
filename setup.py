"""Packaging: the top-level folders are the `denseforge` subpackages (docs/design.md: the layout).

Every folder below them that holds an `__init__.py` is a package of the wheel, found here rather
than listed by hand, so a new subfolder cannot import under `pip install -e` and be missing from
the wheel that cluster nodes install. CI builds that wheel and runs the demo from it.
"""

from pathlib import Path

from setuptools import setup

ROOTS = {"denseforge": "denseforge", "denseforge.pipeline": "pipeline", "denseforge.stages": "stages",
         "denseforge.experts": "experts", "denseforge.configs": "configs"}


def packages() -> tuple[list[str], dict[str, str]]:
    names, dirs = [], {}
    for package, folder in ROOTS.items():
        for init in sorted(Path(folder).rglob("__init__.py")):
            parts = init.parent.relative_to(folder).parts
            if "__pycache__" in parts:
                continue
            name = ".".join((package, *parts))
            names.append(name)
            dirs[name] = init.parent.as_posix()
    return names, dirs


names, dirs = packages()
setup(
    packages=names,
    package_dir=dirs,
    package_data={
        "denseforge.stages": ["model_configs/*.json", "prompts/*.txt", "prompts/*.tsv"],
        "denseforge.experts": ["vocabularies/*.txt", "models/*.onnx", "models/NOTICE", "models/LICENSE.*"],
        "denseforge.configs": ["*.yaml"],
    },
)
