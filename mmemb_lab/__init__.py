"""mmemb-lab: a research workbench for adaptive reasoning in multimodal embeddings (MMEmb-R1).

Start with notebooks/00_quickstart.ipynb, or ``python -m mmemb_lab --help``. To embed your own inputs:

    from mmemb_lab import Embedder
    emb = Embedder.from_pretrained("data/foundation").encode([{"text": "a red star"}], reasoning="auto")

The package follows the pipeline a reader follows; each sub-package imports only those above it
(tests/test_layout.py holds the table):

    world/    the toy world: scenes, videos, pages, datasets with ground truth
    model/    the backbone, embedding, inference and the gate at inference
    train/    the training loop, contrastive loss, stage 0 (foundation)
    eval/     registry, loaders, metrics, modes, the benchmark runner, attribution
    method/   workers, selection, stage 1, rewards, GRPO, gate threshold, stage 2
    figures/  figures as values, export

Beside them: ``data`` (records to inputs, MMEB schemas), ``runs`` (run identity, atomic writes), ``distributed``,
``paths``, ``presets``, ``pipeline`` (stages with manifests), ``chain`` (the method on real data from one recipe),
``demo``, ``embedder`` (``mmemb_lab.Embedder``),
``results`` (a run's tables and targets), ``cli`` (the parser) and ``commands`` (what each command does), ``bench`` and
``gpu_check``.
"""

__version__ = "0.1.0"
__all__ = ["Embedder", "__version__"]


def __getattr__(name: str):
    # ``mmemb_lab.Embedder`` (embedder.Embedder, not the training module embed.Embedder) is imported on first
    # use, so ``import mmemb_lab`` and the CLI's --help stay free of torch and transformers.
    if name == "Embedder":
        from .embedder import Embedder

        return Embedder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
