"""Models tokenmill prepares itself, and resolving an engine profile's model."""

from pipelines.models.embedded import EMBEDDED, model_revision, prepare, resolve_engine_paths, resolve_model

__all__ = ["EMBEDDED", "model_revision", "prepare", "resolve_engine_paths", "resolve_model"]
