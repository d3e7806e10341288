"""`tokenmill bench decoding`: constrained against unconstrained decoding on a classify or extract job's prompts.

One engine serves both sides, alternating, so they share the machine's state;
prefix caching is off so both pay the same prefill. Each pass counts the
answers that are usable: one of the labels, or JSON that validates.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from pipelines.bench.common import bench_input, prompt_ids, run_child, write_result
from pipelines.config.load import load_job
from pipelines.errors import ConfigError
from pipelines.models import resolve_engine_paths


@dataclasses.dataclass
class Pass:
    """One side's passes, summed."""

    seconds: float
    requests: int
    output_tokens: int
    valid: int  # usable answers

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    def report(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "requests_per_s": self.requests_per_s,
                "output_tokens_per_s": self.output_tokens_per_s,
                "output_tokens_per_request": self.output_tokens / self.requests,
                "valid_share": self.valid / self.requests}


@dataclasses.dataclass
class DecodingFigures:
    engine_start_s: float
    unconstrained: Pass
    constrained: Pass

    def __post_init__(self) -> None:  # read back from the child's JSON
        for side in ("unconstrained", "constrained"):
            if isinstance(getattr(self, side), dict):
                setattr(self, side, Pass(**getattr(self, side)))


def _is_answer(text: str, labels: set[str], schema: dict | None) -> bool:
    """Whether an output is a usable answer: one of the labels, or JSON that validates against the schema."""
    if schema is None:
        return text.strip() in labels
    from jsonschema import Draft202012Validator

    try:
        return Draft202012Validator(schema).is_valid(json.loads(text))
    except ValueError:
        return False


def constrained_side(args: dict) -> None:
    """One engine; the same prompts unconstrained and constrained, alternating, `repeats` times each."""
    from pipelines.config.engine import EngineProfile
    from pipelines.config.job import SamplingSpec
    from pipelines.stages.engine import generate_ids, make_llm, sampling_params

    profile = EngineProfile.model_validate(args["profile"])
    t0 = time.perf_counter()
    # Without prefix caching every pass pays the same prefill, whichever ran first.
    llm = make_llm(profile, args["model_path"], args["tokenizer_path"], enable_prefix_caching=False)
    start_s = time.perf_counter() - t0
    spec = SamplingSpec.model_validate(args["sampling"])
    params = {"unconstrained": sampling_params(spec), "constrained": sampling_params(spec, structured=args["structured"])}
    prompts = args["prompts"]
    generate_ids(llm, prompts[:8], params["constrained"])  # warm-up: compiles the grammar once
    figures: dict[str, dict[str, Any]] = {side: {"seconds": 0.0, "requests": 0, "output_tokens": 0, "valid": 0}
                                          for side in params}
    labels, schema = set(args.get("labels") or []), args.get("schema")
    for _ in range(args["repeats"]):
        for side, p in params.items():
            t1 = time.perf_counter()
            outputs = generate_ids(llm, prompts, p)
            f = figures[side]
            f["seconds"] += time.perf_counter() - t1
            f["requests"] += len(outputs)
            f["output_tokens"] += sum(len(o.outputs[0].token_ids) for o in outputs)
            f["valid"] += sum(_is_answer(o.outputs[0].text, labels, schema) for o in outputs)
    write_result(args, DecodingFigures(engine_start_s=start_s, **{side: Pass(**f) for side, f in figures.items()}))


def run_decoding(job_path: Path, *, overrides: Sequence[str] = (), engine_overrides: Sequence[str] = (),
                 conf_dir: Path | None = None, rows: int | None = None, repeats: int = 2) -> dict[str, Any]:
    """Constrained against unconstrained decoding on the same `rows` prompts of a classify or extract job
    (default 128 for classify, 64 for extract).

    One engine serves both sides, alternating `repeats` times, so they share the
    machine's state; the sampling is the job's, constraint aside.
    """
    from pipelines.stages.engine import structured_outputs

    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-") as tmp:
        workdir = Path(tmp)
        job = load_job(job_path, overrides=overrides, conf_dir=conf_dir, engine_overrides=engine_overrides)
        if job.spec.task == "generate":
            raise ConfigError(f"{job_path}: task is generate; the decoding bench needs a classify or extract job")
        rows = rows or {"classify": 128, "extract": 64}[job.spec.task]
        table = bench_input(job, rows, workdir / "input")
        model_path, tokenizer_path = resolve_engine_paths(job.engine.model, job.engine.tokenizer)
        figures = run_child(job, workdir, "constrained", {
            "profile": job.engine.model_dump(mode="json"),
            "sampling": job.spec.sampling.model_dump(mode="json"),
            "structured": structured_outputs(job.spec),
            "labels": job.spec.classify.names if job.spec.classify else None,
            "schema": job.spec.extract.schema_dict if job.spec.extract else None,
            "model_path": model_path,
            "tokenizer_path": tokenizer_path,
            "prompts": prompt_ids(job, table, tokenizer_path),
            "repeats": repeats,
        }, DecodingFigures, engine_in_child=True)
    u, c = figures.unconstrained, figures.constrained
    return {
        "job": job.spec.name,
        "task": job.spec.task,
        "engine": job.engine.name,
        "rows": rows,
        "repeats": repeats,
        "max_tokens": job.spec.sampling.max_tokens,
        "engine_start_s": figures.engine_start_s,
        "unconstrained": u.report(),
        "constrained": c.report(),
        "ratio_requests_per_s": c.requests_per_s / u.requests_per_s,
        "ratio_output_tokens_per_s": c.output_tokens_per_s / u.output_tokens_per_s,
    }


def format_decoding(r: dict[str, Any]) -> str:
    lines = [
        f"tokenmill bench decoding ({r['task']}): {r['job']} on {r['engine']}, {r['rows']} prompts x {r['repeats']} "
        f"passes per side, max_tokens {r['max_tokens']}",
        f"  {'decoding':<16}{'requests/s':>12}{'output tok/s':>14}{'tokens/request':>16}"
        + f"{'usable answers':>16}",
    ]
    for side in ("unconstrained", "constrained"):
        f = r[side]
        lines.append(f"  {side:<16}{f['requests_per_s']:>12.2f}{f['output_tokens_per_s']:>14.1f}"
                     f"{f['output_tokens_per_request']:>16.2f}"
                     + f"{f['valid_share']:>16.1%}")
    lines += [
        f"  ratio constrained/unconstrained, requests/s: {r['ratio_requests_per_s']:.3f}",
        f"  ratio constrained/unconstrained, output tokens/s: {r['ratio_output_tokens_per_s']:.3f}",
    ]
    return "\n".join(lines)
