"""mmemb-lab: a research workbench for adaptive reasoning in multimodal embeddings (MMEmb-R1).

Start with notebooks/00_quickstart.ipynb, or ``python -m mmemb_lab --help``. To embed your own inputs:

    from mmemb_lab import Embedder
    emb = Embedder.from_pretrained("data/foundation").encode([{"text": "a red star"}], reasoning="auto")
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
