"""The Llama 4 GPU check: tiny random Llama 4 checkpoints through the real pipeline on an NVIDIA GPU.

Run by `infra/gpu-check/run.sh` (which installs the CUDA build first). Steps:

1. build `tiny-llama4` (text, 4 experts) and `tiny-llama4-vision` (the same with a
   tiny vision encoder) with `tokenmill models prepare`;
2. run the sample ticket job through the pipeline on the text model with FP8
   weights, tensor parallel 1 (the same code and profile keys as Scout and Maverick);
3. run an image job (synthetic product photos as Parquet bytes) on the vision model;
4. run the classify and extract sample jobs on the text model: structured outputs
   (xgrammar on GPU) must give a label for every review, and every invoice must
   validate or carry a parse error (random weights ramble);
5. run `vllm bench throughput` on the same text model and prompt shape;
6. print the figures side by side; exit non-zero on any failure.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[2]


def gpu_profile(name: str, model: str, *, multimodal: bool) -> dict:
    args = {
        "dtype": "bfloat16",
        "tensor_parallel_size": 1,
        "quantization": "fp8",
        "max_model_len": 4096,
        "max_num_seqs": 256,
        "enable_prefix_caching": True,
        "gpu_memory_utilization": 0.5,
    }
    if multimodal:
        args["limit_mm_per_prompt"] = {"image": 1}
    return {"name": name, "model": model, "model_name": "tiny-llama4", "device": "gpu",
            "resources": {"num_cpus": 1, "num_gpus": 1}, "engine_args": args}


def write_conf(conf: Path) -> None:
    shutil.copytree(REPO / "conf", conf)
    for name, model, mm in (("gpu-tiny-llama4-fp8", "embedded:tiny-llama4", False),
                            ("gpu-tiny-llama4-vision-fp8", "embedded:tiny-llama4-vision", True)):
        (conf / "engines" / f"{name}.yaml").write_text(yaml.safe_dump(gpu_profile(name, model, multimodal=mm)))


def product_photos(out: Path, n: int = 64) -> None:
    from PIL import Image, ImageDraw

    rows = []
    for i in range(n):
        img = Image.new("RGB", (320, 240), (40 * (i % 6), 90, 200 - 3 * i))
        ImageDraw.Draw(img).rectangle([20 + i, 30, 200, 180 - i], outline=(255, 255, 255), width=3)
        buf = io.BytesIO()
        img.save(buf, format="JPEG")
        rows.append({"sku": f"SKU-{i:04d}", "title": f"Sample product {i}", "photo": buf.getvalue()})
    out.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "part-00000.parquet")


def run_job(conf: Path, job: Path, run_id: str, *overrides: str, all_ok: bool = True) -> dict:
    from pipelines.config import load_job
    from pipelines.run.runner import run_job as run

    summary = run(load_job(job, overrides=list(overrides), conf_dir=conf), run_id=run_id, progress=False)
    if summary["records_out"] != summary["records_in"]:
        raise SystemExit(f"{run_id}: {summary['records_in']} records in but {summary['records_out']} out")
    if all_ok and summary["records_ok"] != summary["records_in"]:
        raise SystemExit(f"{run_id}: {summary['records_failed']} of {summary['records_in']} records failed: "
                         f"{summary['errors_by_kind']}")
    return summary


def vllm_bench(model: str, prompts: int, input_len: int, output_len: int) -> dict:
    cmd = ["vllm", "bench", "throughput", "--model", model, "--quantization", "fp8", "--dtype", "bfloat16",
           "--max-model-len", "4096", "--gpu-memory-utilization", "0.5", "--input-len", str(input_len),
           "--output-len", str(output_len), "--num-prompts", str(prompts)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    match = re.search(r"Throughput: ([\d.]+) requests/s, ([\d.]+) total tokens/s, ([\d.]+) output tokens/s", text)
    if proc.returncode != 0 or not match:
        raise SystemExit(f"vllm bench throughput failed (exit {proc.returncode}):\n{text[-3000:]}")
    return {"requests_per_s": float(match[1]), "total_tokens_per_s": float(match[2]),
            "output_tokens_per_s": float(match[3])}


def main() -> int:
    from pipelines.models.embedded import prepare

    t0 = time.perf_counter()
    text_model = prepare("tiny-llama4")
    prepare("tiny-llama4-vision")
    with tempfile.TemporaryDirectory(prefix="tokenmill-gpu-check-") as tmp:
        work = Path(tmp)
        conf = work / "conf"
        write_conf(conf)
        out = work / "out"
        tickets = run_job(conf, conf / "jobs/ticket_triage.yaml", "gpu-text", "engine=gpu-tiny-llama4-fp8",
                          f"output.path={out}", f"input.path={REPO / 'data/samples/tickets'}",
                          "sampling.max_tokens=48", "sampling.ignore_eos=true")
        product_photos(work / "photos")
        image_job = conf / "jobs/ticket_triage.yaml"
        images = run_job(conf, image_job, "gpu-image", "engine=gpu-tiny-llama4-vision-fp8", f"output.path={out}",
                         f"input.path={work / 'photos'}", "input.id_column=sku", "output.passthrough=[title]",
                         "prompt.system=Describe the product photo in one sentence.",
                         "prompt.user=Product: {title}", "prompt.image_column=photo", "sampling.max_tokens=16")
        # The engine counts each image's tokens in the prompt: far more than the text alone.
        if images["prompt_tokens"] < images["records_in"] * 144:
            raise SystemExit(f"image job: {images['prompt_tokens']} prompt tokens for {images['records_in']} "
                             "images; image tokens were not counted")
        engine = "engine=gpu-tiny-llama4-fp8"
        labels = run_job(conf, conf / "jobs/review_sentiment.yaml", "gpu-classify", engine, f"output.path={out}",
                         f"input.path={REPO / 'data/samples/reviews'}")
        fields = run_job(conf, conf / "jobs/invoice_fields.yaml", "gpu-extract", engine, f"output.path={out}",
                         f"input.path={REPO / 'data/samples/invoices'}", all_ok=False)
        if set(fields["errors_by_kind"]) - {"parse"}:
            raise SystemExit(f"extract job: errors other than parse errors: {fields['errors_by_kind']}")
        mean_prompt = round(tickets["prompt_tokens"] / tickets["records_in"])
        bench = vllm_bench(str(text_model), tickets["records_in"], mean_prompt, 48)

    figures = {
        "text_job": {k: tickets[k] for k in ("records_in", "records_ok", "prompt_tokens", "completion_tokens",
                                               "engine_start_s", "output_tokens_per_s",
                                               "steady_output_tokens_per_s", "cost_usd")},
        "image_job": {k: images[k] for k in ("records_in", "records_ok", "prompt_tokens", "completion_tokens",
                                               "engine_start_s", "steady_output_tokens_per_s")},
        "classify_job": {k: labels[k] for k in ("records_in", "records_ok", "steady_output_tokens_per_s")},
        "extract_job": {k: fields[k] for k in ("records_in", "records_ok", "records_failed",
                                                 "steady_output_tokens_per_s")},
        "vllm_bench_throughput": bench,
        "pipeline_to_vllm_bench": tickets["steady_output_tokens_per_s"] / bench["output_tokens_per_s"],
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print("TOKENMILL_GPU_CHECK " + json.dumps(figures, indent=2))
    print(f"gpu check passed: pipeline {tickets['steady_output_tokens_per_s']:.0f} output tok/s at steady state, "
          f"vllm bench throughput {bench['output_tokens_per_s']:.0f}: ratio {figures['pipeline_to_vllm_bench']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
