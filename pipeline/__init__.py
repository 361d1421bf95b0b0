"""Orchestration only: manifest schema, run context, runner, status and the CLI (`python -m pipeline`)."""
