"""mmemb-lab: a research workbench for adaptive reasoning in multimodal embeddings (MMEmb-R1).

Start with notebooks/00_quickstart.ipynb, or ``python -m mmemb_lab --help``.
"""

__version__ = "0.1.0"
