"""The pipeline, composed in one place: read -> prompt -> generate -> parse -> account -> write.

Building it only chains lazy Ray Data steps; nothing runs until the driver
iterates the write stage's small reports (`pipelines.run.runner`), and it never holds the rows.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipelines.config.load import Job
from pipelines.config.storage import StorageOptions
from pipelines.io.fetch import FetchPolicy
from pipelines.io.metrics import count_written
from pipelines.io.response_cache import ResponseCache, generation_identity, identity_digest, store_batch
from pipelines.io.storage import filesystem_for
from pipelines.models import model_revision
from pipelines.models.adapters import Adapter, adapter_identity
from pipelines.schema import task_fields
from pipelines.stages.account import account_batch
from pipelines.stages.engine import EngineClient, actor_env, structured_outputs
from pipelines.stages.generate import GenerateStage, LedgerFactory
from pipelines.stages.parse import parse_batch
from pipelines.stages.prompt import render_batch, task_instructions
from pipelines.stages.read import InputPlan, read_dataset
from pipelines.stages.standin import StandInEngine
from pipelines.stages.write import reject_schema, result_schema, write_batch


def postprocess_batch(batch: pa.Table, *, parse: dict, account: dict, run_id: str, write: dict,
                      tags: dict[str, str], cache: dict | None = None) -> pa.Table:
    """parse -> account -> write, fused into one task per batch; returns what was written (`write.WRITTEN`).

    New answers go to the response cache first, off the engine's path.
    """
    if cache is not None:
        store_batch(batch, ResponseCache(cache["fs"], cache["root"]))
    parsed = parse_batch(batch, **parse)
    written = write_batch(account_batch(parsed, run_id=run_id, **account), run_id=run_id, **write)
    count_written(written, tags=tags)
    return written


def output_schema(job: Job, plan: InputPlan) -> pa.Schema:
    spec = job.spec
    return result_schema(plan.schema, spec.id_column, spec.carried_columns, spec.output.include_token_ids,
                         task_fields(spec.task, spec.classify, spec.extract))


def rejects_schema(job: Job, plan: InputPlan) -> pa.Schema:
    return reject_schema(plan.schema, job.spec.id_column, job.spec.carried_columns)


def parse_kwargs(job: Job) -> dict:
    """The parse stage's arguments for this job (`pipelines.stages.parse.parse_batch`)."""
    spec = job.spec
    return {
        "task": spec.task,
        "labels": spec.classify.names if spec.classify else None,
        "schema": spec.extract.schema_dict if spec.extract else None,
        "fields": task_fields(spec.task, spec.classify, spec.extract),
    }


def prompt_kwargs(job: Job, *, tokenizer_path: str, storage: StorageOptions) -> dict:
    """The prompt stage's arguments for this job (`pipelines.stages.prompt.render_batch`)."""
    spec = job.spec
    common = {
        "tokenizer_path": tokenizer_path,
        "id_column": spec.id_column,
        "max_model_len": job.engine.engine_args.max_model_len,
        "max_tokens": spec.sampling.max_tokens,
    }
    if spec.prompt is None:  # OpenAI batch requests bring their messages
        return {**common, "messages_column": "messages"}
    return {
        **common,
        "system": spec.prompt.system,
        "user": spec.prompt.user,
        "instructions": task_instructions(spec),
        "image_column": spec.prompt.image_column,
        "storage": storage,
        "images": FetchPolicy.for_input(spec.prompt.images, spec.input.path) if spec.prompt.image_column else None,
    }


def cache_settings(job: Job, storage: StorageOptions, adapter: Adapter | None) -> dict | None:
    """The response cache's folder and the digest of what decides an answer, or None without a cache."""
    spec = job.spec
    if spec.cache is None:
        return None
    fs, root = filesystem_for(spec.cache.path, storage)
    identity = generation_identity(
        engine=job.engine.model_dump(mode="json"),
        sampling=spec.sampling.model_dump(mode="json"),
        structured=structured_outputs(spec),
        logprobs=bool(spec.classify and spec.classify.probability),
        adapter=adapter_identity(adapter, storage) if adapter else None,
        model_revision=model_revision(job.engine.model),
    )
    return {"fs": fs, "root": root, "identity": identity_digest(identity), "read": spec.cache.read}


def build_dataset(job: Job, plan: InputPlan, *, run_id: str, run_root: str, out_fs, tokenizer_path: str,
                  storage: StorageOptions, adapter: Adapter | None = None, ledger: LedgerFactory | None = None,
                  duplicates: dict[str, dict[int, str]] | None = None, budget: Any = None):
    """The job as a lazy Ray dataset whose rows report what was written (`pipelines.stages.write.WRITTEN`).

    Args:
        job: The validated job (`pipelines.config.load_job`).
        plan: The checked input (`pipelines.stages.read.plan_input`), less committed shards.
        run_id: Written into every row.
        run_root, out_fs: The run's folder and its filesystem (fsspec); files go under it.
        duplicates: Rows to reject as repeated ids (`pipelines.stages.read.find_duplicates`).
        budget: The run's budget keeper (`pipelines.run.budget`, a Ray actor), asked before each batch.
        tokenizer_path: The engine's tokenizer, resolved (see `pipelines.models.resolve_model`).
        storage: Resolved object-store access (image URIs, the LoRA adapter).
        adapter: The job's checked LoRA adapter (`pipelines.models.adapters.check_adapter`), if any.
        ledger: Makes each replica's entry in the run's ledger, which its time is
            billed from (`pipelines.run.ledger.ReplicaLedger`); None keeps none.
    """
    from ray.data import ActorPoolStrategy

    spec, engine = job.spec, job.engine
    batch_size = spec.batch_size or engine.engine_args.max_num_seqs
    cache = cache_settings(job, storage, adapter)
    ds = read_dataset(plan, rows_per_block=batch_size, duplicates=duplicates)
    ds = ds.map_batches(
        render_batch,
        fn_kwargs=prompt_kwargs(job, tokenizer_path=tokenizer_path, storage=storage),
        batch_size=batch_size,
        batch_format="pyarrow",
        udf_modifying_row_count=False,
    )
    ds = ds.map_batches(
        GenerateStage,
        fn_constructor_kwargs={
            "profile": engine.model_dump(mode="json"),
            "engine": StandInEngine if engine.backend == "stand-in" else EngineClient,
            "sampling": spec.sampling.model_dump(mode="json"),
            "ledger": ledger,
            "adapter": adapter,
            "storage": storage,
            "structured": structured_outputs(spec),
            "logprobs": bool(spec.classify and spec.classify.probability),
            "cache": cache,
            "budget": {"keeper": budget, "price": job.price.model_dump(mode="json")} if budget is not None else None,
        },
        # Two calls at once per replica: one batch waits in the engine loop while the other runs, so the
        # engine never drains between batches (`pipelines.stages.engine.EngineLoop`).
        compute=ActorPoolStrategy(min_size=spec.actors.min, max_size=spec.actors.max,
                                  max_concurrent_calls_per_actor=2, enable_true_multi_threading=True),
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=engine.resources.num_cpus,
        num_gpus=engine.resources.num_gpus or None,
        accelerator_type=engine.resources.accelerator_type,
        # Without the profile's env, whose values may be secrets: the replica sets it itself (GenerateStage).
        runtime_env={"env_vars": actor_env(engine, with_profile_env=False)},
        # A replica that dies is restarted, on another node if its own is gone, and its batches are retried
        # until a replica answers: while the cluster has not yet noticed a lost node (tens of seconds), every
        # call to its replica fails at once, and a few retries would be spent before the restart, failing the
        # whole run. A request that kills its engine is isolated inside the replica (`EngineClient`); one that
        # kills the actor process itself is retried until the job's timeout (docs/runs.md).
        max_restarts=-1,
        max_task_retries=-1,
        udf_modifying_row_count=False,
    )
    return ds.map_batches(
        postprocess_batch,
        fn_kwargs={
            "parse": parse_kwargs(job),
            "account": {
                "mode": spec.cost.mode,
                "price": job.price.model_dump(mode="json"),
                "weights": engine.cost.model_dump(mode="json") if engine.cost else None,
                "model": engine.display_model,
            },
            "run_id": run_id,
            "tags": {"job": spec.name, "run_id": run_id},
            "cache": {"fs": cache["fs"], "root": cache["root"]} if cache else None,
            "write": {
                "fs": out_fs,
                "run_root": run_root,
                "results": output_schema(job, plan),
                "rejects": rejects_schema(job, plan),
                "shard_uris": {s.key: s.uri for s in plan.shards},
                "compression": spec.output.parquet_compression,
            },
        },
        batch_format="pyarrow",
    )
