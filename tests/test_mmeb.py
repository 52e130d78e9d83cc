"""Real MMEB-V2 schemas: fixtures written here in each published column set are loaded, embedded and scored.

``write_mmeb`` builds a miniature MMEB-V2 folder (the layout of ``mmemb_lab.eval.mmeb``) with one or two
datasets per schema; ``bad`` plants the bad-data cases the harness must report (tests/test_harness.py).
"""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image

from mmemb_lab.data import DataError
from mmemb_lab.eval import mmeb
from mmemb_lab.eval.registry import MMEB_V2
from mmemb_lab.eval.scoring import score_set
from mmemb_lab.model.embed import embed

LABELS = ["tench", "goldfinch", "tree frog", "scuba diver"]


def _png(path, rgb, size=64):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path)
    return path


def _png_bytes(rgb, size=64):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return buf.getvalue()


def _targz(names):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name in names:
            data = _png_bytes((9, 9, 9))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _parquet(rows, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _frames(folder, n, base=0):
    """n frames named frame_1..frame_n (unpadded: natural sort matters); frame k has grey level base + 10k."""
    for k in range(n):
        _png(folder / f"frame_{k + 1}.jpg", (base + 10 * k,) * 3, size=32)


def write_mmeb(root, bad=frozenset()):
    """A miniature MMEB-V2 folder: image (merged, split), video (local, global CLS, global RET), visdoc (BEIR)."""
    img = root / "image"
    images = img / "images"
    # ImageNet-1K: merged instruction, <|image_1|> placeholder, text candidates, positive first
    rows = []
    for i in range(4):
        _png(images / "ImageNet-1K" / f"val_{i}.JPEG", (60 * i, 255 - 60 * i, 90))
        order = [LABELS[i]] + [x for x in LABELS if x != LABELS[i]]
        rows.append({"qry_text": "<|image_1|>\nRepresent the given image for classification",
                     "qry_img_path": f"ImageNet-1K/val_{i}.JPEG", "tgt_text": order, "tgt_img_path": [""] * 4})
    if "empty_candidates" in bad:
        rows[2]["tgt_text"], rows[2]["tgt_img_path"] = [], []
    _parquet(rows, img / "ImageNet-1K" / "test-00000-of-00001.parquet")
    # MSCOCO_t2i: the instruction-split variant (what VLM2Vec-V2 loads), image candidates, save_to_disk
    rows = {k: [] for k in ("qry_inst", "qry_text", "qry_img_path", "tgt_inst", "tgt_text", "tgt_img_path")}
    for i in range(3):  # row i ranks images i, i+1, i+2 (mod 4): 4 distinct images in all
        paths = [f"MSCOCO_t2i/img_{(i + j) % 4}.jpg" for j in range(3)]
        rows["qry_inst"].append("Find me an everyday image that matches the given caption:")
        rows["qry_text"].append(["a red bus", "a green field", "a blue sea"][i])
        rows["qry_img_path"].append("")
        rows["tgt_inst"].append("<|image_1|>\nRepresent the given image.")
        rows["tgt_text"].append(["<|image_1|>"] * 3)
        rows["tgt_img_path"].append(paths)
    for j, rgb in enumerate([(220, 30, 30), (30, 200, 40), (20, 40, 210), (230, 230, 30)]):
        _png(images / "MSCOCO_t2i" / f"img_{j}.jpg", rgb)
    if "unreadable_image" in bad:  # exists, but is no image: found when the pixels are read
        (images / "MSCOCO_t2i" / "img_3.jpg").write_bytes(b"\xff\xd8 this is no jpeg")
    Dataset.from_dict(rows).save_to_disk(str(img / "MSCOCO_t2i"))

    vid, frames = root / "video", root / "video" / "frames"
    # Video-MME (local QA): rows in the instruction-split schema, the query path names a frames folder
    rows = []
    for i in range(3):
        _frames(frames / "video_qa" / "Video-MME" / f"v{i}", 12, base=40 * i)
        opts = [f"answer {c}" for c in "ABCD"]
        rows.append({"qry_inst": "", "qry_text": f"Question {i}: what happens?",
                     "qry_img_path": f"video_qa/Video-MME/v{i}", "tgt_inst": "",
                     "tgt_text": [opts[i]] + [o for o in opts if o != opts[i]], "tgt_img_path": [""] * 4})
    if "missing_frame" in bad:
        (frames / "video_qa" / "Video-MME" / "v1" / "frame_5.jpg").unlink()
    _parquet(rows, vid / "Video-MME" / "test.parquet")
    # K700 (global CLS): video_id + pos_text; the pool is every label, plus labels.txt
    for i in range(3):
        _frames(frames / "K700" / f"k{i}", 10, base=5 * i)
    _parquet([{"video_id": f"k{i}", "pos_text": lab} for i, lab in enumerate(["abseiling", "archery", "abseiling"])],
             vid / "K700" / "test.parquet")
    (vid / "K700" / "labels.txt").write_text("abseiling\narchery\nbaking cookies\n")
    # MSR-VTT (global RET): video_id + caption (a string or a list); the pool is every distinct clip
    for i in range(3):
        _frames(frames / "MSR-VTT" / f"video{i}", 9, base=70 * i)
    (vid / "MSR-VTT").mkdir(parents=True, exist_ok=True)
    (vid / "MSR-VTT" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"video_id": "video0", "caption": "a man is singing"},
        {"video_id": "video1", "caption": ["a cat plays piano", "a kitten on a keyboard"]},
        {"video_id": "video2", "caption": "cars race on a track"}]) + "\n")

    # ViDoRe_arxivqa (visdoc, BEIR): image column as {"bytes", "path"} structs, graded qrels
    doc = root / "visdoc" / "ViDoRe_arxivqa"
    queries = ["revenue in 2020", "figure 3 axis", "table of contents"]
    _parquet([{"query-id": f"q{i}", "query": t} for i, t in enumerate(queries)],
             doc / "queries" / "test-00000-of-00001.parquet")
    _parquet([{"corpus-id": f"p{j}", "image": {"bytes": _png_bytes((40 * j, 100, 200 - 40 * j)), "path": f"p{j}.png"}}
              for j in range(4)], doc / "corpus" / "test-00000-of-00001.parquet")
    qrels = [("q0", "p0", 2), ("q0", "p1", 1), ("q1", "p2", 1), ("q2", "p3", 2), ("q2", "p1", 0)]
    if "qrels_orphan" in bad:
        qrels.append(("q1", "p-404", 1))
    _parquet([{"query-id": q, "corpus-id": c, "score": s} for q, c, s in qrels],
             doc / "qrels" / "test-00000-of-00001.parquet")
    (root / mmeb.MANIFEST).write_text(json.dumps({"benchmark": "mmeb-v2", "datasets": {
        n: {"split_version": f"fixture/{n}@test"} for n in
        ("ImageNet-1K", "MSCOCO_t2i", "Video-MME", "K700", "MSR-VTT", "ViDoRe_arxivqa")}}))
    return root


FIXTURE_DATASETS = ("ImageNet-1K", "MSCOCO_t2i", "Video-MME", "K700", "MSR-VTT", "ViDoRe_arxivqa")


@pytest.fixture(scope="module")
def mmeb_root(tmp_path_factory):
    return write_mmeb(tmp_path_factory.mktemp("mmeb") / "MMEB-V2")


def _embed_and_score(backbone, es, info):
    c = embed(backbone, mmeb.resolve_all(es.candidates.values()))
    q = embed(backbone, mmeb.resolve_all(x.query for x in es.queries))
    return score_set(es, q, c, info.metric), q, c


def test_image_merged_variant_positive_first_and_deduplicated(backbone, mmeb_root):
    info = MMEB_V2["ImageNet-1K"]
    es = mmeb.load_dataset(mmeb_root, info)
    assert es.eval_type == "local" and len(es.queries) == 4 and es.version == "fixture/ImageNet-1K@test"
    assert len(es.candidates) == 4  # the same 4 labels in every row: embedded once
    for i, q in enumerate(es.queries):
        assert "<|image_1|>" not in q.query.text and q.query.text == "Represent the given image for classification"
        assert list(q.relevance) == [q.candidates[0]] and es.candidates[q.candidates[0]].text == LABELS[i]
    s, q_emb, c_emb = _embed_and_score(backbone, es, info)
    assert 0 <= s.score <= 100 and len(s.per_query) == 4
    keys = list(es.candidates)
    perfect = c_emb[[keys.index(q.candidates[0]) for q in es.queries]]  # each query = its positive
    assert score_set(es, perfect, c_emb, info.metric).score == 100.0


def test_image_instruction_split_variant_with_image_candidates(backbone, mmeb_root):
    info = MMEB_V2["MSCOCO_t2i"]
    es = mmeb.load_dataset(mmeb_root, info)
    q0 = es.queries[0].query
    assert q0.instruction == "Find me an everyday image that matches the given caption:" and q0.text == "a red bus"
    assert q0.visual is None and len(es.candidates) == 4
    cand = es.candidates[es.queries[0].candidates[0]]
    assert cand.instruction == "Represent the given image." and cand.text == ""
    assert isinstance(cand.visual, mmeb.LazyVisual)
    pixel = mmeb.resolve(cand).visual.getpixel((5, 5))
    assert np.abs(np.subtract(pixel, (220, 30, 30))).max() <= 4  # row 0's positive is img_0 (red; JPEG)
    s, _, _ = _embed_and_score(backbone, es, info)
    assert len(s.per_query) == 3


def test_frame_sampling_is_the_references():
    for n in range(1, 1000):
        expect = np.linspace(0, n - 1, 8, dtype=int).tolist() if n > 8 else list(range(n))
        assert mmeb.sample_frame_indices(n) == expect, n


def test_video_local_rows_sample_8_frames_in_natural_order(backbone, mmeb_root):
    info = MMEB_V2["Video-MME"]
    es = mmeb.load_dataset(mmeb_root, info)
    q = es.queries[0].query
    assert q.instruction == info.instruction and q.text == "Question 0: what happens?"
    frames = mmeb.resolve(q).visual
    # 12 frames frame_1..frame_12 (grey 10k): linspace(0, 11, 8) floored = 0 1 3 4 6 7 9 11
    grey = [round(f.getpixel((0, 0))[0] / 10) for f in frames]  # JPEG: within a few levels
    assert grey == [0, 1, 3, 4, 6, 7, 9, 11]
    s, _, _ = _embed_and_score(backbone, es, info)
    assert es.eval_type == "local" and len(s.per_query) == 3


def test_video_local_candidates_get_the_reference_instruction(mmeb_root, tmp_path):
    """Clip candidates of a row without tgt_inst get the reference's "Understand the content of the provided
    video."; text answer options (video QA) keep none, as in the reference."""
    info = MMEB_V2["QVHighlight"]
    frames = tmp_path / "frames"
    rows = []
    for i in range(2):
        _frames(frames / "video_mret" / info.name / f"q{i}" / "query", 9, base=30 * i)
        clips = []
        for j in range(3):
            _frames(frames / "video_mret" / info.name / f"q{i}" / f"clip{j}", 8, base=30 * i + 5 * j)
            clips.append(f"video_mret/{info.name}/q{i}/clip{j}")
        rows.append({"qry_inst": "", "qry_text": f"a moment {i}", "qry_img_path": f"video_mret/{info.name}/q{i}/query",
                     "tgt_inst": "", "tgt_text": [""] * 3, "tgt_img_path": clips})
    _parquet(rows, tmp_path / info.name / "test.parquet")
    es = mmeb.load_video_eval(tmp_path / info.name, frames, info)
    assert len(es.queries) == 2 and len(es.candidates) == 6
    assert {c.instruction for c in es.candidates.values()} == {mmeb.TARGET_INSTRUCTIONS["video"]}
    assert all(len(mmeb.resolve(c).visual) == 8 for c in es.candidates.values())
    qa = mmeb.load_dataset(mmeb_root, MMEB_V2["Video-MME"])
    assert {c.instruction for c in qa.candidates.values()} == {""} and all(
        c.visual is None for c in qa.candidates.values())


def test_video_retrieval_caption_ids_are_unique_when_rows_share_a_clip(tmp_path):
    root = write_mmeb(tmp_path / "MMEB-V2")
    (root / "video" / "MSR-VTT" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"video_id": "video0", "caption": "a man is singing"},
        {"video_id": "video1", "caption": ["a cat plays piano", "a kitten on a keyboard"]},
        {"video_id": "video0", "caption": "a man sings on stage"},
        {"video_id": "video0", "caption": ["", "someone sings"]}]) + "\n")
    ret = mmeb.load_dataset(root, MMEB_V2["MSR-VTT"])
    ids = [q.item_id for q in ret.queries]
    assert ids == ["video0#0", "video1#0", "video1#1", "video0#1", "video0#3"]  # the empty caption #2 skipped
    assert [next(iter(q.relevance)) for q in ret.queries] == [i.split("#")[0] for i in ids]


def test_video_global_classification_and_retrieval(mmeb_root):
    k700 = mmeb.load_dataset(mmeb_root, MMEB_V2["K700"])
    assert k700.eval_type == "global" and set(k700.candidates) == {"abseiling", "archery", "baking cookies"}
    assert [dict(q.relevance) for q in k700.queries] == [{"abseiling": 1.0}, {"archery": 1.0}, {"abseiling": 1.0}]
    assert all(q.candidates == tuple(k700.candidates) for q in k700.queries)
    assert len(mmeb.resolve(k700.queries[0].query).visual) == 8
    ret = mmeb.load_dataset(mmeb_root, MMEB_V2["MSR-VTT"])
    assert list(ret.candidates) == ["video0", "video1", "video2"] and len(ret.queries) == 4  # one per caption
    assert [next(iter(q.relevance)) for q in ret.queries] == ["video0", "video1", "video1", "video2"]
    assert ret.candidates["video1"].instruction == mmeb.TARGET_INSTRUCTIONS["video"]


@pytest.mark.parametrize("image_format", ["bytes_struct", "pil_feature", "path"])
def test_visdoc_beir_graded_qrels_in_every_image_format(backbone, mmeb_root, tmp_path, image_format):
    info = MMEB_V2["ViDoRe_arxivqa"]
    src = mmeb_root / "visdoc" / info.name
    if image_format == "bytes_struct":
        path = src
    else:  # the same corpus as a datasets Image column (decoded PIL in the Hub data) or as file paths
        import shutil

        path = tmp_path / info.name
        shutil.copytree(src, path, ignore=shutil.ignore_patterns("corpus"))
        ids = [f"p{j}" for j in range(4)]
        pil = [Image.open(io.BytesIO(_png_bytes((40 * j, 100, 200 - 40 * j)))) for j in range(4)]
        if image_format == "pil_feature":
            ds = Dataset.from_dict({"corpus-id": ids, "image": pil}).cast_column("image", ImageFeature())
            ds.save_to_disk(str(path / "corpus"))
        else:
            for j, im in enumerate(pil):
                im.save(path / f"page_{j}.png")
            _parquet([{"corpus-id": i, "image": f"page_{j}.png"} for j, i in enumerate(ids)],
                     path / "corpus" / "corpus.parquet")
    es = mmeb.load_visdoc_eval(path, info)
    assert es.eval_type == "global" and list(es.candidates) == ["p0", "p1", "p2", "p3"]
    assert es.queries[0].relevance == {"p0": 2.0, "p1": 1.0} and es.queries[2].relevance == {"p3": 2.0, "p1": 0.0}
    assert mmeb.resolve(es.candidates["p2"]).visual.getpixel((3, 3)) == (80, 100, 120)
    s, q, c = _embed_and_score(backbone, es, info)
    assert s.metric == "ndcg@5" and 0 <= s.score <= 100
    assert set(s.at_k) >= {"ndcg_linear@5", "hit@1"}


def test_visdoc_duplicate_qrels_keep_the_highest_grade(tmp_path, caplog):
    """A (query, page) pair listed twice keeps its highest grade (the reference's rule), whichever comes last."""
    root = write_mmeb(tmp_path / "dup")
    info = MMEB_V2["ViDoRe_arxivqa"]
    qrels = [("q0", "p0", 2), ("q0", "p1", 1), ("q1", "p2", 1), ("q2", "p3", 2), ("q2", "p1", 0),
             ("q0", "p0", 1), ("q0", "p1", 2)]  # rows 5 and 6 repeat q0's pairs: one lower, one higher
    _parquet([{"query-id": q, "corpus-id": c, "score": g} for q, c, g in qrels],
             root / "visdoc" / info.name / "qrels" / "test-00000-of-00001.parquet")
    with caplog.at_level("WARNING", logger="mmemb_lab.eval.mmeb"):
        es = mmeb.load_dataset(root, info)
    assert es.queries[0].relevance == {"p0": 2.0, "p1": 2.0}
    assert es.queries[1].relevance == {"p2": 1.0} and es.queries[2].relevance == {"p3": 2.0, "p1": 0.0}
    assert [m.split(":")[0] for m in es.problems] == ["ViDoRe_arxivqa qrels row 5", "ViDoRe_arxivqa qrels row 6"]
    assert "kept 2" in es.problems[0] and "kept 2" in es.problems[1] and es.skipped == 2
    assert any("2 duplicate qrels row(s)" in r.getMessage() for r in caplog.records)
    strict = mmeb.load_dataset(root, info, strict=True)  # a defined rule, not a bad record: strict loads too
    assert [q.relevance for q in strict.queries] == [q.relevance for q in es.queries]


def test_qrels_orphan_and_empty_candidates_strict_or_counted(tmp_path):
    root = write_mmeb(tmp_path / "bad", bad={"qrels_orphan", "empty_candidates"})
    with pytest.raises(DataError, match=r"ViDoRe_arxivqa qrels row 5: corpus-id 'p-404' is not in the corpus"):
        mmeb.load_dataset(root, MMEB_V2["ViDoRe_arxivqa"], strict=True)
    es = mmeb.load_dataset(root, MMEB_V2["ViDoRe_arxivqa"])
    assert es.skipped == 1 and len(es.queries) == 3 and "p-404" in es.problems[0]
    with pytest.raises(DataError, match="ImageNet-1K row 2: empty candidate list"):
        mmeb.load_dataset(root, MMEB_V2["ImageNet-1K"], strict=True)
    es = mmeb.load_dataset(root, MMEB_V2["ImageNet-1K"])
    assert es.skipped == 1 and len(es.queries) == 3 and es.problems == ("ImageNet-1K row 2: empty candidate list",)


def test_missing_frame_is_named(tmp_path):
    root = write_mmeb(tmp_path / "bad", bad={"missing_frame"})
    with pytest.raises(DataError, match=r"Video-MME row 1: missing frame\(s\) \[5\]"):
        mmeb.load_dataset(root, MMEB_V2["Video-MME"], strict=True)
    es = mmeb.load_dataset(root, MMEB_V2["Video-MME"])
    assert es.skipped == 1 and [q.item_id for q in es.queries] == ["0", "2"]


def test_mmeb_train_rows(tmp_path):
    root = tmp_path / "train"
    for i in range(3):
        _png(root / "images" / "VOC2007" / f"{i}.jpg", (80 * i, 20, 20))
    rows = [{"qry": f"<|image_1|> Identify the object shown in the image {i}", "qry_image_path": f"VOC2007/{i}.jpg",
             "pos_text": f"object {i}", "pos_image_path": "", "neg_text": "", "neg_image_path": ""} for i in range(3)]
    rows[1]["neg_text"] = "not the object"
    _parquet(rows[:2], root / "VOC2007" / "original-00000-of-00001.parquet")
    _parquet(rows, root / "VOC2007" / "diverse_instruction-00000-of-00001.parquet")
    triples = mmeb.load_train_rows(root / "VOC2007", root / "images", "VOC2007", split="diverse_instruction")
    assert len(triples) == 3 and len(mmeb.load_train_rows(root / "VOC2007", root / "images", "VOC2007")) == 2
    q, p, n = triples[1]
    assert q.text == "Identify the object shown in the image 1" and p.text == "object 1" and n.text == "not the object"
    assert triples[0][2] is None
    assert mmeb.resolve(q).visual.getpixel((0, 0)) == (80, 20, 20)
    with pytest.raises(DataError, match=r"VOC2007 .*missing column\(s\) \['qry'"):
        _parquet([{"query": "x"}], root / "bad" / "original.parquet")
        mmeb.load_train_rows(root / "bad", root / "images", "VOC2007")


def test_download_calls_snapshot_download_per_repo_and_unpacks(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot(repo_id, **kw):
        calls.append((repo_id, kw))
        local = Path(kw["local_dir"])
        local.mkdir(parents=True, exist_ok=True)
        if repo_id == "TIGER-Lab/MMEB-eval":
            import zipfile

            with zipfile.ZipFile(local / "images.zip", "w") as z:
                z.writestr("ImageNet-1K/val_0.JPEG", _png_bytes((1, 2, 3)))
        if repo_id == "TIGER-Lab/MMEB-V2":  # frames ship as tarballs, some split in parts
            f = local / "video-tasks" / "frames"
            f.mkdir(parents=True, exist_ok=True)
            blob = _targz(["video_ret/MSR-VTT/video0/frame_1.jpg"])  # one top folder: unpacked beside it
            (f / "video_ret.tar.gz-00").write_bytes(blob[:50])
            (f / "video_ret.tar.gz-01").write_bytes(blob[50:])
            (f / "video_cls.tar.gz").write_bytes(_targz(["K700/k0/frame_1.jpg", "HMDB51/h0/frame_1.jpg"]))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(mmeb.hub, "_commit_of", lambda repo, rev: "abc123")
    to = tmp_path / "dl"
    man = mmeb.download(to, datasets=["ImageNet-1K", "MSR-VTT", "K700", "ViDoRe_arxivqa"])
    assert [c[0] for c in calls] == ["TIGER-Lab/MMEB-eval", "TIGER-Lab/MMEB-V2", "vidore/arxivqa_test_subsampled_beir"]
    assert all(kw["repo_type"] == "dataset" for _, kw in calls)
    assert calls[0][1]["allow_patterns"] == ["ImageNet-1K/*", "images.zip"]
    assert calls[0][1]["local_dir"] == str(to / "image")
    assert {"video-tasks/frames/video_ret.tar.gz*", "video-tasks/frames/video_cls.tar.gz*"} <= set(
        calls[1][1]["allow_patterns"]) and "video-tasks/frames/video_qa.tar.gz*" not in calls[1][1]["allow_patterns"]
    assert calls[2][1]["local_dir"] == str(to / "visdoc" / "ViDoRe_arxivqa")
    assert {"queries/*", "corpus/*", "qrels/*"} <= set(calls[2][1]["allow_patterns"])
    assert (to / "image" / "images" / "ImageNet-1K" / "val_0.JPEG").exists()
    frames = mmeb.video_frames_folder(to)
    assert frames == to / "video" / "video-tasks" / "frames"
    assert (frames / "video_ret" / "MSR-VTT" / "video0" / "frame_1.jpg").exists()
    assert (frames / "video_cls" / "K700" / "k0" / "frame_1.jpg").exists()  # several top folders: video_cls/
    assert mmeb.loaders._clip_folder(frames, MMEB_V2["K700"], "k0") == frames / "video_cls" / "K700" / "k0"
    assert man["datasets"]["ViDoRe_arxivqa"]["split_version"] == "vidore/arxivqa_test_subsampled_beir@abc123"
    assert mmeb.split_version(to, "MSR-VTT") == "TIGER-Lab/MMEB-V2@abc123"
    (to / "image" / "images" / "ImageNet-1K" / "val_0.JPEG").unlink()
    mmeb.download(to, datasets=["ImageNet-1K"])  # resumable: asks again, but never unpacks twice
    assert len(calls) == 4 and not (to / "image" / "images" / "ImageNet-1K" / "val_0.JPEG").exists()
    with pytest.raises(KeyError, match="not MMEB-V2 datasets"):
        mmeb.download(to, datasets=["ImageNet-2K"])


def test_lazy_visual_errors_name_the_row(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match="ds row 3: corrupt or unreadable image"):
        mmeb.LazyVisual("file", str(bad), "ds row 3").load()
    with pytest.raises(DataError, match="ds row 4: missing image file"):
        mmeb.visual_from("nope.png", tmp_path, "ds row 4")
    assert "garbage" not in repr(mmeb.LazyVisual("bytes", b"garbage" * 1000, "w"))
