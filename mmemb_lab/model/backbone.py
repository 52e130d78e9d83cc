"""The backbone: a Qwen-VL model (tiny from config, or a real checkpoint) plus its tokenizer and image processor.

Concept
    MMEmb-R1 fine-tunes a pretrained MLLM (Qwen3-VL-4B in the paper). The workbench runs *the same code*
    at two scales: a real checkpoint loaded by Hub id or local path, or a tiny model of the same
    transformers architecture built from a config with random weights and a byte-level BPE tokenizer
    trained on the toy world's text. There is no separate toy model class.

    Our own special tokens: ``<think>`` / ``</think>`` open and close a reasoning span and ``<|emb|>`` is
    the embedding token whose final-normed hidden state is the embedding (``mmemb_lab.model.embed``). For a
    real checkpoint they are added to its tokenizer (Qwen3 already has the think tokens) and the input
    embeddings are resized.

Where used: every stage; notebook 00. Facts of the offline CPU stack this module relies on: the PIL image
processor (torchvision, which the default one needs, is not installed on CPU), mrope sections that sum to
head_dim / 2, and left padding (the last position is the last real token).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .. import distributed

log = logging.getLogger(__name__)

QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>")
THINK_OPEN, THINK_CLOSE, EMB_TOKEN = "<think>", "</think>", "<|emb|>"


def reasoning_span(rationale: str) -> str:
    """A rationale as the model reads and writes it: ``<think>`` rationale ``</think>``."""
    return f"{THINK_OPEN}{rationale}{THINK_CLOSE}"
OUR_SPECIAL = (THINK_OPEN, THINK_CLOSE, EMB_TOKEN)
ARCHS = {
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLConfig", 16),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig", 14),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLConfig", 14),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here (missing files, another architecture...)."""


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny backbone (defaults: the prototype that learned to see; docs/research-log.md, Prototypes)."""

    arch: str = "qwen3_vl"
    hidden: int = 192
    layers: int = 3
    heads: int = 3
    kv_heads: int = 1
    ffn: int = 512
    vision_dim: int = 128
    vision_depth: int = 2
    vision_heads: int = 2
    vocab_size: int = 512


def train_tokenizer(corpus: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE on the world's text, with the Qwen special tokens and ours; left padding."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(QWEN_SPECIAL + OUR_SPECIAL),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
    )
    return fast


def tiny_config(spec: TinySpec, tokenizer: PreTrainedTokenizerFast):
    import transformers

    cls_name, cfg_name, patch = ARCHS[spec.arch]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    head_dim = spec.hidden // spec.heads
    half = head_dim // 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # sums to head_dim / 2
    text = dict(vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.ffn,
                num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                head_dim=head_dim, max_position_embeddings=2048, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section,
                                 **({"mrope_interleaved": True} if spec.arch == "qwen3_vl" else {})})
    vision = dict(depth=spec.vision_depth, hidden_size=spec.vision_dim, intermediate_size=2 * spec.vision_dim,
                  num_heads=spec.vision_heads, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2,
                  in_channels=3)
    if spec.arch == "qwen3_vl":
        vision.update(out_hidden_size=spec.hidden, deepstack_visual_indexes=[0], num_position_embeddings=144)
    elif spec.arch == "qwen2_5_vl":
        vision.update(out_hidden_size=spec.hidden, fullatt_block_indexes=[spec.vision_depth - 1], window_size=64)
    else:
        vision.update(embed_dim=spec.vision_dim, hidden_size=spec.hidden, mlp_ratio=2)
    cfg = getattr(transformers, cfg_name)(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
    )
    return getattr(transformers, cls_name), cfg


def image_processor_for(arch: str, path: str | None = None):
    """The PIL image processor (works without torchvision); cells of 32 px are one merged token."""
    from transformers import Qwen2VLImageProcessorPil

    patch = ARCHS[arch][2]
    if path is not None and (Path(path) / "preprocessor_config.json").exists():
        return Qwen2VLImageProcessorPil.from_pretrained(path)
    return Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                    min_pixels=(2 * patch) ** 2, max_pixels=256 * 256)


def attn_implementation() -> str:
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2" if torch.cuda.is_available() else "sdpa"
    except ImportError:
        return "sdpa"


@dataclass
class Backbone:
    """Model + tokenizer + image processor + what they are; ``save``/``load`` round-trip exactly."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerFast
    image_processor: object
    arch: str
    source: str  # "tiny" or the Hub id / path it came from
    video_mode: str = "frames_as_images"
    """How frame sequences are fed (recorded with results; no torchvision video processor on CPU):
    "frames_as_images" (one vision block per frame) or "storyboard" (frames tiled into one image)."""

    @property
    def merge(self) -> int:
        return 2

    @property
    def device(self) -> torch.device:
        """Where the model's weights are: batches from ``collate`` are put there."""
        return next(self.model.parameters()).device

    def token_id(self, token: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(token)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        self.model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        self.image_processor.save_pretrained(tmp)
        (tmp / "mmemb_backbone.json").write_text(json.dumps({"arch": self.arch, "source": self.source,
                                                             "video_mode": self.video_mode}, indent=1))
        _replace_dir(tmp, path)


def _replace_dir(tmp: Path, path: Path) -> None:
    """Atomically put directory ``tmp`` at ``path`` (old contents removed only after the new are complete)."""

    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


def build_tiny(spec: TinySpec, tokenizer: PreTrainedTokenizerFast, seed: int = 0,
               video_mode: str = "frames_as_images", device: torch.device | str | None = None) -> Backbone:
    """A tiny model from config (fp32), on ``device`` (default: this process's GPU if any, else the CPU)."""
    cls, cfg = tiny_config(spec, tokenizer)
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation="sdpa").to(device or distributed.default_device())
    return Backbone(model, tokenizer, image_processor_for(spec.arch), spec.arch, "tiny", video_mode)


def load_backbone(path_or_id: str | Path, expect_arch: str | None = None, lora: dict | None = None,
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Backbone:
    """Load a saved tiny backbone or a real Qwen-VL checkpoint (Hub id or local folder), on ``device``
    (default: this process's GPU in the checkpoint's own dtype - bf16 for Qwen-VL releases, fp32 for our
    tiny models - when CUDA is there; else the CPU in fp32).

    Raises ``CheckpointError`` naming the checkpoint when it is missing or of another architecture.
    """
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    src = str(path_or_id)
    local = Path(src)
    if local.exists() and not (local / "config.json").exists():
        raise CheckpointError(f"{src}: no config.json - not a model checkpoint folder")
    if not local.exists() and _looks_local(src):
        raise CheckpointError(f"{src}: no such checkpoint folder (a Hub id is 'org/name'; this looks like a "
                              "local path - check its spelling)")
    try:
        cfg = AutoConfig.from_pretrained(src)
    except Exception as e:  # noqa: BLE001 - turned into a clear error
        raise CheckpointError(f"{src}: cannot read the model config ({e})") from e
    arch = cfg.model_type
    if arch not in ARCHS:
        raise CheckpointError(f"{src}: architecture {arch!r} is not a supported Qwen-VL ({', '.join(ARCHS)})")
    if expect_arch is not None and arch != expect_arch:
        raise CheckpointError(f"{src}: checkpoint is {arch!r} but this run expects {expect_arch!r}")
    if dtype is None:  # on a GPU the checkpoint's own dtype (bf16 for the real ones), on the CPU fp32
        dtype = "auto" if torch.cuda.is_available() else torch.float32
    model = getattr(transformers, ARCHS[arch][0]).from_pretrained(
        src, dtype=dtype, attn_implementation=attn_implementation()).to(device or distributed.default_device())
    tokenizer = AutoTokenizer.from_pretrained(src, padding_side="left")
    missing = [t for t in OUR_SPECIAL if t not in tokenizer.get_vocab()]
    if missing:  # a real checkpoint: add our span/embedding tokens and grow the embedding table
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
        model.resize_token_embeddings(len(tokenizer))
        log.info("added %s to the tokenizer of %s", missing, src)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>"
    meta = json.loads((local / "mmemb_backbone.json").read_text()) if (local / "mmemb_backbone.json").exists() else {}
    source = meta.get("source", src)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**lora))
    return Backbone(model, tokenizer, image_processor_for(arch, src if local.exists() else None), arch, source,
                    meta.get("video_mode", "frames_as_images"))


def _looks_local(src: str) -> bool:
    """A path, not a Hub id: starts with / . ~, has more than one '/', or its first folder exists here."""
    parts = Path(src).parts
    return (src.startswith(("/", ".", "~")) or src.count("/") > 1 or "\\" in src
            or (len(parts) > 1 and Path(parts[0]).is_dir()))


def lora_config(r: int = 16, alpha: int = 32, dropout: float = 0.05) -> dict:
    """LoRA on the language model only (the regex keeps Qwen2.5-VL's vision MLP out)."""
    return dict(r=r, lora_alpha=alpha, lora_dropout=dropout,
                target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")


def spec_dict(spec: TinySpec) -> dict:
    return asdict(spec)
