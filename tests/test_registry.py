"""The MMEB-V2 registry holds exactly the benchmark's 78 datasets with their scoring rules."""

import dataclasses
from collections import Counter
from itertools import groupby

import pytest

from mmemb_lab.data import DatasetInfo
from mmemb_lab.eval import registry
from mmemb_lab.eval.registry import META_TASKS, MMEB_V2, benchmark, register_benchmark

EXPECTED_COUNTS = {
    ("image", "CLS"): 10, ("image", "QA"): 10, ("image", "RET"): 12, ("image", "GD"): 4,
    ("video", "CLS"): 5, ("video", "QA"): 5, ("video", "RET"): 5, ("video", "MRET"): 3,
    ("visdoc", "VDRv1"): 10, ("visdoc", "VDRv2"): 4, ("visdoc", "VisRAG"): 6, ("visdoc", "OOD"): 4,
}

VISDOC_NAMES = {
    "ViDoRe_arxivqa", "ViDoRe_docvqa", "ViDoRe_infovqa", "ViDoRe_tabfquad", "ViDoRe_tatdqa",
    "ViDoRe_shiftproject", "ViDoRe_syntheticDocQA_artificial_intelligence", "ViDoRe_syntheticDocQA_energy",
    "ViDoRe_syntheticDocQA_government_reports", "ViDoRe_syntheticDocQA_healthcare_industry",
    "ViDoRe_esg_reports_human_labeled_v2", "ViDoRe_biomedical_lectures_v2_multilingual",
    "ViDoRe_economics_reports_v2_multilingual", "ViDoRe_esg_reports_v2_multilingual",
    "VisRAG_ArxivQA", "VisRAG_ChartQA", "VisRAG_MP-DocVQA", "VisRAG_SlideVQA", "VisRAG_InfoVQA", "VisRAG_PlotQA",
    "ViDoSeek-page", "ViDoSeek-doc", "MMLongBench-page", "MMLongBench-doc",
}


def test_counts_per_meta_task_and_total():
    counts = Counter((i.modality, i.meta_task) for i in MMEB_V2.values())
    assert dict(counts) == EXPECTED_COUNTS
    assert len(MMEB_V2) == 78
    assert Counter(i.modality for i in MMEB_V2.values()) == {"image": 36, "video": 18, "visdoc": 24}


def test_keys_are_names_and_unique():
    assert all(name == info.name for name, info in MMEB_V2.items())
    assert len({i.name for i in MMEB_V2.values()}) == 78


def test_meta_tasks_order_and_registry_follows_it():
    assert META_TASKS == list(EXPECTED_COUNTS)
    columns = [(i.modality, i.meta_task) for i in MMEB_V2.values()]
    assert [c for c, _ in groupby(columns)] == META_TASKS  # each column contiguous, in table order


def test_metrics_by_modality():
    for info in MMEB_V2.values():
        assert info.metric == ("ndcg@5" if info.modality == "visdoc" else "hit@1"), info.name


def test_eval_types():
    for info in MMEB_V2.values():
        if info.modality == "visdoc" or (info.modality == "video" and info.meta_task == "RET"):
            expected = "global"
        elif info.modality == "video" and info.meta_task == "CLS":
            expected = "local" if info.name == "SmthSmthV2" else "global"
        else:  # every image task, video QA and MRET
            expected = "local"
        assert info.eval_type == expected, info.name


def test_visdoc_names_and_selected_names():
    assert {n for n, i in MMEB_V2.items() if i.modality == "visdoc"} == VISDOC_NAMES
    for name in ("ImageNet-1K", "Visual7W-Pointing", "K700", "SmthSmthV2", "MomentSeeker", "Wiki-SS-NQ"):
        assert name in MMEB_V2


def test_sources_and_instructions():
    for info in MMEB_V2.values():
        assert info.instruction.strip() and info.hf_source.strip(), info.name
        if info.modality == "image":
            assert info.hf_source == "TIGER-Lab/MMEB-eval"
        if info.modality == "video":
            assert info.hf_source == "TIGER-Lab/MMEB-V2"
        if info.modality == "visdoc":
            assert info.hf_source.split("/")[0] in {"vidore", "openbmb", "VLM2Vec"}
            assert info.instruction == "Find a document image that matches the given query:"
    assert MMEB_V2["DocVQA"].instruction == "Represent the given image with the following question:"
    assert MMEB_V2["MSCOCO_t2i"].instruction.startswith("Find me an everyday image that matches the given caption")
    assert MMEB_V2["ImageNet-1K"].column == "image/CLS"


def test_dataset_info_is_frozen_and_validated():
    info = MMEB_V2["ImageNet-1K"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.metric = "hit@5"
    with pytest.raises(ValueError):
        DatasetInfo("x", "image", "CLS", "hit@1", "everywhere", "x", "i")
    with pytest.raises(ValueError):
        DatasetInfo("x", "image", "CLS", "accuracy", "local", "x", "i")


def test_benchmark_lookup_and_registration(monkeypatch):
    monkeypatch.setattr(registry, "_BENCHMARKS", dict(registry._BENCHMARKS))
    got = benchmark("mmeb-v2")
    assert got == MMEB_V2
    got.pop("MSVD")                      # callers get a copy: the registry is untouched
    assert "MSVD" in MMEB_V2 and len(benchmark("mmeb-v2")) == 78

    tiny = {"t": DatasetInfo("t", "toy", "RET", "hit@1", "global", "t", "Find the match:")}
    register_benchmark("tiny-test", lambda: tiny)
    assert benchmark("tiny-test") == tiny
    assert "tiny-test" in registry.available_benchmarks()
    with pytest.raises(ValueError):
        register_benchmark("tiny-test", lambda: tiny)
    register_benchmark("tiny-test", lambda: {}, overwrite=True)
    assert benchmark("tiny-test") == {}
    with pytest.raises(KeyError):
        benchmark("no-such-benchmark")
