"""The paper table: MMEB-V2's averaging rules, every column, and peers read from their data file."""

import json

import numpy as np
import plotly.graph_objects as go
import pytest

from mmemb_lab.eval import report
from mmemb_lab.eval.registry import META_TASKS, MMEB_V2
from mmemb_lab.paths import data_dir


def _scores(seed=0):
    rng = np.random.default_rng(seed)
    base = {"image": 80.0, "video": 30.0, "visdoc": 60.0}
    return {n: base[d.modality] + rng.uniform(-10, 10) for n, d in MMEB_V2.items()}


def test_overall_is_the_mean_over_78_datasets_not_over_modalities():
    scores = _scores()
    t = report.paper_table(scores, MMEB_V2)
    assert t.n_datasets == t.n_expected == 78 and not t.partial and t.missing == ()
    assert t.overall == pytest.approx(np.mean(list(scores.values())), abs=1e-12)
    assert abs(t.overall - np.mean(list(t.modality.values()))) > 3  # image (36 datasets) outweighs video (18)
    for modality, task in META_TASKS:
        vals = [s for n, s in scores.items() if MMEB_V2[n].modality == modality and MMEB_V2[n].meta_task == task]
        assert t.cells[f"{modality}/{task}"] == pytest.approx(np.mean(vals), abs=1e-12)
    counts = {c: sum(1 for d in MMEB_V2.values() if d.column == c) for c in t.cells}
    assert counts == {"image/CLS": 10, "image/QA": 10, "image/RET": 12, "image/GD": 4, "video/CLS": 5,
                      "video/QA": 5, "video/RET": 5, "video/MRET": 3, "visdoc/VDRv1": 10, "visdoc/VDRv2": 4,
                      "visdoc/VisRAG": 6, "visdoc/OOD": 4}


def test_markdown_has_every_column_and_flags_partial_rows():
    scores = _scores(1)
    full = report.paper_table(scores, MMEB_V2, "full run")
    images_only = {k: v for k, v in scores.items() if MMEB_V2[k].modality == "image"}
    part = report.paper_table(images_only, MMEB_V2, "images only")
    md = report.table_markdown([full, part], MMEB_V2, report.load_peers())
    header = md.splitlines()[0]
    for modality, task in META_TASKS:
        assert f"{modality} {report.SHORT.get(task, task)}" in header
    for modality in ("image", "video", "visdoc"):
        assert f"{modality} mean" in header
    full_row = next(line for line in md.splitlines() if line.startswith("| full run"))
    assert f"{full.overall:.1f}" in full_row and "78/78" in full_row
    assert "images only: partial, 36 of 78 datasets" in md
    part_row = next(line for line in md.splitlines() if line.startswith("| images only"))
    assert part_row.count("–") == 10  # 4 video + 4 visdoc meta-tasks and their 2 modality means


def test_peers_come_from_the_data_file_with_sources():
    raw = json.loads((data_dir() / "peers_mmeb_v2.json").read_text())
    peers = report.load_peers()
    assert len(peers) == len(raw["peers"]) >= 10 and all(p.source.strip() for p in peers)
    published = {p.label: p.overall for p in peers}
    assert published["VLM2Vec-V2 2B"] == 58.0 and published["MMEmb-R1 4B"] == 71.2
    assert published["Qwen3-VL-Embedding 8B"] == 77.8 and published["UME-R1 7B"] == 64.5
    assert next(p for p in peers if p.model == "Think-Then-Embed").approx
    assert "split versions" in raw["caveat"].lower()


def test_figures_show_what_the_files_say(tmp_path):
    raw = json.loads((data_dir() / "peers_mmeb_v2.json").read_text())
    raw["peers"][0]["overall"] = 12.3  # a changed file changes the figure: nothing is typed into the plot
    (tmp_path / "peers.json").write_text(json.dumps(raw))
    peers = report.load_peers(tmp_path / "peers.json")
    ours = report.paper_table(_scores(2), MMEB_V2, "ours")
    fig = report.overall_figure([ours], peers)
    assert isinstance(fig, go.Figure)
    bars = dict(zip(fig.data[0].y, fig.data[0].x))
    assert bars[peers[0].label] == 12.3 and bars["ours"] == pytest.approx(ours.overall)
    assert sorted(bars.values()) == sorted([p.overall for p in peers] + [ours.overall])
    tab = report.table_figure([ours], MMEB_V2, peers)
    assert isinstance(tab.data[0], go.Table) and "overall" in tab.data[0].header.values
    assert len(tab.data[0].cells.values[0]) == 1 + len(peers)


def test_toy_registry_gets_only_its_columns(small_world):
    from mmemb_lab.world.build import toy_registry

    _, info = small_world
    reg = toy_registry(info)
    groups = report.columns_of(reg)
    assert [m for m, _ in groups] == ["image", "video", "visdoc"]
    assert groups[1][1] == ["video/QA", "video/RET"]
    t = report.paper_table({n: 50.0 for n in reg}, reg, "toy")
    assert "| toy | 50.0" in report.table_markdown([t], reg) and t.n_expected == len(reg)
