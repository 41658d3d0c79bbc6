"""benchmarks/bench_e2e_gpu.py end to end on the narrow Qwen2-VL-7B shape
(real vocabulary, tokenizer, chat template and patching; tiny widths) on
the CPU, a few requests per phase: every row of the table is there with
numbers and a verdict, every request was served, the step phase's prompts
were padded to the asked length and all its requests decoded together, and
transformers' processor and pyvlm's server built prompts of the same
length. No timing is asserted. Also the pieces its numbers rest on: the
roofline's weight and KV counts against transformers' own modules of the
real 7B configs, and the benchmark's pictures (distinct, all of one size)."""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
ROW_LABELS = ("TTFT ms, one fresh image, idle server", "decode tok/s, batch 1",
              "decode step ms, 2 running x ~600-token prompts",
              "output tok/s, 2 requests x 4 tokens, 2 concurrent",
              "inter-token ms p50 / p99, the same 2 requests")
NUMBER = re.compile(r"^[\d,]+(\.\d+)?(x|%)?$")


def test_the_narrow_shape_prints_every_row(tmp_path):
    out = tmp_path / "run.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/bench_e2e_gpu.py", "--model", "qwen2-vl-7b-narrow",
         "--num-ttft", "1", "--decode-tokens", "4", "--step-concurrency", "2",
         "--step-context", "600", "--step-output-tokens", "12", "--num-requests", "2",
         "--concurrency", "2", "--output-tokens", "4", "--hf-batch-sizes", "2",
         "--json-out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    report = f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    assert run.returncode == 0, report
    table = [line for line in run.stdout.splitlines() if line.startswith("| ")][1:]
    assert len(table) == len(ROW_LABELS), report
    for label, row in zip(ROW_LABELS, table):
        assert row.startswith("| " + label), row
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        numbers = [cells[0].split(" / ")[0], *(c for c in cells[1:5] if c != "n/a")]
        assert all(NUMBER.match(c) for c in numbers) and len(numbers) >= 3, row
        assert cells[-1] in ("met", "**not met**"), row
    results = json.loads(out.read_text())
    ours, shape = results["pyvlm"], results["shape"]
    assert ours["phases"] == ["ttft", "decode", "step", "throughput"], report
    assert ours["num_ok"] == ours["num_requests"] == ours["step_num_ok"] == 2, report
    assert ours["num_prompt_tokens"] == shape["num_prompt_tokens"]
    assert shape["num_tower_tokens"] == 34 * 46  # 476x644 in 14-pixel patches
    assert abs(ours["step_prompt_tokens"] - 600) <= 2 and ours["step_s"] > 0, report


@pytest.mark.parametrize("shape", ["qwen2-vl-7b", "llava-onevision-7b"])
def test_the_roofline_counts_what_transformers_holds(shape):
    """On the meta device: the decode step's weights are transformers'
    decoder layers, final norm and LM head; the vision side is the rest but
    the token embeddings and the tensors pyvlm's loader leaves out as unused
    (SigLIP's post-layernorm: LLaVA-OneVision reads the last hidden state
    before it); the KV cache is 2 x layers x kv heads x head dim."""
    import transformers

    from benchmarks.load.serve_random import config_for
    from benchmarks.offline.roofline import model_cost
    from pyvlm.models.registry import model_class_for

    config = config_for(shape)
    with torch.device("meta"):
        ours = model_class_for(config.architectures)(config).to(torch.bfloat16)
        theirs = getattr(transformers, config.architectures[0])._from_config(
            config, dtype=torch.bfloat16)
    used = {n: p.numel() for n, p in theirs.named_parameters() if ours.model_name_of(n)}
    decoder = sum(n for name, n in used.items()
                  if name.startswith(("model.language_model.", "lm_head."))
                  and "embed_tokens" not in name)
    embeddings = theirs.model.language_model.embed_tokens.weight.numel()
    cost = model_cost(ours)
    assert cost.decoder_bytes == 2 * decoder
    assert cost.vision_bytes == 2 * (sum(used.values()) - decoder - embeddings)
    assert cost.lm_head_params == theirs.lm_head.weight.numel()
    head_dim = config.text_config.hidden_size // config.text_config.num_attention_heads
    assert cost.kv_bytes_per_token == 2 * 28 * 4 * head_dim * 2


@pytest.mark.parametrize("num_photos", [0, 2])
def test_the_pictures_are_distinct_and_of_one_size(tmp_path, num_photos):
    """Crops of a folder's photos, or noise when it has none."""
    from PIL import Image

    from benchmarks.load.images import distinct_pictures

    for i in range(num_photos):
        pixels = torch.randint(0, 256, (150 + i, 200, 3), dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"photo{i}.png")
    pictures = distinct_pictures(40, (644, 476), tmp_path)
    assert {p.size for p in pictures} == {(644, 476)} and {p.mode for p in pictures} == {"RGB"}
    assert len({hashlib.sha256(p.tobytes()).digest() for p in pictures}) == 40
