"""Typer commands, one module per group; each exposes ``register(app)``."""
