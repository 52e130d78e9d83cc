"""A rerun never lies and never destroys: run identity, safe loading, locks and errors that name the cause.

One test per defect a hostile-but-realistic user found (reruns into old folders, planted files, two writers,
bad files); each drives the CLI as that user did.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmemb_lab.cli import main

TRAIN = ["--steps", "2", "--batch-size", "4", "--datasets", "toy_cls"]


def _train(world, backbone, out, *extra):
    return main(["train", "--world", str(world), "--backbone", str(backbone), "--out", str(out), *TRAIN, *extra])


def _perturbed(src: Path, dest: Path) -> Path:
    """A copy of a checkpoint with one weight changed (same architecture, same source string)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    sd = load_file(dest / "model.safetensors")
    k = sorted(sd)[0]
    sd[k] = sd[k] + 0.01
    save_file(sd, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


# 1 ---------------------------------------------------------------------------------------------------------


def test_train_refuses_to_resume_a_run_made_with_other_settings_or_weights(small_world, tiny_foundation, tmp_path,
                                                                             capsys):
    world, _ = small_world
    out = tmp_path / "ft"
    assert _train(world, tiny_foundation, out) == 0
    model = (out / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert _train(world, tiny_foundation, out, "--seed", "1") == 2  # was: rc 0, "resumed_from": 2, old weights
    err = capsys.readouterr().err.strip().splitlines()[-1]  # above it: progress bars of the model load
    assert err.startswith("mmemb-lab train: error: ") and "seed: 0 -> 1" in err and "--overwrite" in err
    other = _perturbed(tiny_foundation, tmp_path / "other")
    assert _train(world, other, out) == 2
    assert "inputs.weights" in capsys.readouterr().err
    assert (out / "model" / "model.safetensors").read_bytes() == model  # nothing was touched
    # --overwrite moves the old run aside whole and trains the new one from step 0
    assert _train(world, tiny_foundation, out, "--seed", "1", "--overwrite") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["resumed_from"] == 0
    (old,) = tmp_path.glob("ft.stale-*")
    assert (old / "model" / "model.safetensors").read_bytes() == model
    # the same run again resumes (nothing to do)
    assert _train(world, tiny_foundation, out, "--seed", "1") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["resumed_from"] == 2


# 2 ---------------------------------------------------------------------------------------------------------


def test_benchmark_never_reuses_scores_of_other_weights_or_data(tiny_foundation, tmp_path, capsys):
    from mmemb_lab.world.build import WorldConfig, build_world

    w0, w1 = tmp_path / "w0", tmp_path / "w1"
    build_world(w0, WorldConfig(seed=0, n_train=0, n_eval=4), progress=False)
    build_world(w1, WorldConfig(seed=1, n_train=0, n_eval=6), progress=False)
    out = tmp_path / "bench"

    def bench(data, backbone):
        return main(["benchmark", "--benchmark", "toy", "--data", str(data), "--backbone", str(backbone),
                     "--out", str(out), "--datasets", "toy_cls"])

    assert bench(w0, tiny_foundation) == 0
    capsys.readouterr()
    assert bench(w0, _perturbed(tiny_foundation, tmp_path / "other")) == 2  # was: the old model's score
    assert "inputs.weights" in capsys.readouterr().err
    assert bench(w1, tiny_foundation) == 2  # was: the old world's query count
    assert "inputs.data" in capsys.readouterr().err
    assert bench(w0, tiny_foundation) == 0  # the same run resumes from its score files


# 3 ---------------------------------------------------------------------------------------------------------


def test_world_never_deletes_a_folder_it_did_not_make(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "sub" / "thesis.tex").write_text("\\section{}")
    args = ["world", "--out", str(out), "--n-train", "0", "--n-eval", "2"]
    assert main(args) == 2  # was: rc 0 and both files gone
    assert "did not write" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "my notes" and (out / "sub" / "thesis.tex").exists()
    assert main(args + ["--overwrite"]) == 0  # moved aside, never deleted
    (aside,) = tmp_path.glob("mine.stale-*")
    assert (aside / "notes.txt").read_text() == "my notes" and (aside / "sub" / "thesis.tex").exists()
    assert (out / "world.json").exists()


# 4 ---------------------------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_checkpoint_never_runs_code(small_world, tiny_foundation, tmp_path, capsys):
    world, _ = small_world
    out = tmp_path / "ft"
    assert _train(world, tiny_foundation, out, "--steps", "3") == 0  # a finished run (its manifest included)
    capsys.readouterr()
    marker = tmp_path / "pwned"
    (out / "checkpoint.pt").unlink()
    torch.save({"model": _Payload(marker), "step": 1, "n_params": 0}, out / "checkpoint.pt")
    assert _train(world, tiny_foundation, out, "--steps", "3") == 2
    assert not marker.exists()  # was: the command ran on resume
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and "--no-resume" in err
    # the stage-0 checkpoint loader is the same safe one
    from mmemb_lab.train.loop import load_checkpoint

    with pytest.raises(Exception, match="--no-resume"):
        load_checkpoint(out / "checkpoint.pt")
    assert not marker.exists()


# 5 ---------------------------------------------------------------------------------------------------------


def test_a_second_writer_refuses_and_a_stale_lock_is_taken_over(small_world, tiny_foundation, tmp_path, capsys):
    world, _ = small_world
    out = tmp_path / "ft"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                               "started": "now", "command": "train"}))
        assert _train(world, tiny_foundation, out) == 2  # was: both runs wrote, metrics interleaved
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "being written" in err
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, reported and taken over
    assert _train(world, tiny_foundation, out) == 0
    assert not (out / ".lock").exists()  # released at the end


def test_the_lock_holds_for_a_live_process(tmp_path):
    from mmemb_lab.runs import RunLocked, acquire_lock, release_lock

    acquire_lock(tmp_path, "test")
    with pytest.raises(RunLocked, match="already writes"):
        acquire_lock(tmp_path, "test")
    release_lock(tmp_path)
    assert not (tmp_path / ".lock").exists()


# 6 ---------------------------------------------------------------------------------------------------------


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()[-1]  # above it, at most progress bars of a model load
    assert err.startswith("mmemb-lab ") and ": error: " in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def test_errors_name_the_cause_before_any_model_loads(small_world, tiny_foundation, tmp_path, capsys, monkeypatch):
    import mmemb_lab.model.backbone as backbone_mod

    world, _ = small_world
    loads = []
    real = backbone_mod.load_backbone
    monkeypatch.setattr(backbone_mod, "load_backbone", lambda *a, **k: loads.append(a) or real(*a, **k))

    # a missing world (was: "a must be a positive integer..." after loading the model)
    assert main(["train", "--world", str(tmp_path / "nope"), "--out", str(tmp_path / "o1"), *TRAIN]) == 2
    _one_line_error(capsys, "--world", "nope", "mmemb-lab world")
    # a truncated world.json (was: a bare JSONDecodeError)
    broken = tmp_path / "broken"
    shutil.copytree(world, broken)
    (broken / "world.json").write_text((world / "world.json").read_text()[:50])
    assert main(["train", "--world", str(broken), "--out", str(tmp_path / "o2"), *TRAIN]) == 2
    _one_line_error(capsys, "world.json", "--overwrite")
    # a truncated .arrow file (was: "Expected to be able to read 2720 bytes", no file named)
    shutil.copy(world / "world.json", broken / "world.json")
    (arrow,) = (broken / "toy_cls" / "train").glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:100])
    assert main(["train", "--world", str(broken), "--out", str(tmp_path / "o3"), *TRAIN]) == 2
    _one_line_error(capsys, str(broken / "toy_cls" / "train"), "toy_cls")
    # --batch-size above the row count (was: a sampling error)
    assert main(["train", "--world", str(world), "--out", str(tmp_path / "o4"), "--batch-size", "999",
                 "--datasets", "toy_cls"]) == 2
    _one_line_error(capsys, "--batch-size 999", "16 training rows")
    assert loads == []  # none of the above loaded a model
    # --batch-size 0 (was: an IndexError from tokenizers): argparse says so
    with pytest.raises(SystemExit) as e:
        main(["train", "--world", str(world), "--out", str(tmp_path / "o5"), "--batch-size", "0"])
    assert e.value.code == 2 and "must be > 0" in capsys.readouterr().err
    # a typo in a local --backbone path (was: a failed Hub download)
    assert main(["train", "--world", str(world), "--out", str(tmp_path / "o6"), *TRAIN,
                 "--backbone", str(tiny_foundation) + "x"]) == 2
    _one_line_error(capsys, "no such checkpoint folder")
    # an unwritable --out (was: fails after the first training step)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["train", "--world", str(world), "--out", str(blocker / "run"), *TRAIN]) == 2
    _one_line_error(capsys, "cannot write")
    assert len(loads) == 1  # only the typo'd backbone was tried


def test_a_truncated_checkpoint_points_at_no_resume(small_world, tiny_foundation, tmp_path, capsys):
    world, _ = small_world
    out = tmp_path / "ft"
    assert _train(world, tiny_foundation, out, "--steps", "3") == 0
    ck = out / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:1000])
    capsys.readouterr()
    assert _train(world, tiny_foundation, out, "--steps", "3") == 2  # was: a zip error, no hint
    _one_line_error(capsys, "checkpoint.pt", "--no-resume")
    assert _train(world, tiny_foundation, out, "--steps", "3", "--no-resume") == 0


# 7 ---------------------------------------------------------------------------------------------------------


def test_skipped_rows_are_logged_counted_and_printed(tiny_foundation, tmp_path, capsys, caplog):
    from datasets import load_from_disk

    from mmemb_lab.world.build import WorldConfig, build_world

    world = tmp_path / "w"
    build_world(world, WorldConfig(seed=0, n_train=0, n_eval=4), progress=False)
    qpath = world / "toy_doc" / "queries"  # an empty query text
    ds = load_from_disk(str(qpath)).to_dict()
    ds["query"][1] = " "
    _replace_split(qpath, ds)
    cpath = world / "toy_doc" / "corpus"  # a corrupt page of the corpus
    page = world / load_from_disk(str(cpath))[2]["image"]
    page.write_bytes(b"not a png")
    args = ["evaluate", "--world", str(world), "--backbone", str(tiny_foundation), "--out", str(tmp_path / "e")]
    with caplog.at_level("WARNING"):
        assert main(args) == 0  # was: the corrupt page failed the run without --strict
    out = capsys.readouterr().out
    assert "toy_doc query row 1: empty query text" in caplog.text  # was: skipped without a log line
    assert str(page) in caplog.text
    summary = json.loads(out[:out.rindex("}") + 1])
    assert summary["skipped"]["toy_doc"] >= 2 and any("empty query" in r for r in summary["skip_reasons"]["toy_doc"])
    assert "skipped rows:" in out and "toy_doc:" in out  # the printed summary says so
    score = json.loads((tmp_path / "e" / "direct" / "toy_doc_score.json").read_text())
    assert score["skipped"] >= 2 and score["problems"]
    assert main(args[:-1] + [str(tmp_path / "e2"), "--strict"]) == 2  # strict stops at the first bad row
    assert "toy_doc" in capsys.readouterr().err


def _replace_split(path: Path, rows: dict) -> None:
    from datasets import Dataset

    tmp = path.with_name(path.name + ".new")
    Dataset.from_dict(rows).save_to_disk(str(tmp))
    shutil.rmtree(path)
    tmp.rename(path)


# identity mechanics -----------------------------------------------------------------------------------------


def test_manifest_differences_name_every_field(tmp_path):
    from mmemb_lab.runs import Manifest, RunFolder, RunMismatch

    a = Manifest.make("x", {"lr": 1e-3, "loop": {"steps": 4}}, 0, {"weights": "aa"})
    with RunFolder(tmp_path / "r", a) as run:
        assert run.state == "new" and (tmp_path / "r" / ".lock").exists()
    assert not (tmp_path / "r" / ".lock").exists()
    with RunFolder(tmp_path / "r", a) as run:
        assert run.state == "resume"
    b = Manifest.make("x", {"lr": 1e-3, "loop": {"steps": 5}}, 1, {"weights": "bb"})
    assert set(a.differences(b)) == {"config.loop.steps", "seed", "inputs.weights"}
    with pytest.raises(RunMismatch, match="config.loop.steps: 4 -> 5"):
        with RunFolder(tmp_path / "r", b):
            pass
    assert Manifest.load(tmp_path / "r") == a  # a refusal records nothing


def test_weights_digest_sees_one_changed_weight(make_backbone):
    from mmemb_lab.runs import weights_digest

    bb = make_backbone(seed=4)
    d = weights_digest(bb.model)
    assert d == weights_digest(make_backbone(seed=4).model)
    with torch.no_grad():
        next(bb.model.parameters()).view(-1)[0] += 1e-3
    assert weights_digest(bb.model) != d
