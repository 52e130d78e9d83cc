"""Stage 0: a foundation model for the toy world - the stand-in for a pretrained MLLM.

Concept
    MMEmb-R1 starts from a pretrained Qwen3-VL that can already see, describe and embed. Our tiny
    model starts from random weights, so stage 0 must give it those abilities before any reasoning is
    trained. What prototypes measured (docs/research-log.md, Prototypes): contrastive or short-answer
    losses from random init never teach a tiny model to use the image; next-token loss on a *dense
    description of every cell*, plus an auxiliary head that classifies every merged image token,
    does - in minutes. So the objective is

        L0 = NextToken(descriptions + atomic single-step QA) + w_aux * CE(attribute head on image tokens)
             + w_nce * InfoNCE(direct query embedding, positive; in-batch + mined hard negatives)
             + w_bow * BagOfWords(LM head at <|emb|> of query and positive -> words of the target)
             + w_search * -log(attention of one head on the image tokens a search answer reads)

    with the contrastive term joining after ``see_steps`` (grounding first), frame replay and a
    frame-index head from ``frame_phase``, reading spans (true observations, then the answer
    statement) from ``read_phase``, search-skill replay from ``skill_phase`` and the search-attention
    term from ``search_phase``. The skills are single hops (``mmemb_lab.world.skills``). A last phase
    (``reason_batch`` chains from ``reason_phase``, in the stage-1 span form: ``reason_form="span"``)
    teaches the model to write a gold chain of thought inside ``<think>...</think>``, as a pretrained
    reasoning MLLM can before any embedding training; which chains pay off, and when to write one, stay
    the later stages' job. The committed checkpoint had this phase (data/README.md); it is off in the
    default schedule (``reason_batch=0``) and ``make foundation`` turns it on from step 8600.

Deviations: a pretrained MLLM has no attribute head; ours is dropped after stage 0 (it is saved
separately and not part of the backbone checkpoint). Nor is its attention supervised: the search term
(``FoundationConfig.search_weight``) is ours, a stand-in for the pretraining scale a tiny model lacks.

Modules: ``config`` (FoundationConfig), ``objective`` (Stage0: the heads, labels and every loss term),
``curriculum`` (what each step trains on, and the step), ``checkpoint`` (train to completion, resumably; load),
``probes`` (does it see? description and single-skill accuracy). They import the model and the world, never
the later stages.

Used by: ``make foundation`` (trains data/foundation from scratch; how the committed checkpoint was made is in
data/README.md), the demo when no foundation exists, notebook 01.
"""

from ...world.build import WORLD_VERSION
from .checkpoint import adopt_checkpoint, load_foundation, train_foundation, world_corpus, world_fingerprint
from .config import FoundationConfig
from .curriculum import (
    assistant_text,
    bag_of_words,
    contrastive_batch,
    gen_skills,
    make_step_fn,
    near_miss,
    observations,
    positive_and_negatives,
    reading_span,
)
from .objective import (
    MAX_FRAMES,
    N_TOKEN_POSITIONS,
    Stage0,
    answer_labels,
    answer_weights,
    frame_labels,
    lm_loss,
    read_mass,
    search_attention,
    search_loss,
    search_targets,
    token_labels,
    token_positions,
)
from .probes import ATOMIC_SKILLS, description_accuracy, generate, score_page_text, score_scene_text, skill_accuracy

__all__ = ["WORLD_VERSION", "FoundationConfig", "Stage0", "make_step_fn", "train_foundation", "load_foundation",
           "adopt_checkpoint", "world_corpus", "world_fingerprint", "assistant_text", "bag_of_words",
           "contrastive_batch", "gen_skills", "near_miss", "observations", "positive_and_negatives", "reading_span",
           "MAX_FRAMES",
           "N_TOKEN_POSITIONS", "answer_labels", "answer_weights", "frame_labels", "lm_loss", "read_mass",
           "search_attention", "search_loss", "search_targets", "token_labels", "token_positions", "ATOMIC_SKILLS",
           "description_accuracy", "generate", "score_page_text", "score_scene_text", "skill_accuracy"]
