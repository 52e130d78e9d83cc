"""The user-facing Embedder: "never" is the harness's direct mode, "auto" opens exactly where the gate does,
bad inputs are named by index, and ``mmemb_lab.Embedder`` is this class."""

import subprocess
import sys

import pytest
import torch

import mmemb_lab
from mmemb_lab import embedder
from mmemb_lab.data import item_query
from mmemb_lab.embedder import Embedder
from mmemb_lab.eval.harness import HarnessConfig, ToySource, run_benchmark
from mmemb_lab.eval.modes import InferenceConfig
from mmemb_lab.model import embed
from mmemb_lab.model.embed import InputError
from mmemb_lab.model.gating import AdaptiveEncoder, gate_forward
from mmemb_lab.world.build import toy_registry
from mmemb_lab.world.tasks import make_item


def _as_dict(x: embed.Input) -> dict:
    """A toy input in the Embedder's dict format."""
    d = {"text": x.text, "instruction": x.instruction}
    if isinstance(x.visual, list):
        d["video"] = x.visual
    elif x.visual is not None:
        d["image"] = x.visual
    return d


@pytest.fixture(scope="module")
def items():
    """Toy queries of five datasets: images, text only, frames, a page; different lengths."""
    return [item_query(make_item(d, 0, "eval", i, 0.5)) for i, d in
            enumerate(["toy_qa", "toy_t2i", "toy_video_qa", "toy_doc", "toy_cls"])]


def test_never_equals_the_harness_direct_mode(backbone, small_world, tmp_path):
    root, info = small_world
    reg = {k: v for k, v in toy_registry(info).items() if k in ("toy_qa", "toy_video_qa")}
    source = ToySource(root)
    run_benchmark(backbone, source, reg, tmp_path, HarnessConfig(latency_sample=0), progress=False)
    emb = Embedder(backbone)
    for name in reg:
        queries = [q.query for q in source.load(reg[name]).queries]
        cached = torch.load(tmp_path / "cache" / "direct" / name / "qry-00000000.pt", weights_only=True)["emb"]
        dicts = [_as_dict(x) for x in queries]
        if name == "toy_qa":  # an image given as a file path reads back the same pixels (PNG is lossless)
            path = tmp_path / "q0.png"
            dicts[0]["image"].save(path)
            dicts[0]["image"] = str(path)
        out = emb.encode(dicts, reasoning="never")
        assert out.embeddings.shape == cached.shape and len(out) == len(queries)
        assert torch.allclose(out.embeddings, cached, atol=1e-5), name
        assert out.reasoned == (False,) * len(queries) and set(out.rationales) == {""}
        assert out.generated_tokens == (0,) * len(queries)


def test_auto_opens_exactly_where_the_gate_does(backbone, items):
    p = gate_forward(backbone, items).p_open
    t = float(p.median())  # the middle of five: two open, three stay shut
    expect = tuple(bool(v) for v in p > t)
    assert 0 < sum(expect) < len(items)
    emb = Embedder(backbone, InferenceConfig(max_new_tokens=4))
    dicts = [_as_dict(x) for x in items]
    auto = emb.encode(dicts, reasoning="auto", threshold=t)
    assert auto.reasoned == expect
    gate = AdaptiveEncoder(backbone, t, 4)
    gate(items)
    assert auto.reasoned == tuple(gate.invoked)
    never, always = emb.encode(dicts, reasoning="never"), emb.encode(dicts, reasoning="always")
    assert always.reasoned == (True,) * len(items) and all(n > 0 for n in always.generated_tokens)
    for i, opened in enumerate(expect):
        ref = always if opened else never
        assert torch.allclose(auto.embeddings[i], ref.embeddings[i], atol=1e-5), i
        assert auto.rationales[i] == ref.rationales[i] and auto.generated_tokens[i] == ref.generated_tokens[i]
    assert emb.encode(dicts, reasoning="auto", threshold=1.0).reasoned == (False,) * len(items)
    assert torch.allclose(auto.embeddings.norm(dim=-1), torch.ones(len(items)), atol=1e-5)


def test_bad_inputs_are_named_by_index(backbone, tmp_path):
    emb = Embedder(backbone)
    (tmp_path / "broken.png").write_bytes(b"no png here")
    cases = [
        ([{"text": "fine"}, {}], r"input 1: empty input"),
        ([{"text": "a"}, {"instruction": "Find it:"}], r"input 1: empty input"),
        ([{"text": "a"}, {"text": "b"}, {"image": str(tmp_path / "missing.png")}], r"input 2: missing image file"),
        ([{"image": tmp_path / "broken.png"}], r"input 0: corrupt or unreadable image .*broken.png"),
        ([{"text": "a", "video": [str(tmp_path / "missing.png")]}], r"input 0: missing image file"),
        ([{"text": "a", "audio": "x.wav"}], r"input 0: unknown key\(s\) \['audio'\]"),
        ([{"text": "a"}, {"video": "clip.mp4"}], r"input 1: video clip.mp4 is a file"),
        ([{"text": "a", "image": 3}], r"input 0: image is int"),
        (["just a string"], r"input 0: expected a dict"),
    ]
    for inputs, message in cases:
        with pytest.raises(InputError, match=message):
            emb.encode(inputs, reasoning="never")
    with pytest.raises(ValueError, match="reasoning must be one of never, always, auto"):
        emb.encode([{"text": "a"}], reasoning="sometimes")


def test_package_exports_this_embedder_and_from_pretrained_loads_the_weights(tiny_foundation, make_backbone, items):
    assert mmemb_lab.Embedder is embedder.Embedder and mmemb_lab.Embedder is not embed.Embedder
    light = subprocess.run([sys.executable, "-c", "import sys, mmemb_lab; print('torch' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    assert light.stdout.strip() == "False"  # the re-export is lazy: `import mmemb_lab` stays light
    loaded = mmemb_lab.Embedder.from_pretrained(tiny_foundation)
    dicts = [_as_dict(x) for x in items]
    ref = Embedder(make_backbone(seed=21)).encode(dicts, reasoning="never", batch_size=2)  # the saved weights
    assert torch.allclose(loaded.encode(dicts, reasoning="never").embeddings, ref.embeddings, atol=1e-5)
    one = loaded.encode({"text": "a red star"}, reasoning="never", instruction="Find the object:")
    assert torch.equal(one.embeddings,
                       loaded.encode([{"text": "a red star", "instruction": "Find the object:"}], "never").embeddings)
    assert len(loaded.encode([], reasoning="auto")) == 0
