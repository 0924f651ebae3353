"""The configs that ship with denseforge: `denseforge run demo` (or `densefusion`, `laion`) finds
them by name, so a pip install runs without the repository checkout."""

from pathlib import Path

SHIPPED = Path(__file__).parent


def shipped(name: str) -> Path | None:
    """The shipped config called `name` (with or without `.yaml`), or None."""
    path = SHIPPED / (name if name.endswith(".yaml") else f"{name}.yaml")
    return path if path.is_file() and path.parent == SHIPPED else None
