"""Typed configuration: job specs, engine profiles, the price book."""

from pipelines.config.engine import EngineArgs, EngineProfile, ReplicaResources
from pipelines.config.job import ActorPoolSpec, InputSpec, JobSpec, OutputSpec, PromptSpec, SamplingSpec
from pipelines.config.load import Job, load_engine, load_job, load_price_book
from pipelines.config.prices import ModelPrice, PriceBook

__all__ = [
    "ActorPoolSpec",
    "EngineArgs",
    "EngineProfile",
    "InputSpec",
    "Job",
    "JobSpec",
    "ModelPrice",
    "OutputSpec",
    "PriceBook",
    "PromptSpec",
    "ReplicaResources",
    "SamplingSpec",
    "load_engine",
    "load_job",
    "load_price_book",
]
