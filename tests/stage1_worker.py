"""Stage 1 for a few steps on a small in-memory set (run by tests/test_distributed.py, once as one process and
once under torchrun): ``python tests/stage1_worker.py INIT OUT [--chunk K]``; rank 0 saves OUT/model."""

import argparse

from mmemb_lab import distributed
from mmemb_lab.method.stage1 import Stage1Config, train_stage1
from mmemb_lab.model.backbone import load_backbone
from mmemb_lab.train.loop import LoopConfig
from mmemb_lab.world.tasks import make_item


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("init")
    ap.add_argument("out")
    ap.add_argument("--chunk", type=int, default=0)
    a = ap.parse_args()
    with distributed.init_from_env():
        distributed.seed_everything(0)
        backbone = load_backbone(a.init)
        # hard items with their gold steps as the rationale, easy ones without: both terms of the joint loss
        items = [make_item(name, 5, "train", i, 0.5) for name in ("toy_qa", "toy_cls", "toy_doc") for i in range(6)]
        data = [(it, " ".join(it.gold_steps) if it.needs_reasoning else None) for it in items]
        cfg = Stage1Config(loop=LoopConfig(steps=3, lr=1e-3, warmup=1, ckpt_every=3), batch_size=8,
                           hard_negatives=2, chunk_size=a.chunk)
        train_stage1(backbone, data, a.out, cfg, seed=0)
        if distributed.is_main():
            backbone.save(f"{a.out}/model")
        distributed.barrier()


if __name__ == "__main__":
    main()
