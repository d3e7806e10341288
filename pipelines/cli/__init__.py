"""The `tokenmill` command. Library code logs; only this package prints."""

from pipelines.cli.app import main

__all__ = ["main"]
