"""GRPO for a few steps with a reward that pays for opening the reasoning span (run by tests/test_distributed.py,
once as one process and once under torchrun): ``python tests/grpo_worker.py INIT OUT --prompts P``, where P is
the prompts per step on each process; rank 0 writes OUT/result.json (mean p_open before and after)."""

import argparse
import faulthandler
import json
import os
import sys
from pathlib import Path

import torch

from mmemb_lab import distributed
from mmemb_lab.method.rewards import SpanTokens, parse_completion
from mmemb_lab.method.rl import RLConfig, probe_invocation, toy_rl_pairs, train_rl
from mmemb_lab.model.backbone import load_backbone


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("init")
    ap.add_argument("out")
    ap.add_argument("--prompts", type=int, default=2)
    a = ap.parse_args()
    faulthandler.dump_traceback_later(int(os.environ.get("GRPO_WORKER_TIMEOUT", "240")), exit=True, file=sys.stderr)  # a hang shows where, then fails the test
    torch.set_num_threads(1)
    with distributed.init_from_env():
        backbone = load_backbone(a.init)
        tk = SpanTokens.of(backbone.tokenizer)

        def pays_for_opening(prompts, completions, completion_ids, **kw):
            return [1.0 if parse_completion(ids, tk).invoked else 0.0 for ids in completion_ids]

        pairs = toy_rl_pairs(0, 0.5, 1, datasets=["toy_qa", "toy_t2i", "toy_cls", "toy_doc"])
        queries = [p.query for p in pairs]
        before = probe_invocation(backbone, queries)["mean_p_open"]
        cfg = RLConfig.textbook(steps=4, lr=3e-2, prompts_per_step=a.prompts, num_generations=4,
                                max_completion_length=6, probe_every=2)
        res = train_rl(backbone, pairs, cfg, Path(a.out) / f"rank{distributed.rank()}", reward_funcs=[pays_for_opening])
        after = probe_invocation(backbone, queries)["mean_p_open"]
        if distributed.is_main():
            Path(a.out, "result.json").write_text(json.dumps({"before": before, "after": after,
                                                              "steps": res.steps_done, "history": res.history}))
        distributed.barrier()
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
