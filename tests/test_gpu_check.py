"""The prepared GPU check cannot rot: it runs end to end on the CPU with the tiny spec, and the paper-scale
model it builds has the released Qwen3-VL-4B's shape (checked on the meta device: no memory, no download)."""

import json

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from mmemb_lab.cli import main
from mmemb_lab.gpu_check import build_backbone
from mmemb_lab.paths import foundation_dir


def test_gpu_check_runs_on_the_cpu_with_the_tiny_spec(tmp_path):
    assert main(["gpu-check", "--scale", "tiny", "--out", str(tmp_path), "--per-gpu-batch", "4", "--chunk", "2",
                 "--steps", "2", "--n-embed", "4", "--n-gate", "1", "--peak-tflops", "1"]) == 0
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    s1 = res["stage1"]
    assert s1["per_gpu_batch"] == 4 and s1["gradcache_chunk"] == 2 and s1["samples_per_s"] > 0
    assert s1["mfu_est"] == pytest.approx(s1["flops_per_s_est"] / 1e12)
    assert res["embedding_direct"]["inputs_per_s"] > 0
    assert 0 < res["gate"]["closed_ms_p50"] < res["gate"]["open_ms_p50"]  # writing a span costs more than deciding


def test_the_paper_scale_model_has_the_released_shape():
    tok = PreTrainedTokenizerFast.from_pretrained(foundation_dir(), padding_side="left")
    bb = build_backbone("qwen3-vl-4b", tok, "meta")
    n = sum(p.numel() for p in bb.model.parameters())
    assert 4.3e9 < n < 4.6e9, n  # Qwen3-VL-4B: about 4.4 billion parameters, embeddings tied
    text = bb.model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.head_dim, text.num_key_value_heads) == (2560, 36, 128, 8)
    assert bb.model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert next(bb.model.parameters()).dtype == torch.bfloat16


def test_paper_scale_refuses_a_cpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert main(["gpu-check", "--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
