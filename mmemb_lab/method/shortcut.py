"""Does the vector use the reasoning, or its format? Two stage-1 models that differ only in their rationales.

Concept
    A reasoning embedder can raise s(e(q + r), e(t+)) by reading what r says or by the mere format of
    reasoning (docs/method.md, problem 1). Attribution on one model cannot tell the two apart without a
    reference, so this experiment trains two: from the same stage-0 model, on the same hard training pairs,
    with the same steps and seed: one with each pair's gold rationale ("faithful"), one with the same
    format-only text on every pair ("shortcut": ``workers.FORMAT_ONLY_TEXT``, steps that state no fact) and
    one whose steps end in a confident wrong fact ("misleading": ``workers.hallucinating``, so that reading
    the facts hurts and the format is all that stays useful). Each is then read on held-out hard items
    *with their gold rationale*:

    - the fact/format attribution ratio (``attribution.kind_means``): how much more a token naming a gold
      fact moves the similarity than a format token;
    - Hit@1 with the gold rationale and with the format-only one: a model that uses the content gains
      from the gold one; a shortcut model scores the two alike.

Run: ``python -m mmemb_lab.method.shortcut --out runs/shortcut`` (about 4 min per arm at 120 steps on 2 cores;
resumable); it writes ``shortcut.json`` and ``shortcut.html`` (``figures.shortcut_figure``). Measured:
docs/research-log.md, "Attribution: a shortcut model". Tested at smoke size in tests/test_attribution.py.

Deviations: not in the paper; the rationales are the world's gold steps, not a worker's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import item_candidates, item_query
from ..eval import attribution
from ..model.backbone import Backbone
from ..model.embed import embed
from ..runs import atomic_write_text
from ..train.foundation import load_foundation
from ..train.loop import LoopConfig
from ..world.tasks import make_item
from .stage1 import Stage1Config, train_stage1
from .workers import FORMAT_ONLY_TEXT, hallucinating

ARMS = ("faithful", "shortcut", "misleading")


@dataclass(frozen=True)
class ShortcutConfig:
    dataset: str = "toy_qa"
    """Training and evaluation items come from this dataset, all hard (they carry gold steps)."""
    world_seed: int = 0
    n_train: int = 256
    """Training pairs per arm (train split)."""
    n_eval: int = 24
    """Held-out hard items read by both models (eval split)."""
    n_explain: int = 6
    """Of these, items attributed (integrated gradients, ``ig_steps`` each)."""
    ig_steps: int = 16
    steps: int = 120
    """Stage-1 steps per arm (same loop as the demo's stage 1, batch 32)."""
    lr: float = 2e-4
    seed: int = 0


@dataclass(frozen=True)
class ShortcutArm:
    arm: str
    fact_per_format: float
    """Mean |attribution| per gold-fact token over mean per format token (gold rationale)."""
    hit1_gold: float
    """Hit@1 (%) on the eval items with the gold rationale in the reasoning span."""
    hit1_format: float
    """Hit@1 (%) with the format-only rationale instead."""
    final_loss: float


def _training_pairs(cfg: ShortcutConfig, arm: str):
    items = [make_item(cfg.dataset, cfg.world_seed, "train", i, 1.0) for i in range(cfg.n_train)]
    items = [it for it in items if it.gold_steps]
    rng = np.random.default_rng([cfg.seed, 31])
    text = {"faithful": attribution.gold_rationale, "shortcut": lambda it: FORMAT_ONLY_TEXT,
            "misleading": lambda it: hallucinating(it, rng)}[arm]
    return [(it, text(it)) for it in items]


@torch.no_grad()
def hit_at_1(backbone: Backbone, items, rationale) -> float:
    """Hit@1 (%) over ``items``, each ranking its own candidates, with ``rationale(item)`` in the span."""
    hits = []
    for it in items:
        q = embed(backbone, [item_query(it, rationale(it))])
        c = embed(backbone, item_candidates(it))
        hits.append(int((c @ q.T).squeeze(1).argmax()) in it.labels)
    return 100.0 * float(np.mean(hits))


def read_arm(backbone: Backbone, cfg: ShortcutConfig, arm: str, final_loss: float) -> ShortcutArm:
    items = [make_item(cfg.dataset, cfg.world_seed, "eval", 300 + i, 1.0) for i in range(cfg.n_eval)]
    items = [it for it in items if it.gold_steps]
    fact, fmt = [], []
    for it in items[:cfg.n_explain]:
        tok = attribution.attribute_tokens(backbone, item_query(it, attribution.gold_rationale(it)),
                                           item_candidates(it)[it.labels[0]], cfg.ig_steps)
        km = attribution.kind_means(tok, attribution.fact_words(it.gold_steps))
        fact.append(km.get("fact", 0.0))
        fmt.append(km["format"])
    return ShortcutArm(arm, float(np.mean(fact) / np.mean(fmt)),
                     hit_at_1(backbone, items, attribution.gold_rationale),
                     hit_at_1(backbone, items, lambda it: FORMAT_ONLY_TEXT), final_loss)


def run_shortcut(foundation: str | Path, out_dir: str | Path, cfg: ShortcutConfig = ShortcutConfig(),
                 arms: tuple[str, ...] = ARMS) -> dict[str, ShortcutArm]:
    """Train each arm (resumable, in ``out_dir/<arm>``) and read it; writes ``out_dir/shortcut.json``."""
    out = Path(out_dir)
    s1 = Stage1Config(batch_size=min(32, cfg.n_train),
                      loop=LoopConfig(steps=cfg.steps, lr=cfg.lr, warmup=min(20, cfg.steps // 5),
                                      ckpt_every=max(10, cfg.steps // 4)))
    results = {}
    for arm in arms:
        backbone, _ = load_foundation(foundation)
        res = train_stage1(backbone, _training_pairs(cfg, arm), out / arm, s1, seed=cfg.seed)
        backbone.model.eval()
        results[arm] = read_arm(backbone, cfg, arm, float(res.last.get("loss", float("nan"))))
    atomic_write_text(out / "shortcut.json", json.dumps(
        {"config": asdict(cfg), "foundation": str(foundation), "arms": {a: asdict(r) for a, r in results.items()}},
        indent=1))
    return results


def main(argv: list[str] | None = None) -> int:
    import argparse

    from ..figures import save_figures, shortcut_figure
    from ..paths import foundation_dir

    ap = argparse.ArgumentParser(prog="python -m mmemb_lab.method.shortcut", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/shortcut")
    ap.add_argument("--foundation", default=None, help="stage-0 model (default: the committed one)")
    ap.add_argument("--steps", type=int, default=ShortcutConfig.steps)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    res = run_shortcut(a.foundation or foundation_dir(), a.out, ShortcutConfig(steps=a.steps, seed=a.seed))
    for r in res.values():
        print(f"{r.arm:10s} fact/format {r.fact_per_format:.2f}  Hit@1 gold rationale {r.hit1_gold:.1f}  "
              f"format-only rationale {r.hit1_format:.1f}")
    save_figures({"shortcut": shortcut_figure(res)}, Path(a.out), run=f"shortcut ({a.steps} steps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
