"""One entry point from one process to many: `torchrun -m mmemb_lab train` on 2 CPU processes (gloo)
ends with the same weights as `python -m mmemb_lab train` on 1 process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file


def _run(cmd, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="")  # the CPU (gloo) equivalence, bit for bit, also on a GPU machine
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_two_processes_match_one(make_backbone, small_world, tmp_path):
    root, _ = small_world
    make_backbone(seed=11).save(tmp_path / "init")
    args = ["-m", "mmemb_lab", "train", "--world", str(root), "--backbone", str(tmp_path / "init"),
            "--steps", "3", "--batch-size", "8", "--lr", "1e-3", "--datasets", "toy_cls", "toy_doc", "toy_t2i"]
    _run([sys.executable, *args, "--out", str(tmp_path / "one")], tmp_path)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    _run([torchrun, "--nproc-per-node", "2", "--master-port", "29533", *args, "--out", str(tmp_path / "two")],
         tmp_path)
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    start = load_file(tmp_path / "init" / "model.safetensors")
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-4  # training really changed the weights...
    assert diff < 1e-5, diff  # ...and identically with 2 processes of B/2 as with 1 process of B
