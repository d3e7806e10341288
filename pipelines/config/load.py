"""Reading YAML into typed specs: `--set` overrides, then validation.

Every failure is a `ConfigError` whose message names the file and the key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from pipelines.config.engine import CostProfile, EngineProfile
from pipelines.config.job import JobSpec
from pipelines.config.prices import AcceleratorPrice, HostedPrice, ModelPrice, PriceBook
from pipelines.errors import ConfigError
from pipelines.names import night_problem
from pipelines.paths import conf_dir_for

M = TypeVar("M", bound=BaseModel)


@dataclasses.dataclass(frozen=True)
class Job:
    """A validated job spec with the engine profile and price it names."""

    spec: JobSpec
    engine: EngineProfile
    price: ModelPrice
    spec_path: Path
    conf_dir: Path
    hosted: dict[str, HostedPrice] = dataclasses.field(default_factory=dict)
    accelerator_price: AcceleratorPrice | None = None  # the engine profile's hourly rate, where the book has one
    partition: str | None = None  # `--date`: the night this run is for

    def accelerator_billing(self) -> tuple[AcceleratorPrice, CostProfile]:
        """The hourly rate and the cost weights that `cost.mode: accelerator_time` bills with (`load_job`
        refuses that mode without them)."""
        if self.accelerator_price is None or self.engine.cost is None:
            raise ConfigError(f"cost.mode: accelerator_time needs a `cost:` section in engine profile "
                              f"{self.engine.name!r} and its accelerator's hourly rate in the price book")
        return self.accelerator_price, self.engine.cost

    def usd_per_replica_s(self) -> float:
        """What one replica costs per second of its life in `cost.mode: accelerator_time`."""
        return self.accelerator_billing()[0].usd_per_hour * self.engine.billed_units / 3600


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top, found {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], source: Path) -> dict[str, Any]:
    """Apply `key.path=value` overrides; values are parsed as YAML (`3`, `true`, `[a, b]`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        parts = key.strip().split(".")
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"--set {key}: {source}: {where} is a value, not a section")
            node = child
        node[parts[-1]] = parse_value(raw)
    return data


def parse_value(raw: str) -> Any:
    """An override's value: YAML (`3`, `true`, `[a, b]`, `{k: v}`), except text that only looks like a mapping.

    `Product: {title}` or `{body}` are prompt text, not YAML mappings.
    """
    if not raw.strip():
        return raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, dict) and (not raw.strip().startswith("{") or all(v is None for v in value.values())):
        return raw
    return value


def validate(model: type[M], data: dict[str, Any], source: Path) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid {model.__name__}:\n" + format_errors(exc)) from None


def format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif err["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            lines.append(f"  {key}: {err['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def load_engine(name: str, conf_dir: Path, overrides: Sequence[str] = ()) -> EngineProfile:
    """The engine profile `name` (a name in `conf_dir/engines/`, or a path to a YAML file), with `key.path=value`
    overrides (`--engine-set engine_args.dtype=float32`) applied before validation."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else conf_dir / "engines" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (conf_dir / "engines").glob("*.yaml"))
        raise ConfigError(f"engine profile {name!r} not found at {path}; known profiles: {', '.join(known) or 'none'}")
    data = apply_overrides(read_yaml(path, "engine profile"), overrides, path)
    profile = validate(EngineProfile, data, path)
    if path.parent == conf_dir / "engines" and profile.name != path.stem:
        raise ConfigError(f"{path}: name: is {profile.name!r} but the file is named {path.stem!r}")
    return profile


def load_price_book(conf_dir: Path) -> PriceBook:
    path = conf_dir / "prices.yaml"
    return validate(PriceBook, read_yaml(path, "price book"), path)


PARTITION = "{date}"


def apply_partition(data: dict[str, Any], partition: str | None, source: Path) -> dict[str, Any]:
    """Put the partition (`--date YYYY-MM-DD`) into `input.path` and `output.path` where they say `{date}`."""
    for section in ("input", "output"):
        path = (data.get(section) or {}).get("path")
        if not isinstance(path, str) or PARTITION not in path:
            continue
        if partition is None:
            raise ConfigError(f"{source}: {section}.path: {path!r} has {PARTITION}; give the night with --date YYYY-MM-DD")
        data[section]["path"] = path.replace(PARTITION, partition)
    return data


def load_job(path: str | Path, *, overrides: Sequence[str] = (), conf_dir: str | Path | None = None,
             partition: str | None = None, engine_overrides: Sequence[str] = ()) -> Job:
    """Read, override and validate a job spec and everything it names.

    Args:
        path: The job spec, e.g. `conf/jobs/ticket_triage.yaml`.
        overrides: `key.path=value` strings applied before validation
            (see `pipelines.config.job.JobSpec` for the keys).
        engine_overrides: The same for the engine profile the spec names
            (see `pipelines.config.engine.EngineProfile`).
        conf_dir: Folder holding `engines/` and `prices.yaml`; see
            `pipelines.paths.conf_dir_for` for the default.
        partition: The night the run is for (`YYYY-MM-DD`): replaces `{date}`
            in `input.path` and `output.path`, and names the run.
    """
    path = Path(path)
    return job_from_data(read_yaml(path, "job spec"), source=path, overrides=overrides, conf_dir=conf_dir,
                         partition=partition, engine_overrides=engine_overrides)


def job_from_data(data: dict[str, Any], *, source: Path, overrides: Sequence[str] = (),
                  conf_dir: str | Path | None = None, partition: str | None = None,
                  engine_overrides: Sequence[str] = ()) -> Job:
    """`load_job` for a spec already read (`source` names it in messages): a replay's spec comes from its run."""
    path = source
    if partition is not None and (problem := night_problem(partition)):
        raise ConfigError(problem)
    data = apply_partition(apply_overrides(data, overrides, path), partition, path)
    spec = validate(JobSpec, data, path)
    conf = conf_dir_for(path, Path(conf_dir) if conf_dir else None)
    engine = load_engine(spec.engine, conf, engine_overrides)
    book = load_price_book(conf)
    price = book.models.get(engine.display_model)
    if price is None:
        raise ConfigError(
            f"{conf / 'prices.yaml'}: models: no price for {engine.display_model!r} "
            f"(engine profile {engine.name!r}); known: {', '.join(sorted(book.models))}"
        )
    return Job(spec=spec, engine=engine, price=price, spec_path=path, conf_dir=conf, hosted=dict(book.hosted),
               accelerator_price=accelerator_price(engine, book, conf, required=spec.cost.mode == "accelerator_time"),
               partition=partition)


def accelerator_price(engine: EngineProfile, book: PriceBook, conf: Path, *, required: bool) -> AcceleratorPrice | None:
    """The hourly rate of the profile's accelerator; a `ConfigError` naming the key when it is required and missing."""
    where = f"engine profile {engine.name!r}"
    if engine.cost is None:
        if required:
            raise ConfigError(f"cost.mode: accelerator_time needs a `cost:` section (accelerator, weights) in {where}")
        return None
    rate = book.accelerators.get(engine.cost.accelerator)
    if rate is None and required:
        raise ConfigError(f"{conf / 'prices.yaml'}: accelerators: no hourly rate for {engine.cost.accelerator!r} "
                          f"({where}, cost.accelerator); known: {', '.join(sorted(book.accelerators)) or 'none'}")
    return rate


# What a snapshot holds instead of a value that may be a credential.
MASKED = "<masked>"


def job_snapshot(job: Job) -> dict[str, Any]:
    """Everything a run's results depend on, as JSON: kept in the run's folder so that its summary and report can
    be rebuilt from the run alone (`tokenmill report`), whatever has changed in `conf/` since.

    The engine profile's `env` and the storage's `extra` options are kept by name only: either may carry a
    credential (a hub token, a service-account key), and neither decides an answer. Storage keys are secrets
    already (`SecretStr`, dumped masked)."""
    spec = job.spec.model_dump(mode="json")
    spec["storage"]["extra"] = dict.fromkeys(spec["storage"]["extra"], MASKED)
    engine = job.engine.model_dump(mode="json")
    engine["env"] = dict.fromkeys(engine["env"], MASKED)
    return {
        "spec": spec,
        "engine": engine,
        "price": job.price.model_dump(mode="json"),
        "hosted": {k: v.model_dump(mode="json") for k, v in job.hosted.items()},
        "accelerator_price": job.accelerator_price.model_dump(mode="json") if job.accelerator_price else None,
        "spec_path": str(job.spec_path),
        "conf_dir": str(job.conf_dir),
        "partition": job.partition,
    }


SECRET_MASK = str(SecretStr("x"))  # how pydantic writes a `SecretStr`: "**********"


def unmasked_storage(storage: dict[str, Any]) -> dict[str, Any]:
    """A snapshot's `storage:` without what was masked in it, which was never kept: the job rebuilt from it reads
    with the environment's credentials."""
    storage = dict(storage)
    storage["extra"] = {k: v for k, v in (storage.get("extra") or {}).items() if v != MASKED}
    # Keys are dumped as pydantic masks them; taken back as they are, the mask would be sent as the key.
    for key in ("access_key_id", "secret_access_key", "session_token"):
        if storage.get(key) == SECRET_MASK:
            storage[key] = None
    return storage


def job_from_snapshot(snapshot: dict[str, Any]) -> Job:
    """The job a run was started with (`job_snapshot`)."""
    rate = snapshot.get("accelerator_price")
    spec, engine = dict(snapshot["spec"]), dict(snapshot["engine"])
    spec["storage"] = unmasked_storage(spec.get("storage") or {})
    engine["env"] = {k: v for k, v in (engine.get("env") or {}).items() if v != MASKED}
    return Job(spec=JobSpec.model_validate(spec), engine=EngineProfile.model_validate(engine),
               price=ModelPrice.model_validate(snapshot["price"]), spec_path=Path(snapshot["spec_path"]),
               conf_dir=Path(snapshot["conf_dir"]),
               hosted={k: HostedPrice.model_validate(v) for k, v in snapshot["hosted"].items()},
               accelerator_price=AcceleratorPrice.model_validate(rate) if rate else None,
               partition=snapshot.get("partition"))
