"""The habits CI keeps: ruff (lint and format) and mypy over the whole package, clean."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing_and_the_code_is_formatted():
    lint = _run("ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    form = _run("ruff", "format", "--check", ".")
    assert form.returncode == 0, form.stdout + form.stderr


def test_mypy_checks_every_module_of_the_package_and_finds_nothing():
    done = _run("mypy")
    assert done.returncode == 0, done.stdout + done.stderr
    # through the links to the top-level folders
    modules = sum(
        name.endswith(".py") for _, _, names in os.walk(ROOT / "denseforge", followlinks=True) for name in names
    )
    assert modules > 50
    assert f"no issues found in {modules} source files" in done.stdout


def test_mypy_resolves_denseforge_imports_to_the_top_level_folders(tmp_path):
    # the layout's promise: tools follow `denseforge.stages` to stages/ (here: a misspelt attribute
    # is found on a class mypy could only read through that resolution)
    probe = tmp_path / "probe.py"
    probe.write_text("from denseforge.stages.stage import Resources\n\nResources().batch_sizes\n")
    done = _run("mypy", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(probe))
    assert done.returncode == 1
    assert '"Resources" has no attribute "batch_sizes"' in done.stdout, done.stdout


def _imports(folder: Path) -> dict[str, set[str]]:
    """denseforge modules each file of `folder` imports (at the top or inside functions)."""
    import ast

    found: dict[str, set[str]] = {}
    for file in sorted(folder.glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("denseforge"):
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names if a.name.startswith("denseforge")}
        found[file.name] = names
    return found


def test_the_layers_import_downwards_only():
    # denseforge/ (errors, storage, plugin, observations, models) under experts/ under stages/
    # under pipeline/: no cycle between stages and experts, and nothing below knows Ray's wiring
    bottom = {f: m for f, m in _imports(ROOT / "denseforge").items()}
    assert bottom and not {
        f: m
        for f, m in bottom.items()
        if any(x.startswith(("denseforge.stages", "denseforge.experts", "denseforge.pipeline")) for x in m)
    }
    experts = _imports(ROOT / "experts")
    assert "base.py" in experts and not {
        f: m for f, m in experts.items() if any(x.startswith(("denseforge.stages", "denseforge.pipeline")) for x in m)
    }
    stages = _imports(ROOT / "stages")
    assert "perceive.py" in stages and not {
        f: m for f, m in stages.items() if any(x.startswith("denseforge.pipeline") for x in m)
    }
