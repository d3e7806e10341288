"""tokenmill: batch LLM jobs on open-weight models, Parquet in, Parquet out, with per-record cost.

The data's way through the package: `read` -> `prompt` -> `generate` -> `parse`
-> `account` -> `write`, composed in `processor`, run by `runner`.
"""

__version__ = "0.1.0"
