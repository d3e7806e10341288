"""Read: find the input shards, check them against the job, and stream their rows with their provenance.

The checks read only Parquet footers, so they are cheap and happen before any
engine starts. A missing path stops the run; a shard that cannot be read, or
whose columns do not fit the job, is quarantined (listed with its reason in the
summary and the rejects) and the other shards go on. A column whose type
differs from the other shards' is cast when the cast loses nothing (an integer
id read as a string), else its shard is quarantined with the column named;
nothing is silently misread.

Every row leaves this stage with `_shard` (the shard's key), `_row` (its index
in the shard), `reject_code` (a `Reason`, or null) and `reject` (why it cannot
be processed): text that is not valid UTF-8 is rejected here, with the column
named, and so are repeated ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.config.job import JobSpec
from pipelines.config.storage import StorageOptions
from pipelines.errors import InputError
from pipelines.io.storage import arrow_filesystem, input_files
from pipelines.schema import Reason

PROVENANCE = ["_shard", "_row", "reject_code", "reject"]


@dataclasses.dataclass(frozen=True)
class Shard:
    key: str  # stable across runs: derived from the path
    path: str  # as the filesystem names it (no scheme)
    uri: str  # as the user wrote the input path (with its scheme)
    num_rows: int
    schema: pa.Schema


@dataclasses.dataclass(frozen=True)
class Quarantined:
    """A shard set aside whole, before or while it is read."""

    key: str
    uri: str
    code: Reason  # `unreadable` or `schema`
    message: str

    @property
    def reason(self) -> str:
        """For people: the code and the message."""
        return f"{self.code}: {self.message}"


@dataclasses.dataclass(frozen=True)
class InputPlan:
    """The checked input: the shards to read, the ones set aside, and the schema every row is read as."""

    uri: str
    shards: list[Shard]
    quarantined: list[Quarantined]
    filesystem: pafs.FileSystem
    columns: list[str]
    schema: pa.Schema  # the job's columns, with the types every shard is cast to

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)

    @property
    def paths(self) -> list[str]:
        return [s.path for s in self.shards]

    def without(self, keys: set[str]) -> "InputPlan":
        """The plan less the shards whose keys are given (committed by an earlier attempt)."""
        return dataclasses.replace(self, shards=[s for s in self.shards if s.key not in keys],
                                   quarantined=[q for q in self.quarantined if q.key not in keys])


def shard_key(path: str) -> str:
    return hashlib.sha1(path.encode()).hexdigest()[:16]


def _columns_of_use(spec: JobSpec) -> dict[str, str]:
    """Each column the job reads, with the spec key that asks for it."""
    if spec.input.format == "openai_batch":  # the staged requests (`pipelines.io.openai_batch`)
        return {c: "the staged OpenAI batch requests" for c in spec.read_columns}
    uses = {spec.id_column: "input.id_column"}
    if spec.prompt is not None and spec.prompt.image_column:
        uses.setdefault(spec.prompt.image_column, "prompt.image_column")
    for c in spec.prompt_columns:
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


def _base(t: pa.DataType) -> pa.DataType:
    if pa.types.is_dictionary(t):
        return t.value_type
    if pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_large_binary(t):
        return pa.binary()
    return t


def safe_cast(source: pa.DataType, target: pa.DataType) -> bool:
    """Whether every value of `source` has one exact counterpart in `target`."""
    source, target = _base(source), _base(target)
    if source == target:
        return True
    if pa.types.is_integer(source):
        if pa.types.is_string(target):
            return True
        if pa.types.is_integer(target):
            return target.bit_width > source.bit_width or (
                target.bit_width == source.bit_width and pa.types.is_signed_integer(source)
                == pa.types.is_signed_integer(target))
        return pa.types.is_float64(target) and source.bit_width <= 32
    if pa.types.is_floating(source) and pa.types.is_floating(target):
        return target.bit_width >= source.bit_width
    if pa.types.is_timestamp(source) and pa.types.is_timestamp(target):
        return source.tz == target.tz
    return pa.types.is_null(source)


def _display(uri: str, root: str, path: str) -> str:
    """A shard's path as the user wrote the input path (with its scheme)."""
    return uri.rstrip("/") + path[len(root.rstrip("/")) :] if path.startswith(root) and "://" in uri else path


def plan_input(spec: JobSpec, storage: StorageOptions, uri: str | None = None) -> InputPlan:
    """List and check the input shards named by `spec.input.path` (or `uri`: staged OpenAI batch requests).

    Raises InputError when the path is missing or empty, or when no shard is usable.
    """
    uri = uri or spec.input.path
    fs, root, files = input_files(uri, storage, ".parquet", ".parquet files")

    def footer(path: str) -> Shard | Quarantined:
        shown = _display(uri, root, path)
        try:
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
                return Shard(key=shard_key(shown), path=path, uri=shown, num_rows=meta.num_rows,
                             schema=meta.schema.to_arrow_schema())
        except Exception as exc:  # noqa: BLE001
            return Quarantined(shard_key(shown), shown, Reason.UNREADABLE, f"not a readable Parquet file: {exc}")

    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        found = list(pool.map(footer, files))

    uses = _columns_of_use(spec)
    shards: list[Shard] = []
    quarantined = [q for q in found if isinstance(q, Quarantined)]
    target: dict[str, pa.Field] = {}
    for shard in (s for s in found if isinstance(s, Shard)):
        missing = [(c, why) for c, why in uses.items() if c not in shard.schema.names]
        if missing:
            column, why = missing[0]
            quarantined.append(Quarantined(shard.key, shard.uri, Reason.SCHEMA, f"column {column!r} ({why}) is "
                                                                                f"missing; the file has {shard.schema.names}"))
            continue
        # The first usable shard fixes each column's type; the others must cast to it exactly.
        bad = None
        for c in spec.read_columns:
            field = shard.schema.field(c)
            if c not in target:
                target[c] = pa.field(c, _base(field.type))
            elif not safe_cast(field.type, target[c].type):
                bad = f"column {c!r} is {field.type} here but {target[c].type} in the other shards"
                break
        if bad:
            quarantined.append(Quarantined(shard.key, shard.uri, Reason.SCHEMA, bad))
        else:
            shards.append(shard)
    if not shards:
        reasons = "; ".join(f"{q.uri}: {q.reason}" for q in quarantined)
        raise InputError(f"input.path {uri}: no usable shard: {reasons}")
    schema = pa.schema([target[c] for c in spec.read_columns])
    return InputPlan(uri=uri, shards=shards, quarantined=quarantined, filesystem=arrow_filesystem(fs),
                     columns=spec.read_columns, schema=schema)


def _valid_utf8(column: pa.ChunkedArray) -> list[bool]:
    """Per value: whether it is valid UTF-8 (Parquet readers do not check string bytes)."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    out = []
    for value in column.cast(pa.binary()).to_pylist():
        try:
            value is None or value.decode("utf-8")
            out.append(True)
        except UnicodeDecodeError:
            out.append(False)
    return out


# The driver's pass holds every id: measured, about 115 bytes an id (1.9 GB for 16M ids). Beyond this many
# rows the pass runs in the cluster, and the driver holds only the repeated ids.
DRIVER_DUPLICATE_PASS_MAX_ROWS = 2_000_000


def duplicate_pass_on_cluster(plan: InputPlan) -> bool:
    """Whether `find_duplicates` runs on the Ray cluster (which the caller joins first) rather than here."""
    return sum(s.num_rows for s in plan.shards) > DRIVER_DUPLICATE_PASS_MAX_ROWS


def find_duplicates(plan: InputPlan, id_column: str, policy: str, storage: StorageOptions
                    ) -> dict[str, dict[int, str]]:
    """The rows to reject as repeated ids (`duplicate_id`), by shard key and row index, with the message.

    Reads only the id column. `keep_first` keeps the first occurrence in shard
    order, `reject` none. Null ids are left to the prompt stage. A small input is
    checked in the driver (polars, streaming); a larger one in the cluster
    (`_duplicates_in_cluster`), so that the driver's memory follows the number of
    repeated ids, not the number of ids.
    """
    if duplicate_pass_on_cluster(plan):
        return _duplicates_in_cluster(plan, id_column, policy)
    return _duplicates_in_driver(plan, id_column, policy, storage)


def shard_ids(table: pa.Table, *, filesystem: pafs.FileSystem, id_column: str, batch_rows: int = 65536,
              only: frozenset[str] | None = None) -> Iterator[pa.Table]:
    """Ray Data generator UDF: for each shard row (`key`, `order`, `path`), its ids as text with their row,
    or, given `only`, just the rows whose id is in it. A shard that fails to read yields what it read: the
    main read quarantines it."""
    wanted = pa.array(sorted(only), pa.string()) if only is not None else None
    for shard in table.to_pylist():
        start = 0
        try:
            with filesystem.open_input_file(shard["path"]) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=[id_column]):
                    ids = pc.cast(batch.column(0), pa.string())
                    part = pa.table({"id": ids, "shard": pa.array([shard["key"]] * len(ids), pa.string()),
                                     "order": pa.array([shard["order"]] * len(ids), pa.int64()),
                                     "row": pa.array(range(start, start + len(ids)), pa.int64())})
                    start += len(ids)
                    if wanted is not None:
                        part = part.filter(pc.is_in(part.column("id"), value_set=wanted))
                    yield part.filter(pc.is_valid(part.column("id")))
        except Exception:  # noqa: BLE001 - quarantined by the main read, with the reason
            continue


def _duplicates_in_cluster(plan: InputPlan, id_column: str, policy: str) -> dict[str, dict[int, str]]:
    """`find_duplicates` on the cluster, in two streaming passes over the id column: a group-by that counts each
    id (Ray Data's hash shuffle, spread over the nodes) and keeps the repeated ones, then a scan for where they
    are. The driver holds the repeated ids and their rows only."""
    import polars as pl
    import ray
    import ray.data

    if not ray.is_initialized():
        raise RuntimeError("the duplicate-id pass of a large input runs on the cluster: join it first")
    shards = [{"key": s.key, "order": i, "path": s.path} for i, s in enumerate(plan.shards)]

    def ids(only: frozenset[str] | None = None) -> ray.data.Dataset:
        return ray.data.from_items(shards, override_num_blocks=max(1, len(shards))).map_batches(
            shard_ids, batch_size=1, batch_format="pyarrow",  # type: ignore[arg-type]
            fn_kwargs={"filesystem": plan.filesystem, "id_column": id_column, "only": only})

    counts = ids().groupby("id").count().rename_columns({"count()": "n"})
    repeated = frozenset(r["id"] for r in counts.filter(expr="n > 1").select_columns(["id"]).iter_rows())
    if not repeated:
        return {}
    found = ids(repeated).to_arrow_refs()
    occurrences = pl.from_arrow(pa.concat_tables(ray.get(found)))
    assert isinstance(occurrences, pl.DataFrame)
    return _messages(occurrences.sort("order", "row"), plan, id_column, policy)


def _duplicates_in_driver(plan: InputPlan, id_column: str, policy: str, storage: StorageOptions
                          ) -> dict[str, dict[int, str]]:
    """`find_duplicates` in this process: polars over the id column of every shard."""
    import polars as pl

    from pipelines.io.storage import protocol_of

    opts = storage.polars_kwargs(protocol_of(plan.uri)) or None
    frames = [
        pl.scan_parquet(s.uri, storage_options=opts).select(pl.col(id_column).cast(pl.String).alias("id"))
        .with_row_index("row").with_columns(pl.lit(s.key).alias("shard"), pl.lit(i).alias("order"))
        for i, s in enumerate(plan.shards)
    ]
    if not frames:
        return {}
    dups = (pl.concat(frames).filter(pl.col("id").is_not_null() & pl.col("id").is_duplicated())
            .sort("order", "row").collect())
    return _messages(dups, plan, id_column, policy)


def _messages(dups, plan: InputPlan, id_column: str, policy: str) -> dict[str, dict[int, str]]:
    """From every occurrence of the repeated ids (polars: `id`, `shard`, `row`, sorted by shard order and row),
    the rows to reject and why."""
    uris = {s.key: s.uri for s in plan.shards}
    first: dict[str, tuple[str, int]] = {}
    counts = dups.group_by("id").len()
    times = dict(zip(counts["id"].to_list(), counts["len"].to_list()))
    out: dict[str, dict[int, str]] = {}
    for row in dups.iter_rows(named=True):
        key, where = row["shard"], first.setdefault(row["id"], (row["shard"], row["row"]))
        if policy == "keep_first" and where == (key, row["row"]):
            continue
        if policy == "keep_first":
            message = f"{id_column} {row['id']!r} was first seen at {uris[where[0]]} row {where[1]}"
        else:
            message = f"{id_column} {row['id']!r} appears {times[row['id']]} times"
        out.setdefault(key, {})[int(row["row"])] = message
    return out


def read_shard_rows(table: pa.Table, *, filesystem: pafs.FileSystem, schema: pa.Schema,
                    batch_rows: int, duplicates: dict[str, dict[int, str]] | None = None) -> Iterator[pa.Table]:
    """Ray Data generator UDF: for each shard row (`key`, `path`), its rows with `PROVENANCE`.

    A shard that fails while being read yields one marker row (`_row` = -1,
    `reject_code` `unreadable`), so that the driver quarantines the whole shard
    and drops what it already produced.
    """
    strings = [f.name for f in schema if pa.types.is_string(f.type)]
    for shard in table.to_pylist():
        repeated = (duplicates or {}).get(shard["key"], {})
        start = 0
        try:
            with filesystem.open_input_file(shard["path"]) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=schema.names):
                    part = pa.Table.from_batches([batch]).select(schema.names)
                    n = part.num_rows
                    # Staged OpenAI requests arrive with their own reasons.
                    staged = "reject_code" in part.column_names
                    code = part.column("reject_code").to_pylist() if staged else [None] * n
                    reject = part.column("reject").to_pylist() if staged else [None] * n
                    for name in strings:
                        raw = part.column(name)
                        if not pa.types.is_string(_base(raw.type)):
                            continue  # cast to text below from another type: valid by construction
                        ok = _valid_utf8(raw)
                        if all(ok):
                            continue
                        for i, good in enumerate(ok):
                            if not good and code[i] is None:
                                code[i], reject[i] = Reason.INVALID_UTF8, f"column {name!r} is not valid UTF-8"
                        mask = pa.array([not g for g in ok])
                        part = part.set_column(part.schema.get_field_index(name), name,
                                               pc.if_else(mask, pa.scalar(None, raw.type), raw))
                    for i in range(n):
                        if start + i in repeated and code[i] is None:
                            code[i], reject[i] = Reason.DUPLICATE_ID, repeated[start + i]
                    part = part.cast(schema) if part.schema != schema else part
                    part = part.drop_columns([c for c in ("reject_code", "reject") if c in part.column_names])
                    part = part.append_column("_shard", pa.array([shard["key"]] * n, pa.string()))
                    part = part.append_column("_row", pa.array(range(start, start + n), pa.int64()))
                    part = part.append_column("reject_code", pa.array(code, pa.string()))
                    yield part.append_column("reject", pa.array(reject, pa.string()))
                    start += n
        except Exception as exc:  # noqa: BLE001 - the shard is quarantined with the reason
            names = [n for n in schema.names if n not in ("reject_code", "reject")]
            marker: dict[str, Any] = {name: None for name in names}
            out_schema = pa.schema([*(schema.field(n) for n in names), pa.field("_shard", pa.string()),
                                    pa.field("_row", pa.int64()), pa.field("reject_code", pa.string()),
                                    pa.field("reject", pa.string())])
            yield pa.Table.from_pylist(
                [{**marker, "_shard": shard["key"], "_row": -1, "reject_code": Reason.UNREADABLE,
                  "reject": f"failed after {start} rows: {type(exc).__name__}: {exc}"}], schema=out_schema)


def read_dataset(plan: InputPlan, *, rows_per_block: int, batch_rows: int = 1024,
                 duplicates: dict[str, dict[int, str]] | None = None):
    """The input as a lazy Ray dataset: one read task per shard, streaming its rows with their provenance
    in blocks of at most `rows_per_block` rows (the engine's batch size).

    Ray Data would otherwise merge a task's output into blocks of up to 128 MiB: a shard's rows would reach
    the engine as one task, and nothing would be written until the engine had answered all of them, so a
    crash would lose the whole shard's work and a large shard's answers would pile up in memory.
    """
    import ray.data

    shards = [{"key": s.key, "path": s.path} for s in plan.shards]
    ds: ray.data.Dataset = ray.data.from_items(shards, override_num_blocks=max(1, len(shards)))
    mine = {s.key for s in plan.shards}
    # Ray's type hints leave out generator UDFs over Arrow tables, which its documentation describes.
    ds = ds.map_batches(read_shard_rows, batch_size=1, batch_format="pyarrow", fn_kwargs={  # type: ignore[arg-type]
        "filesystem": plan.filesystem, "schema": plan.schema, "batch_rows": batch_rows,
        "duplicates": {k: v for k, v in (duplicates or {}).items() if k in mine}})
    return ds.repartition(target_num_rows_per_block=rows_per_block)
