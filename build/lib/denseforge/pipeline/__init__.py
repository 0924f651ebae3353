"""The Ray DAG, configuration, run directory, CLI."""
