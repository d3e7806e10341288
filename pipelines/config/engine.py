"""Engine profiles: which model runs, on what, with which vLLM settings."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ReplicaResources(BaseModel):
    """What one engine replica (one Ray actor holding one `vllm.LLM`) asks Ray for."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved for the actor.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; must equal tensor x pipeline parallel size on GPU.")
    accelerator_type: str | None = Field(
        None, description="Ray accelerator type to schedule on (e.g. `H100`, `H200`); none means any."
    )


class EngineArgs(BaseModel):
    """The vLLM engine arguments tokenmill knows by name.

    They go to `vllm.LLM(...)` as keyword arguments; see vLLM's `EngineArgs` for
    their meaning. Anything else vLLM accepts goes in `extra_args`, whose keys are
    checked against vLLM's `EngineArgs` before the run starts.
    """

    model_config = ConfigDict(extra="forbid")

    dtype: str = Field(
        "auto", description="Weight and activation dtype (`bfloat16`, `float16`, `float32`, `auto`). On a `cpu` "
        "profile `auto` is decided when the engine starts, from that node's CPU flags: `bfloat16` where the CPU "
        "has native bf16 (`avx512_bf16`, `amx_bf16`, or Arm's `bf16`), else `float32`, which is several times "
        "faster there; the run summary's `engine_dtype` says which. On GPU, `auto` is vLLM's own choice.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one replica shards the model over.")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages per replica.")
    quantization: str | None = Field(None, description="Weight quantization (`fp8`, ...); none means as stored.")
    kv_cache_dtype: str = Field("auto", description="KV-cache dtype (`auto`, `fp8`).")
    max_model_len: int = Field(..., ge=16, description="Longest prompt plus output, in tokens.")
    max_num_seqs: int = Field(256, ge=1, description="Sequences the engine runs at once.")
    max_num_batched_tokens: int | None = Field(None, ge=1, description="Tokens per engine step.")
    enable_prefix_caching: bool = Field(True, description="Reuse KV cache across prompts sharing a prefix.")
    enforce_eager: bool = Field(False, description="Skip graph capture / torch.compile (faster start, slower run).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of GPU memory vLLM may take.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model folder.")
    seed: int = Field(0, description="Engine seed.")
    limit_mm_per_prompt: dict[str, int] | None = Field(
        None, description="Most items per prompt for each modality of a multimodal model, e.g. `{image: 1}`."
    )
    extra_args: dict[str, Any] = Field(default_factory=dict, description="Other `vllm.EngineArgs` fields, verbatim.")

    def to_vllm_kwargs(self) -> dict[str, Any]:
        kwargs = self.model_dump(exclude={"extra_args"}, exclude_none=True)
        return {**kwargs, **self.extra_args}


class Throughput(BaseModel):
    """What one replica of this profile was measured to do (`tokenmill bench calibrate`); `tokenmill plan`
    estimates a run's accelerator time from it."""

    model_config = ConfigDict(extra="forbid")

    startup_s: float = Field(
        ..., ge=0, description="Seconds a replica is billed beyond its busy time in a pipeline run: engine start-up, "
        "actor start and shutdown, gaps between batches.")
    work_per_s: float = Field(
        ..., gt=0, description="Work units per busy second in a pipeline run (one unit: one uncached prompt token; "
        "see `cost.decode_weight`).")
    measured: str = Field(..., description="Where, when and how it was measured.")
    machine: str | None = Field(
        None, description="The machine it was measured on (`tokenmill bench calibrate` writes it): a plan made "
        "on another machine says so, since figures measured on one CPU do not hold on another.")


class ThroughputPrior(BaseModel):
    """A replica's throughput from a published figure, for `tokenmill plan` until the profile is calibrated on its
    own hardware; every estimate made from it names its source and date."""

    model_config = ConfigDict(extra="forbid")

    startup_s: float = Field(..., ge=0, description="Seconds a replica is billed beyond its busy time.")
    work_per_s: float = Field(..., gt=0, description="Work units per busy second (see `throughput.work_per_s`).")
    source: str = Field(..., description="Where the figure was published, and what it measured.")
    taken: dt.date = Field(..., description="When the figure was taken from its source.")
    derivation: str = Field("", description="How `work_per_s` and `startup_s` follow from the figure.")


class CostProfile(BaseModel):
    """How a replica of this profile is billed, and how its time is shared among the records it served."""

    model_config = ConfigDict(extra="forbid")

    accelerator: str = Field(..., description="Key of the hourly rate in the price book's `accelerators`.")
    units: float | None = Field(
        None, gt=0, description="Accelerators billed per replica; default `resources.num_gpus` on GPU, "
        "`resources.num_cpus` on CPU.")
    decode_weight: float = Field(
        1.0, gt=0, description="Engine time of one output token, in uncached prompt tokens; measured by "
        "`tokenmill bench calibrate`.")
    cached_weight: float = Field(
        0.0, ge=0, description="Engine time of one prompt token served from the prefix cache, in uncached prompt "
        "tokens.")
    throughput: Throughput | None = Field(None, description="Measured throughput, for `tokenmill plan`.")
    prior: ThroughputPrior | None = Field(
        None, description="A published figure `tokenmill plan` uses while there is no measured `throughput`.")


class EngineProfile(BaseModel):
    """One engine profile: `conf/engines/<name>.yaml`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="Profile name; must match the file name.")
    description: str = Field("", description="Free text for people choosing a profile.")
    model: str = Field(
        ...,
        description="Hugging Face id, local folder, or `embedded:<name>` for a model tokenmill prepares itself.",
    )
    model_name: str | None = Field(
        None, description="Name written to the `model` column and looked up in the price book; default `model`."
    )
    tokenizer: str | None = Field(None, description="Tokenizer id or folder when it differs from the model.")
    device: Literal["cpu", "gpu"] = Field(..., description="Where the engine runs.")
    backend: Literal["vllm", "stand-in"] = Field(
        "vllm", description="`vllm`, or `stand-in`: a deterministic engine without a model that answers from the "
        "prompt's token ids (`pipelines.stages.standin`), for testing everything around the engine quickly.")
    stand_in_s_per_request: float = Field(
        0.0, ge=0, description="`backend: stand-in` only: seconds the stand-in spends per request it answers, so "
        "that a test can act while a run is still generating (kill a driver mid-run, watch progress).")
    engine_process: Literal["own", "actor"] = Field(
        "own", description="Where vLLM's engine core runs. `own` (vLLM's default): a process of its own beside the "
        "actor, so that the model's steps overlap the actor's work on batches and outputs. `actor`: inside the "
        "actor's process (vLLM's `VLLM_ENABLE_V1_MULTIPROCESSING=0`): on a 2-core CPU it starts in about 12 s "
        "instead of about 27 s, but generates about 40% slower in a pipeline run (59 against 101 output tokens/s "
        "for SmolLM2), so it suits short runs such as tests, not nightly work.")
    resources: ReplicaResources = Field(default_factory=ReplicaResources)
    engine_args: EngineArgs
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables for the engine actors.")
    cost: CostProfile | None = Field(None, description="Billing and attribution, for `cost.mode: accelerator_time`.")

    @property
    def display_model(self) -> str:
        return self.model_name or self.model

    @property
    def kv_block_size(self) -> int:
        """Tokens per KV-cache block: the prefix cache reuses whole blocks (vLLM's default: 128 on CPU, 16 on GPU)."""
        return int(self.engine_args.extra_args.get("block_size") or (128 if self.device == "cpu" else 16))

    @property
    def billed_units(self) -> float:
        """Accelerators billed per replica."""
        if self.cost and self.cost.units is not None:
            return self.cost.units
        return self.resources.num_gpus if self.device == "gpu" else self.resources.num_cpus

    @model_validator(mode="after")
    def _resources_match_parallelism(self) -> "EngineProfile":
        gpus_needed = self.engine_args.tensor_parallel_size * self.engine_args.pipeline_parallel_size
        if self.device == "gpu" and self.resources.num_gpus != gpus_needed:
            raise ValueError(
                f"resources.num_gpus is {self.resources.num_gpus:g} but tensor_parallel_size x "
                f"pipeline_parallel_size is {gpus_needed}: one replica needs exactly that many GPUs"
            )
        if "VLLM_ENABLE_V1_MULTIPROCESSING" in self.env:
            raise ValueError("env: VLLM_ENABLE_V1_MULTIPROCESSING is `engine_process` (own or actor); set that instead")
        if self.stand_in_s_per_request and self.backend != "stand-in":
            raise ValueError("stand_in_s_per_request is for `backend: stand-in` only")
        if self.device == "cpu" and (self.resources.num_gpus or gpus_needed != 1):
            raise ValueError("a cpu profile takes no GPUs and no tensor or pipeline parallelism")
        return self
