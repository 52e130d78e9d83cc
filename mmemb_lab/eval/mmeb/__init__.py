"""Real MMEB-V2 data: where it comes from, how it lies on disk, and how it becomes ``data.EvalSet``.

Concept
    MMEB-V2 (docs/method.md, MMEB-V2) stores its 78 evaluation sets in three shapes, and MMEB-train in
    a fourth. Each loader here reads one shape, exactly as published, into the objects the rest of the
    workbench already speaks: an :class:`MMEBSet` (a ``data.EvalSet``: queries, a deduplicated candidate
    table, graded relevance) or MMEB-train triples of ``embed.Input``. ``scoring.score_set`` and the
    harness then score the toy world and the real benchmark with the same code.

    - **Image tasks** (``TIGER-Lab/MMEB-eval``, split ``test``), *local*: each row is one query and its own
      candidate list, **the positive first**. Two column sets exist: the merged one (``qry_text`` holds
      the instruction and a Phi-3 style ``<|image_1|>`` placeholder; ``qry_img_path``, ``tgt_text[]``,
      ``tgt_img_path[]``) and the instruction-split one VLM2Vec-V2 loads (``qry_inst, qry_text,
      qry_img_path, tgt_inst, tgt_text[], tgt_img_path[]``). Candidates are deduplicated across rows by
      (instruction, text, image path), as the reference keys its embeddings by (text, path).
    - **Video tasks**: frames are pre-extracted (one folder per clip); 8 are sampled uniformly, with the
      reference's rule (natural sort of file names, ``linspace(0, n-1, 8)`` truncated to ints; a clip
      with fewer than 8 frames keeps them all). Three annotation column sets are read:
      *local* (the instruction-split image schema above, paths naming frame folders: video QA, MRET,
      SSv2), *global classification* (``video_id``, ``pos_text``; the pool is every label, plus the
      lines of an optional ``labels.txt``) and *global retrieval* (``video_id``, ``caption`` - a string
      or a list; each caption is one query, the pool is every distinct clip).
    - **Visual documents**: BEIR layout, configs ``queries`` (``query-id``, ``query``), ``corpus``
      (``corpus-id``, ``image``: an image object, encoded bytes, a ``{"bytes", "path"}`` struct, or a
      path) and ``qrels`` (``query-id``, ``corpus-id``, ``score``: graded relevance), *global*.
    - **MMEB-train** (``TIGER-Lab/MMEB-train``, splits ``original`` / ``diverse_instruction``): ``qry``
      (instruction merged, with the placeholder), ``qry_image_path``, ``pos_text``, ``pos_image_path``,
      optional ``neg_text`` / ``neg_image_path``.
    - **The other training sets VLM2Vec-V2's recipe reads**: LLaVA-Hound's video instruction jsonl (``id``,
      ``video`` = a frame folder, ``conversations``), read three ways (caption, video retrieval, QA), and
      ViDoRe's ``colpali_train_set`` (``query``, ``image``, ``answer``: the page and question -> the answer).

    Visuals are *lazy* (:class:`LazyVisual`): a loader checks that files and frames exist, and the
    pixels are read just before embedding (:func:`resolve`), so a 1000-page corpus or 100k candidate
    images never sit in memory at once. An image that exists but cannot be decoded is therefore
    reported by the harness at embedding time (with its dataset and row), not here.

Local layout (what :func:`download` writes, and what a hand-made copy must look like)::

    DIR/mmeb_v2.json                   manifest: repo, revision, commit and split version per dataset
    DIR/image/<dataset>/               MMEB-eval annotations: parquet file(s), *.jsonl, or a
                                       ``datasets.save_to_disk`` folder
    DIR/image/images/                  image files; ``qry_img_path`` / ``tgt_img_path`` are relative to it
    DIR/video/<dataset>/               annotations in one of the three video column sets (placed here by
                                       hand or a converter: ``download`` only fetches the Hub's files)
    DIR/video/frames/                  frame folders (``download`` unpacks them to video-tasks/frames/,
                                       which is used when frames/ is absent); local rows name a folder
                                       relative to it, global rows by ``[<archive>/]<dataset>/<video_id>``
                                       with <archive> one of video_cls, video_ret, ...
    DIR/visdoc/<dataset>/{queries,corpus,qrels}/   BEIR configs; a corpus path is relative to
                                       ``DIR/visdoc/<dataset>/``
    DIR/train/<subset>/                MMEB-train rows; images under ``DIR/train/images/``

Modules: ``files`` (lazy visuals, table rows, column checks, the skip report), ``loaders`` (one per
published shape, one entry point per dataset), ``hub`` (the download and its manifest). They import the
workbench's data types and registry, never the harness or the method.

Used by: the harness (``mmemb_lab.eval.harness.MMEBSource``), ``mmemb-lab data download mmeb-v2`` and
``mmemb-lab benchmark --benchmark mmeb-v2``, notebook 06; tests/test_mmeb.py writes a fixture in every
schema.

Deviations from the reference (VLM2Vec) and limits, known:

- Video annotations live in per-dataset Hub repos with per-dataset columns, and the reference has one
  parser per dataset. We read the three column sets above; converting a dataset whose annotation file
  uses other columns (e.g. multiple-choice QA with an options list) into the local schema is not done
  here. ``download`` fetches the frame archives and ``video-tasks/data`` of ``TIGER-Lab/MMEB-V2``.
- ViDoRe v2 ``*_multilingual`` keep every language (the reference's ``lang=None``); the English-only
  variants are not in the registry.
- A query whose qrels are all missing is skipped and reported (the reference would stop on a KeyError).
- The reference materialises each visdoc page as ``<corpus-id>.png`` before loading; we decode the
  stored bytes directly (same pixels for PNG sources).
"""

from ...data import sample_frame_indices
from .files import (
    IMAGE_EXTENSIONS,
    MANIFEST,
    TARGET_INSTRUCTIONS,
    LazyVisual,
    MMEBSet,
    frames_visual,
    read_rows,
    resolve,
    resolve_all,
    visual_from,
)
from .hub import download, download_plan
from .loaders import (
    LLAVAHOUND_MODES,
    dataset_dir,
    images_folder,
    load_dataset,
    load_image_eval,
    load_llavahound_rows,
    load_train_rows,
    load_video_eval,
    load_vidore_rows,
    load_visdoc_eval,
    split_version,
    video_frames_folder,
)

__all__ = [
    "LazyVisual", "MMEBSet", "resolve", "resolve_all", "sample_frame_indices", "read_rows",
    "load_image_eval", "load_video_eval", "load_visdoc_eval", "load_train_rows", "load_dataset",
    "load_llavahound_rows", "load_vidore_rows", "LLAVAHOUND_MODES",
    "dataset_dir", "images_folder", "video_frames_folder", "split_version", "download", "download_plan",
    "MANIFEST", "TARGET_INSTRUCTIONS", "IMAGE_EXTENSIONS", "frames_visual", "visual_from",
]
