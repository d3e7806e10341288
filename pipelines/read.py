"""Read: find the input shards, check them against the spec, and open them as a Ray dataset.

The checks read only Parquet footers, so they are cheap and happen before any
engine starts: a missing path, an unreadable shard or a missing column stops the
run with a message naming the file and column.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.config.job import JobSpec
from pipelines.errors import InputError
from pipelines.storage import StorageOptions, arrow_filesystem, filesystem_for


@dataclasses.dataclass(frozen=True)
class Shard:
    path: str  # as the filesystem names it (no scheme)
    num_rows: int
    schema: pa.Schema


@dataclasses.dataclass(frozen=True)
class InputPlan:
    """The checked input: its shards and the filesystem that reads them."""

    uri: str
    shards: list[Shard]
    filesystem: pafs.FileSystem
    columns: list[str]

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)

    @property
    def paths(self) -> list[str]:
        return [s.path for s in self.shards]


def _columns_of_use(spec: JobSpec) -> dict[str, str]:
    """Each column the job reads, with the spec key that asks for it."""
    if spec.input.format == "openai_batch":  # the staged requests (`pipelines.openai_batch`)
        return {c: "the staged OpenAI batch requests" for c in spec.read_columns}
    uses = {spec.id_column: "input.id_column"}
    if spec.prompt.image_column:
        uses.setdefault(spec.prompt.image_column, "prompt.image_column")
    for c in spec.prompt.columns:
        uses.setdefault(c, "a prompt placeholder")
    for c in spec.output.passthrough:
        uses.setdefault(c, "output.passthrough")
    if spec.classify and spec.classify.label_column:
        uses.setdefault(spec.classify.label_column, "classify.label_column")
    for field, c in (spec.extract.truth_columns if spec.extract else {}).items():
        uses.setdefault(c, f"extract.truth_columns.{field}")
    for c in spec.input.columns or []:
        uses.setdefault(c, "input.columns")
    return uses


def plan_input(spec: JobSpec, storage: StorageOptions, uri: str | None = None) -> InputPlan:
    """List and check the input shards named by `spec.input.path` (or `uri`: staged OpenAI batch requests)."""
    uri = uri or spec.input.path
    fs, root = filesystem_for(uri, storage)
    try:
        exists = fs.exists(root)
        is_dir = exists and fs.isdir(root)
        files = sorted(p for p in fs.find(root) if p.endswith(".parquet")) if is_dir else [root]
    except Exception as exc:  # noqa: BLE001 - any store error is the user's to see, with the path
        raise InputError(f"input.path {uri}: cannot list it: {exc}") from None
    if not exists:
        raise InputError(f"input.path {uri}: no such file or folder")
    if not files:
        raise InputError(f"input.path {uri}: the folder holds no .parquet files")

    def footer(path: str) -> Shard:
        try:
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
                return Shard(path=path, num_rows=meta.num_rows, schema=meta.schema.to_arrow_schema())
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{_display(uri, root, path)}: not a readable Parquet file: {exc}") from None

    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        shards = list(pool.map(footer, files))

    uses = _columns_of_use(spec)
    for shard in shards:
        for column, why in uses.items():
            if column not in shard.schema.names:
                raise InputError(
                    f"{_display(uri, root, shard.path)}: column {column!r} ({why}) is missing; "
                    f"the file has {shard.schema.names}"
                )
    return InputPlan(uri=uri, shards=shards, filesystem=arrow_filesystem(fs), columns=spec.read_columns)


def _display(uri: str, root: str, path: str) -> str:
    """A shard's path as the user wrote the input path (with its scheme)."""
    return uri.rstrip("/") + path[len(root.rstrip("/")) :] if path.startswith(root) and "://" in uri else path


def read_dataset(plan: InputPlan):
    """The input as a lazy Ray dataset of only the columns the job needs."""
    import ray.data

    return ray.data.read_parquet(plan.paths, filesystem=plan.filesystem).select_columns(plan.columns)
