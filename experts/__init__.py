"""Vision experts and their plugin registry."""
