"""The repository's own documentation: the README is a short user's guide that points only inside
the repository, the configuration reference is the settings models' own, and the site builds in
MkDocs' strict mode."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from denseforge.pipeline.config import reference

ROOT = Path(__file__).resolve().parents[2]


def test_the_configuration_reference_is_made_from_the_settings_models():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == reference(), (
        'docs/configuration.md is stale; regenerate it: python -c "from '
        "denseforge.pipeline.config import reference; print(reference(), end='')\" "
        "> docs/configuration.md"
    )
    assert "| `storage.options` |" in page and "| `perceive.experts[].resources` |" in page


def test_the_readme_is_a_short_guide_whose_links_stay_in_the_repository():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "../shared" not in text and "DESIGN.md" not in text
    assert not re.search(r"\b[0-9a-f]{7,40}\b(?= |\)|,)", re.sub(r"`[^`]*`", "", text))  # no commit ids
    links = re.findall(r"\]\(([^)#]+)", text)
    assert links and all((ROOT / link).exists() for link in links if "://" not in link), links
    assert text.count("```bash\npython3 -m venv .venv") == 2  # exactly the two set-up commands


def test_the_docs_build_in_strict_mode(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "site" / "configuration" / "index.html").exists()
