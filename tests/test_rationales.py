"""`mmemb-lab rationales` on an MMEB-train-layout fixture with a tiny Qwen3-VL worker: bad rows named and
skipped, a manifest per worker, a rerun that skips every shard, a changed prompt refused, and two processes
(torchrun, gloo) writing the same rationales as one."""

import io
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmemb_lab import cli
from mmemb_lab.method.counterfactual import TAU
from mmemb_lab.method.workers import load_candidates
from mmemb_lab.runs import Manifest
from tests.test_mmeb import write_mmeb

GOOD = [0, 1, 3, 5, 6]


def _train_fixture(root: Path) -> Path:
    """VOC2007 in MMEB-train's layout (``<subset>/original-*.parquet``, images under ``images/<subset>``):
    row 2 names an image that is not there, row 4 has neither text nor image."""
    rows = []
    for i in range(7):
        img = f"VOC2007/{i}.jpg"
        if i != 2:
            (root / "images" / "VOC2007").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (48, 48), (30 * i, 90, 200 - 20 * i)).save(root / "images" / img)
        qry = "" if i == 4 else f"<|image_1|> Represent the given image for classification {i}"
        rows.append({"qry": qry, "qry_image_path": "" if i == 4 else img, "pos_text": f"class {i}",
                     "pos_image_path": "", "neg_text": "", "neg_image_path": ""})
    (root / "VOC2007").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "VOC2007" / "original-00000-of-00001.parquet")
    return root / "VOC2007"


def _args(subset, ckpt, out, *extra):
    return ["rationales", "--train", str(subset), "--hf", f"tiny={ckpt}", "--out", str(out), "--shard-size", "2",
            "--batch-size", "2", "--max-new-tokens", "4", *extra]


@pytest.fixture(scope="module")
def setup(make_backbone, tmp_path_factory):
    base = tmp_path_factory.mktemp("rationales")
    make_backbone(seed=4).save(base / "vlm")
    return base, _train_fixture(base / "train"), base / "vlm"


def test_rationales_command_on_mmeb_train_layout(setup, capsys):
    base, subset, ckpt = setup
    out = base / "one"
    assert cli.main(_args(subset, ckpt, out)) == 0
    first = json.loads(capsys.readouterr().out)["tiny"]
    assert first["rows"] == 5 and first["shards_done"] == 3 and sum(first["status_counts"].values()) == 5
    ds = load_candidates(out / "tiny")
    assert sorted(ds["row_id"]) == [f"VOC2007 train row {i}" for i in GOOD]  # each usable row exactly once
    skipped = json.loads((out / "skipped.json").read_text())
    assert len(skipped) == 2
    assert "VOC2007 train row 2: missing image file" in skipped[0] and "VOC2007 train row 4" in skipped[1]
    m = Manifest.load(out / "tiny")
    assert m.config["worker"]["checkpoint"] == str(ckpt) and m.config["source"]["split"] == "original"
    assert m.inputs["data"]  # the table's digest: other data, another folder

    assert cli.main(_args(subset, ckpt, out)) == 0  # a rerun reuses every shard
    again = json.loads(capsys.readouterr().out)["tiny"]
    assert again["shards_done"] == 0 and again["shards_skipped"] == 3 and again["rows"] == 5

    assert cli.main(_args(subset, ckpt, out, "--prompt", "Describe the image first.")) == 2  # refused, named
    assert "prompt" in capsys.readouterr().err
    assert sorted(load_candidates(out / "tiny")["row_id"]) == sorted(ds["row_id"])  # nothing lost


def test_bad_worker_arguments_are_usage_errors(setup, capsys):
    base, subset, _ = setup
    assert cli.main(["rationales", "--train", str(subset), "--http", "api=http://x", "--out", str(base / "x")]) == 2
    assert "NAME=MODEL@URL" in capsys.readouterr().err


def test_two_processes_write_what_one_writes(setup, capsys):
    base, subset, ckpt = setup
    one = base / "one-b"
    assert cli.main(_args(subset, ckpt, one)) == 0
    capsys.readouterr()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="")
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    r = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", "29541", "-m", "mmemb_lab",
                        *_args(subset, ckpt, base / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = load_candidates(one / "tiny"), load_candidates(base / "two" / "tiny")
    as_dict = lambda ds: dict(zip(ds["row_id"], zip(ds["rationale"], ds["status"], ds["n_tokens"])))  # noqa: E731
    assert as_dict(a) == as_dict(b) and len(as_dict(a)) == 5


class _Answers(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that names the class the query's last word numbers ("class 3")."""

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n = body["messages"][0]["content"][-1]["text"].split("\n")[0].split()[-1]
        reply = {"choices": [{"message": {"content": f"<think>it shows class {n}</think>"}, "finish_reason": "stop"}],
                 "usage": {"completion_tokens": 6}}
        payload = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def test_select_on_real_rationales_keeps_only_candidates_that_pass(setup, capsys):
    """`select --rationales` reads the source and the workers from the rationale folders' manifests, scores
    every candidate against removal and swap with the evaluator, and keeps per pair at most one usable
    candidate whose swap gain passes tau; a rerun reuses the selection, new candidates make a new one."""
    base, subset, ckpt = setup
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    cands, sel = base / "cands", base / "sel"
    try:
        assert cli.main(_args(subset, ckpt, cands, "--http", f"api=some-model@{url}")) == 0
    finally:
        srv.shutdown()
    capsys.readouterr()
    assert cli.main(["select", "--rationales", str(cands), "--backbone", str(ckpt), "--out", str(sel)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"] == 5 and summary["usable_by_worker"]["api"] == 1.0
    rows = [json.loads(line) for line in (sel / "selected.jsonl").read_text().splitlines()]
    assert [r["row_id"] for r in rows] == [f"VOC2007 train row {i}" for i in GOOD]
    api = dict(zip(*(load_candidates(cands / "api")[k] for k in ("row_id", "rationale"))))
    for r in rows:
        assert (r["worker"] is None) == (r["rationale"] is None)
        if r["worker"] is not None:
            assert r["gain"] > TAU and (r["worker"] != "api" or r["rationale"] == api[r["row_id"]])
    assert Manifest.load(sel).inputs["rationales/api"] == Manifest.load(cands / "api").digest()
    assert cli.main(["select", "--rationales", str(cands), "--backbone", str(ckpt), "--out", str(sel)]) == 0
    assert json.loads(capsys.readouterr().out) == summary  # reused


def _torchrun(args, port, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="")
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    r = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", port, "-m", "mmemb_lab", *args], cwd=cwd,
                       env=env, capture_output=True, text=True, timeout=600)
    (Path(cwd) / f"torchrun-{port}.log").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_the_method_on_real_layouts_through_the_cli(make_backbone, tmp_path, arch, capsys):
    """Every stage through the CLI on MMEB-layout fixtures with a tiny random model of the real architecture:
    rationales -> select -> stage 1 (2 processes) -> stage 2 -> the MMEB-V2 benchmark in the adaptive mode
    (2 processes), each stage reading its upstream from the folder before it; rerunning a stage reuses it."""
    make_backbone(arch=arch, seed=6).save(tmp_path / "init")
    subset, init = _train_fixture(tmp_path / "train"), str(tmp_path / "init")
    data = write_mmeb(tmp_path / "MMEB-V2")
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert cli.main(["rationales", "--train", str(subset), "--hf", f"own={init}", "--http",
                         f"api=m@http://127.0.0.1:{srv.server_address[1]}/v1", "--max-new-tokens", "4",
                         "--out", str(tmp_path / "cands")]) == 0
    finally:
        srv.shutdown()
    assert cli.main(["select", "--rationales", str(tmp_path / "cands"), "--backbone", init,
                     "--out", str(tmp_path / "sel")]) == 0
    stage1 = ["stage1", "--selected", str(tmp_path / "sel"), "--backbone", init, "--out", str(tmp_path / "s1"),
              "--set", "loop.steps=2", "--set", "loop.warmup=0", "--set", "loop.ckpt_every=2", "--set", "batch_size=4",
              "--set", "hard_negatives=2"]
    _torchrun(stage1, "29581" if arch == "qwen3_vl" else "29582", tmp_path)
    first = json.loads((tmp_path / "s1" / "result.json").read_text())
    assert first["steps"] == 2 and first["pairs"] == 5 and Manifest.load(tmp_path / "s1").inputs["select"]
    capsys.readouterr()
    stage2 = ["stage2", "--stage1", str(tmp_path / "s1"), "--out", str(tmp_path / "s2"), "--set", "steps=2",
              "--set", "prompts_per_step=2", "--set", "num_generations=2", "--set", "max_completion_length=4"]
    assert cli.main(stage2) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["steps"] == 2 and [r["step"] for r in res["invocation"]][0] == 0
    assert (tmp_path / "s2" / "model").exists()
    assert cli.main(stage2) == 0 and json.loads(capsys.readouterr().out) == res  # done: reused
    out = _torchrun(["benchmark", "--benchmark", "mmeb-v2", "--data", str(data), "--backbone",
                     str(tmp_path / "s2" / "model"), "--mode", "adaptive", "--max-new-tokens", "4", "--chunk-size", "2",
                     "--datasets", "ImageNet-1K", "MSCOCO_t2i", "--out", str(tmp_path / "bench")],
                    "29583" if arch == "qwen3_vl" else "29584", tmp_path)
    table = [ln for ln in out.splitlines() if ln.startswith("| ")]  # the MMEB-V2 table: header, our row, peers
    assert '"mode": "adaptive"' in out and len(table) >= 2 and "adaptive" in table[1]
    assert "partial, 2 of 78 datasets" in out
    for name in ("ImageNet-1K", "MSCOCO_t2i"):
        score = json.loads((tmp_path / "bench" / "adaptive" / f"{name}_score.json").read_text())
        assert score["n_queries"] > 0 and 0 <= score["reasoned_share"] <= 1


PAPER = Path(__file__).parent.parent / "configs" / "recipes" / "paper.yaml"


BOOKKEEPING = {"manifest.json", "skipped.json", "metrics.jsonl", "results.json"}
"""Rewritten by every run with the same content (the manifest checked, the skip report, the benchmark's summary)."""


def _mtimes(folder: Path) -> dict:
    """When each output file of a stage was written: the same after a rerun = the stage was reused."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and p.name not in BOOKKEEPING}


def test_the_paper_recipe_on_fixtures_under_torchrun(make_backbone, tmp_path):
    """configs/recipes/paper.yaml with a tiny random Qwen3-VL (LoRA, merged into stage 1's saved model) and
    MMEB-layout fixtures, the whole chain under `torchrun --nproc-per-node 2 -m mmemb_lab run`: every stage's
    folder with its manifest and an MMEB-V2 table for the adaptive mode; a rerun reuses every stage; a changed
    stage-2 setting reruns stage 2 and the benchmark only."""
    make_backbone(seed=7).save(tmp_path / "init")
    _train_fixture(tmp_path / "train")
    data = write_mmeb(tmp_path / "MMEB-V2")
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    init, out = str(tmp_path / "init"), tmp_path / "run"
    sets = [f"backbone={init}", f"train.path={tmp_path / 'train'}", "train.datasets=[VOC2007]",
            f"workers.hf=[own={init}]", f"workers.http=[api=m@http://127.0.0.1:{srv.server_address[1]}/v1]",
            "workers.max_new_tokens=4", "shard_size=2", "stage1.batch_size=4", "stage1.chunk_size=2",
            "stage1.loop={steps: 2, lr: 1.0e-3, warmup: 0, ckpt_every: 2}", "stage2.steps=2",
            "stage2.prompts_per_step=2", "stage2.num_generations=2", "stage2.max_completion_length=4",
            f"benchmark.data={data}", "benchmark.datasets=[ImageNet-1K, MSCOCO_t2i]", "benchmark.chunk_size=2",
            "benchmark.max_new_tokens=4"]
    args = ["run", str(PAPER), "--out", str(out), *[x for s in sets for x in ("--set", s)]]
    try:
        printed = _torchrun(args, "29591", tmp_path)
        for stage in ("rationales/own", "rationales/api", "select", "stage1", "stage2"):
            assert Manifest.load(out / stage) is not None, stage
        table = [ln for ln in printed.splitlines() if ln.startswith("| ")]
        assert len(table) >= 2 and "adaptive" in table[1] and (out / "table.md").read_text().startswith("| ")
        first = json.loads((out / "results.json").read_text())
        assert first["stage1"]["steps"] == 2 and first["stage2"]["steps"] == 2
        assert set(first["benchmark"]["per_dataset"]) == {"ImageNet-1K", "MSCOCO_t2i"}
        before = {s: _mtimes(out / s) for s in ("rationales", "select", "stage1", "stage2", "benchmark")}

        _torchrun(args, "29592", tmp_path)  # the same recipe again: every stage reused
        after = {s: _mtimes(out / s) for s in before}
        assert after == before, {s: sorted(k for k in set(after[s]) | set(before[s]) if after[s].get(k) != before[s].get(k))
                                 for s in before}
        second = json.loads((out / "results.json").read_text())
        assert all(r["shards_done"] == 0 and r["shards_skipped"] == 3 for r in second["rationales"].values())
        assert all(second[k] == first[k] for k in ("select", "stage1", "stage2"))
        assert second["benchmark"]["per_dataset"] == first["benchmark"]["per_dataset"]

        _torchrun(args + ["--set", "stage2.steps=3"], "29593", tmp_path)  # stage 2 changed
        again = json.loads((out / "results.json").read_text())
        for s in ("rationales", "select", "stage1"):
            assert _mtimes(out / s) == before[s], s
        assert again["stage2"]["steps"] == 3 and _mtimes(out / "stage2") != before["stage2"]
        assert Manifest.load(out / "stage2").config["steps"] == 3
        assert list(tmp_path.glob("run/stage2.stale-*"))  # the old stage 2 moved aside, never deleted
        assert _mtimes(out / "benchmark") != before["benchmark"]
    finally:
        srv.shutdown()


def _llavahound_fixture(root: Path) -> tuple[Path, Path]:
    """LLaVA-Hound's layout: a jsonl of {id, video, conversations} and one frame folder per clip. Row 2 names a
    clip with no frame folder, row 3 has an empty answer."""
    frames = root / "frames"
    rows = []
    for i in range(4):
        if i != 2:
            for k in range(1, 11):
                (frames / f"clip{i}").mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (32, 32), (20 * k, 10 * i, 90)).save(frames / f"clip{i}" / f"frame_{k}.jpg")
        answer = "" if i == 3 else f"a red ball rolls left {i}"
        rows.append({"id": f"v{i}", "video": f"clip{i}", "conversations": [
            {"from": "human", "value": f"<video>\nWhat happens in clip {i}?"}, {"from": "gpt", "value": answer}]})
    (root / "video_qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "video_qa.jsonl", frames


def test_video_and_visdoc_training_layouts(setup, tmp_path, capsys):
    """The other training sets of VLM2Vec-V2's recipe, in their published layouts: LLaVA-Hound read three ways
    (caption, video retrieval, QA) and ViDoRe's colpali_train_set (page + question -> answer); bad rows named."""
    from mmemb_lab.data import DataError
    from mmemb_lab.eval.mmeb import load_llavahound_rows, load_vidore_rows, resolve

    jsonl, frames = _llavahound_fixture(tmp_path / "hound")
    problems: list[str] = []
    cap = load_llavahound_rows(jsonl, frames, "video_qa", "caption", problems=problems)
    assert [q.name for q, _, _ in cap] == ["video_qa train row 0", "video_qa train row 1"]
    assert "row 2: missing video frames folder" in problems[0] and "row 3: conversations need" in problems[1]
    q, p, n = cap[1]
    assert q.text == "What happens in clip 1?" and p.text == "a red ball rolls left 1" and n is None
    assert len(resolve(q).visual) == 8 and p.visual is None  # 8 of the 10 frames, as for evaluation
    q, p, _ = load_llavahound_rows(jsonl, frames, "video_qa", "video_retrieval")[0]
    assert q.visual is None and q.text == "a red ball rolls left 0" and q.instruction.startswith("Find a video")
    assert len(resolve(p).visual) == 8 and p.instruction.startswith("Understand the content")
    q, _, _ = load_llavahound_rows(jsonl, frames, "video_qa", "qa")[0]
    assert q.instruction.startswith("Answer a question") and q.visual is not None
    with pytest.raises(DataError, match="video_qa train row 2: missing video frames folder"):
        load_llavahound_rows(jsonl, frames, "video_qa", strict=True)

    buf = io.BytesIO()
    Image.new("RGB", (40, 56), (5, 150, 60)).save(buf, format="PNG")
    page = {"bytes": buf.getvalue(), "path": "p0.png"}
    rows = [{"query": q, "image": page, "image_filename": "p0.png", "answer": a, "source": "s", "options": None,
             "page": "1", "model": "m", "prompt": "p", "answer_type": "extractive"}
            for q, a in (("What is the total?", "42"), ("", "7"), ("Which year?", "1999"))]
    (tmp_path / "colpali").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "colpali" / "train-00000-of-00001.parquet")
    problems = []
    doc = load_vidore_rows(tmp_path / "colpali", "colpali_train_set", problems=problems)
    assert [q.text for q, _, _ in doc] == ["What is the total?", "Which year?"] and doc[1][1].text == "1999"
    assert resolve(doc[0][0]).visual.getpixel((0, 0)) == (5, 150, 60)
    assert problems == ["colpali_train_set train row 1: empty query"]

    _, _, ckpt = setup  # the rationales command on a video source: the rows it can use, the skipped ones named
    assert cli.main(["rationales", "--llavahound", str(jsonl), "--frames", str(frames), "--mode", "qa", "--hf",
                     f"tiny={ckpt}", "--max-new-tokens", "4", "--out", str(tmp_path / "cands")]) == 0
    assert json.loads(capsys.readouterr().out)["tiny"]["rows"] == 2
    assert len(json.loads((tmp_path / "cands" / "skipped.json").read_text())) == 2
    assert Manifest.load(tmp_path / "cands" / "tiny").config["source"]["mode"] == "qa"
