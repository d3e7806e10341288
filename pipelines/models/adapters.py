"""LoRA adapters named by a job spec: checked in the driver, fetched once per node by the engine actors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from pipelines.config.job import LoraSpec
from pipelines.config.storage import StorageOptions
from pipelines.errors import ConfigError
from pipelines.io.storage import download_folder, join, protocol_of, read_bytes
from pipelines.paths import build_folder_once, tokenmill_home

#: The ranks vLLM's `max_lora_rank` accepts (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
CONFIG_FILE = "adapter_config.json"


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A checked adapter: what the engine needs to load it."""

    uri: str
    name: str
    rank: int

    @property
    def max_lora_rank(self) -> int:
        """The smallest rank vLLM accepts that holds this adapter's."""
        return next(r for r in VLLM_LORA_RANKS if r >= self.rank)

    def engine_kwargs(self) -> dict:
        return {"enable_lora": True, "max_loras": 1, "max_lora_rank": self.max_lora_rank}


def check_adapter(spec: LoraSpec, storage: StorageOptions) -> Adapter:
    """Read the adapter's `adapter_config.json` (before any engine starts) for its rank."""
    config_uri = join(spec.path, CONFIG_FILE)
    try:
        config = json.loads(read_bytes(config_uri, storage))
    except FileNotFoundError:
        raise ConfigError(f"lora.path: {config_uri} not found; a LoRA adapter folder holds {CONFIG_FILE}") from None
    except Exception as exc:  # noqa: BLE001 - any read or parse error, with the path
        raise ConfigError(f"lora.path: cannot read {config_uri}: {exc}") from None
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"lora.path: {config_uri} has no positive integer rank 'r'")
    if rank > VLLM_LORA_RANKS[-1]:
        raise ConfigError(f"lora.path: rank {rank} is above the {VLLM_LORA_RANKS[-1]} vLLM supports")
    name = spec.name or spec.path.rstrip("/").rsplit("/", 1)[-1]
    return Adapter(uri=spec.path, name=name, rank=rank)


def local_adapter(adapter: Adapter, storage: StorageOptions) -> Path:
    """A local folder holding the adapter: the path itself, or a per-node cached copy of object storage."""
    if protocol_of(adapter.uri) == "file":
        return Path(adapter.uri.removeprefix("file://"))
    key = hashlib.sha256(adapter.uri.encode()).hexdigest()[:16]

    def fetch(tmp: Path) -> None:
        download_folder(adapter.uri, storage, tmp)
        (tmp / ".tokenmill-complete").write_text(adapter.uri)

    return build_folder_once(tokenmill_home() / "lora" / key, fetch, marker=".tokenmill-complete")


def adapter_identity(adapter: Adapter, storage: StorageOptions) -> dict:
    """What names an adapter's weights for the response cache: where it is, its rank, and its weights file's
    size and version (ETag or modification time), so an adapter replaced in place gets new keys."""
    from pipelines.io.storage import filesystem_for

    fs, root = filesystem_for(adapter.uri, storage)
    stamp = {}
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        try:
            info = fs.info(join(root, name))
        except (OSError, FileNotFoundError):
            continue
        stamp = {"file": name, "size": info.get("size"),
                 "version": str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified"))}
        break
    return {"uri": adapter.uri, "name": adapter.name, "rank": adapter.rank, **stamp}
