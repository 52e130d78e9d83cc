"""Shared fixtures: a tiny random backbone per architecture and a seconds-sized toy world."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

SMALL = dict(hidden=64, layers=2, heads=2, kv_heads=1, ffn=128, vision_dim=32, vision_depth=1, vision_heads=1,
             vocab_size=400)


@pytest.fixture(scope="session")
def tokenizer():
    from mmemb_lab.model.backbone import train_tokenizer
    from mmemb_lab.train.foundation import world_corpus

    return train_tokenizer(world_corpus(0, 300), 400)


@pytest.fixture(scope="session")
def make_backbone(tokenizer):
    from mmemb_lab.model.backbone import TinySpec, build_tiny

    def make(arch="qwen3_vl", seed=0):
        bb = build_tiny(TinySpec(arch=arch, **SMALL), tokenizer, seed=seed, device="cpu")  # GPU: tests/test_gpu.py
        bb.model.eval()
        return bb
    return make


@pytest.fixture(scope="session")
def backbone(make_backbone):
    return make_backbone()


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    from mmemb_lab.world.build import WorldConfig, build_world

    root = tmp_path_factory.mktemp("world") / "w"
    info = build_world(root, WorldConfig(seed=3, n_train=16, n_eval=12), progress=False)
    return root, info


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def tiny_foundation(make_backbone, tmp_path_factory):
    """A stand-in foundation checkpoint (random tiny weights, real fingerprint): tests of the pipeline's
    plumbing must not wait for, nor depend on, the committed stage-0 model."""
    import json

    from mmemb_lab.train.foundation import WORLD_VERSION, world_fingerprint

    path = tmp_path_factory.mktemp("foundation") / "f"
    bb = make_backbone(seed=21)
    bb.save(path)
    (path / "foundation.json").write_text(json.dumps({
        "world_version": WORLD_VERSION, "fingerprint": world_fingerprint(bb.tokenizer), "seed": 0,
        "description_accuracy": {}}))
    return path


@pytest.fixture(scope="session")
def smoke_run(tiny_foundation, tmp_path_factory):
    """ONE finished demo run on the smoke preset (seed 3, the stand-in foundation), shared by the session:
    tests/test_demo.py checks it, notebook 07 and the browser test draw their figures from it. Returns
    (folder holding ``run/``, ``world/`` and an unused ``figures/``, the summary)."""
    import os

    from mmemb_lab.demo import run_demo

    base = tmp_path_factory.mktemp("smoke")
    before = os.environ.get("MMEMB_FIGURES")
    os.environ["MMEMB_FIGURES"] = str(base / "figures")  # a run must never write there (test_demo checks)
    try:
        summary = run_demo(seed=3, out=base / "run", preset="smoke", world_dir=base / "world", progress=False,
                           foundation=tiny_foundation)
    finally:
        if before is None:
            os.environ.pop("MMEMB_FIGURES", None)
        else:
            os.environ["MMEMB_FIGURES"] = before
    return base, summary
