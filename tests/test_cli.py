"""The command line: every subcommand has --help; the dataset listing is machine-readable."""

import json
import subprocess
import sys

import pytest

from mmemb_lab.cli import main, parser

COMMANDS = ["world", "foundation", "train", "evaluate", "demo", "run", "rationales", "select", "stage1", "stage2", "figures",
            "results", "bench", "gpu-check", "datasets", "data", "benchmark"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: mmemb-lab " + cmd in capsys.readouterr().out


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "mmemb_lab", "--help"], capture_output=True, text=True, check=True)
    for cmd in COMMANDS:
        assert cmd in out.stdout


def test_datasets_json(capsys):
    main(["datasets", "--benchmark", "mmeb-v2", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 78
    assert {"name", "modality", "meta_task", "metric", "eval_type"} <= set(rows[0])
    main(["datasets", "--benchmark", "toy", "--json"])
    assert len(json.loads(capsys.readouterr().out)) == 8


def test_subcommands_match_parser():
    assert set(parser()._subparsers._group_actions[0].choices) == set(COMMANDS)
