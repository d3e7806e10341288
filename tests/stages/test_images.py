"""Image inputs on CPU: the image part of the user message and image loading from bytes, paths and S3.

Generation with images needs vLLM's multimodal Llama 4 class, which needs a
torchvision build PyPI has only for CUDA: that part runs in infra/gpu-check/.
"""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.config import load_job
from pipelines.config.job import ImageFetchSpec
from pipelines.config.storage import StorageOptions
from pipelines.errors import InputError
from pipelines.io.fetch import FetchPolicy
from pipelines.models.embedded import prepare
from pipelines.stages.prompt import build_messages, load_tokenizer, render_batch
from pipelines.stages.read import plan_input

JOB = Path(__file__).resolve().parents[2] / "conf/jobs/ticket_triage.yaml"
USER = "Describe product {sku}."


def png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def llama4_tokenizer_path() -> str:
    return str(prepare("tiny-llama4"))


def render(table, tokenizer_path, storage=None, allow=("/", "s3://tokenmill-images/")):
    policy = FetchPolicy.for_input(ImageFetchSpec(allow=list(allow)), "unused")
    return render_batch(table, tokenizer_path=tokenizer_path, system=None, user=USER, id_column="id",
                        max_model_len=1048, max_tokens=48, image_column="image_ref", storage=storage or StorageOptions(),
                        images=policy)


def test_user_message_is_an_image_part_then_the_text():
    assert build_messages({"sku": "A1"}, "Be brief.", USER, image=True) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe product A1."}]},
    ]
    assert build_messages({"sku": "A1"}, None, USER) == [{"role": "user", "content": "Describe product A1."}]


def test_inline_bytes_and_local_paths_become_image_prompts(llama4_tokenizer_path, tmp_path):
    red, blue = png("red"), png("blue")
    (tmp_path / "blue.png").write_bytes(blue)
    table = pa.table({"id": ["a", "b"], "sku": ["A1", "B2"], "image_ref": [red, None]})
    out = render(table, llama4_tokenizer_path)
    assert out.column("image").to_pylist() == [red, None]
    assert out.column("error_code").to_pylist() == [None, "image"]
    assert out.column("error").to_pylist() == [None, "the image column is null or empty"]

    tok = load_tokenizer(llama4_tokenizer_path)
    image_id = tok.convert_tokens_to_ids("<|image|>")
    ids = out.column("prompt_token_ids")[0].as_py()
    assert ids.count(image_id) == 1
    assert tok.decode(ids).startswith("<|begin_of_text|><|header_start|>user<|header_end|>\n\n<|image|>Describe")

    by_path = render(pa.table({"id": ["c"], "sku": ["C3"], "image_ref": [str(tmp_path / "blue.png")]}),
                     llama4_tokenizer_path)
    assert by_path.column("image").to_pylist() == [blue] and by_path.column("error")[0].as_py() is None


def test_missing_and_broken_images_are_rejected_with_a_reason(llama4_tokenizer_path, tmp_path):
    table = pa.table({"id": ["m", "x"], "sku": ["M", "X"],
                      "image_ref": [str(tmp_path / "nope.png"), str(tmp_path / "notes.txt")]})
    (tmp_path / "notes.txt").write_text("not an image")
    out = render(table, llama4_tokenizer_path)
    errors = out.column("error").to_pylist()
    assert out.column("error_code").to_pylist()[:2] == ["image", "image"]
    assert errors[0] == f"{tmp_path / 'nope.png'}: not found"
    assert errors[1].startswith(f"{tmp_path / 'notes.txt'}: not a decodable image")
    assert out.column("prompt_token_ids").null_count == 2 and out.num_rows == 2


def test_images_load_from_s3(llama4_tokenizer_path, s3_env):
    client = s3_env.client()
    client.create_bucket(Bucket="tokenmill-images")
    green = png("green")
    client.put_object(Bucket="tokenmill-images", Key="catalogue/g.png", Body=green)
    table = pa.table({"id": ["g", "h"], "sku": ["G", "H"],
                      "image_ref": ["s3://tokenmill-images/catalogue/g.png", "s3://tokenmill-images/catalogue/h.png"]})
    out = render(table, llama4_tokenizer_path, StorageOptions().resolved())
    assert out.column("image")[0].as_py() == green and out.column("error")[0].as_py() is None
    assert out.column("error_code")[1].as_py() == "image"
    assert out.column("error")[1].as_py() == "s3://tokenmill-images/catalogue/h.png: not found"


def test_missing_image_column_is_refused_before_work(tmp_path):
    pq.write_table(pq.read_table(Path(__file__).resolve().parents[2] / "data/samples/tickets/part-00000.parquet"),
                   tmp_path / "part-0.parquet")
    job = load_job(JOB, overrides=[f"input.path={tmp_path}", "prompt.image_column=photo"])
    with pytest.raises(InputError, match=r"column 'photo' \(prompt\.image_column\) is missing"):
        plan_input(job.spec, job.spec.storage.resolved())
