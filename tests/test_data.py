"""Bad input gets a clear error naming the record or file, and nothing partial is written."""

import shutil

import pytest
from datasets import Dataset, load_from_disk

from mmemb_lab.data import DataError, load_eval, load_train
from mmemb_lab.model.embed import Input, InputError, embed


def _copy(small_world, tmp_path):
    root, info = small_world
    dst = tmp_path / "w"
    shutil.copytree(root, dst)
    return dst


def _first_image(root, name):
    ds = load_from_disk(str(root / name / "eval"))
    return root / ds[0]["qry_img_path"]


def test_missing_image_is_named_strict_and_counted_otherwise(small_world, tmp_path):
    root = _copy(small_world, tmp_path)
    img = _first_image(root, "toy_qa")
    img.unlink()
    with pytest.raises(DataError, match=r"toy_qa eval row 0: missing image file .*" + img.name):
        load_eval(root, "toy_qa", "local", strict=True)
    es = load_eval(root, "toy_qa", "local")
    assert es.skipped == 1 and len(es.queries) == 11


def test_corrupt_image_is_named(small_world, tmp_path):
    root = _copy(small_world, tmp_path)
    img = _first_image(root, "toy_cls")
    img.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"toy_cls eval row 0: corrupt or unreadable image .*" + img.name):
        load_eval(root, "toy_cls", "local", strict=True)


def test_missing_video_frames_are_named(small_world, tmp_path):
    root = _copy(small_world, tmp_path)
    ds = load_from_disk(str(root / "toy_video_qa" / "eval"))
    folder = root / ds[2]["qry_img_path"]
    for f in folder.iterdir():
        f.unlink()
    with pytest.raises(DataError, match="toy_video_qa eval row 2: video folder .* has no frames"):
        load_eval(root, "toy_video_qa", "local", strict=True)


def test_wrong_schema_names_file_and_columns(small_world, tmp_path):
    root = _copy(small_world, tmp_path)
    shutil.rmtree(root / "toy_qa" / "train")
    Dataset.from_dict({"query": ["x"], "image": [""]}).save_to_disk(str(root / "toy_qa" / "train"))
    with pytest.raises(DataError, match=r"toy_qa .*train.*missing column\(s\) \['qry'"):
        load_train(root / "toy_qa" / "train", root, "toy_qa")


def test_qrels_pointing_at_no_document_and_empty_candidates(small_world, tmp_path):
    root = _copy(small_world, tmp_path)
    q = load_from_disk(str(root / "toy_doc" / "qrels")).to_dict()
    q["corpus-id"][0] = "no-such-page"
    shutil.rmtree(root / "toy_doc" / "qrels")
    Dataset.from_dict(q).save_to_disk(str(root / "toy_doc" / "qrels"))
    with pytest.raises(DataError, match="toy_doc qrels row 0: corpus-id 'no-such-page'"):
        load_eval(root, "toy_doc", "global", strict=True)
    assert load_eval(root, "toy_doc", "global").skipped == 1
    e = load_from_disk(str(root / "toy_cls" / "eval")).to_dict()
    e["tgt_text"][3], e["tgt_img_path"][3] = [], []
    shutil.rmtree(root / "toy_cls" / "eval")
    Dataset.from_dict(e).save_to_disk(str(root / "toy_cls" / "eval"))
    with pytest.raises(DataError, match="toy_cls eval row 3: empty candidate list"):
        load_eval(root, "toy_cls", "local", strict=True)


def test_empty_text_input_is_refused(backbone):
    with pytest.raises(InputError, match="record-7: empty input"):
        embed(backbone, [Input("red star"), Input("  ", name="record-7")])


def test_interrupted_world_build_leaves_nothing_partial(tmp_path, monkeypatch):
    from mmemb_lab.world import build

    calls = {"n": 0}
    real = build._save

    def flaky(rows, path):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        real(rows, path)
    monkeypatch.setattr(build, "_save", flaky)
    with pytest.raises(KeyboardInterrupt):
        build.build_world(tmp_path / "w", build.WorldConfig(n_train=2, n_eval=2), progress=False)
    assert not (tmp_path / "w").exists()
