"""evals/throughput.py planning: seesaw rows from layout labels, --baseline pairs interleaved, the before/after
table with its token-identity count, and the baseline worktree's life cycle (on a scratch git repository)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from evals.baseline import BaselineTree, baseline_worktree
from evals.throughput import PEERS, parse_args, planned_runs, seesaw_layout
from evals.throughput_report import baseline_pairs, format_baseline_table, result_rows

ARGS = ["--dtype", "float32", "--engines", "seesaw,hf", "--workloads", "fixed-b", "--kv-host-gb", "1.5"]


def _option(command, name):
    return command[command.index(name) + 1]


def test_labels_become_launchers_and_llm_kwargs():
    one = seesaw_layout("TP1")
    assert (one.label, one.launcher, one.llm_kwargs, one.ranks) == ("1proc", (sys.executable,), {}, 1)
    seesaw = seesaw_layout("pp2->tp2")
    assert seesaw.label == "PP2->TP2" and seesaw.launcher == ("deepspeed", "--num_gpus", "2")
    assert seesaw.llm_kwargs == {"parallel": {"prefill": {"tp": 1, "pp": 2}, "decode": {"tp": 2, "pp": 1}}}
    four = seesaw_layout("PP2xTP2->TP4")                       # any label of the grammar, not a fixed list
    assert four.launcher[-1] == "4" and four.llm_kwargs["parallel"]["decode"] == {"tp": 4, "pp": 1}
    dp = seesaw_layout("TP1xDP2")                              # one-rank replicas: one engine per rank
    assert (dp.label, dp.launcher, dp.llm_kwargs, dp.replicas) == ("DP2", ("deepspeed", "--num_gpus", "2"), {}, True)
    with pytest.raises(ValueError, match="a replica of several ranks is not a row"):
        seesaw_layout("TP2xDP2")


@pytest.mark.parametrize("bad, message", [("TP2,XX3", "--seesaw-layouts: parallel must be seesaw"),
                                          ("PP2->TP4", "has prefill on 2 ranks per replica"),
                                          ("seesaw", "its layouts depend on the model")])
def test_bad_labels_stop_the_command_line(capsys, bad, message):
    with pytest.raises(SystemExit):
        parse_args([*ARGS, "--seesaw-layouts", bad])
    assert message in capsys.readouterr().err


def test_baseline_rows_run_just_before_their_current_row(tmp_path):
    args = parse_args([*ARGS, "--seesaw-layouts", "1proc,tp2,PP2->TP2,TP1", "--baseline", "HEAD"])
    tree = BaselineTree("HEAD", "f" * 40, "abc1234", tmp_path / "tree", tmp_path / "cache")
    runs = planned_runs(args, "/models/m", tmp_path / "wl.json", tmp_path, tree)
    assert [(r.engine, r.layout) for r in runs] == [
        ("seesaw", "1proc@abc1234"), ("seesaw", "1proc"), ("seesaw", "TP2@abc1234"), ("seesaw", "TP2"),
        ("seesaw", "PP2->TP2@abc1234"), ("seesaw", "PP2->TP2"), ("hf", "1proc")]   # TP1 is 1proc: one row
    for base, now in zip(runs[0:6:2], runs[1:6:2]):
        assert str(tree.runner) in base.command and str(PEERS / "seesaw_runner.py") in now.command
        assert base.env["SEESAW_CACHE"] == str(tmp_path / "cache") and now.env is None
        assert _option(base.command, "--llm-kwargs") == _option(now.command, "--llm-kwargs")
        assert _option(base.command, "--out") != _option(now.command, "--out")
        assert base.command[:base.command.index(str(tree.runner))] == now.command[:now.command.index(
            str(PEERS / "seesaw_runner.py"))]                                  # same launcher
    assert json.loads(_option(runs[1].command, "--llm-kwargs")) == {}           # one process: nothing to pass
    assert json.loads(_option(runs[3].command, "--llm-kwargs")) == {"parallel": {"tp": 2, "pp": 1},
                                                                    "kv_host_gb": 1.5}
    assert runs[3].command[:3] == ("deepspeed", "--num_gpus", "2")
    plain = planned_runs(args, "/models/m", tmp_path / "wl.json", tmp_path)    # no baseline: current rows only
    assert [r.layout for r in plain] == ["1proc", "TP2", "PP2->TP2", "1proc"]


def _run(layout, wall, digests):
    return {"engine": "seesaw", "layout": layout, "dtype": "float32",
            "results": [{"workload": "a", "wall_s": wall, "requests": 3, "prompt_tokens": 300, "output_tokens": 100,
                         "generated_tokens": 100, "short_requests": 0, "extra": {}, "output_digests": digests}]}


def test_baseline_table_gives_ratios_and_token_identity():
    runs = [_run("TP2@abc1234", 2.0, ["x", "y", "z"]), _run("TP2", 1.0, ["x", "y", "z"]),
            _run("PP2@abc1234", 1.0, ["x", "y", "z"]), _run("PP2", 1.25, ["x", "q", "z"]),
            _run("1proc@abc1234", 1.0, None), _run("1proc", 1.0, ["x", "y", "z"]), _run("PP4@abc1234", 1.0, [])]
    pairs = {p["layout"]: p for p in baseline_pairs(result_rows(runs))}
    assert set(pairs) == {"TP2", "PP2", "1proc"}                      # PP4 has no current row
    assert pairs["TP2"]["ratio"] == pytest.approx(2.0) and pairs["TP2"]["same_tokens"] == 3
    assert pairs["PP2"]["ratio"] == pytest.approx(0.8) and pairs["PP2"]["same_tokens"] == 2
    assert pairs["1proc"]["same_tokens"] is None and pairs["TP2"]["baseline"] == "abc1234"
    lines = {line.split()[1]: line.split() for line in format_baseline_table(list(pairs.values())).splitlines()[1:]}
    assert lines["TP2"][-2:] == ["2.000", "3/3"] and lines["PP2"][-3:] == ["0.800", "2/3", "NO"]
    assert lines["1proc"][-1] == "-"


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True).stdout


def test_baseline_worktree_is_a_clean_checkout_with_the_current_harness(tmp_path):
    repo, harness = tmp_path / "repo", tmp_path / "now"
    (repo / "evals" / "peers").mkdir(parents=True)
    (repo / "evals" / "peers" / "seesaw_runner.py").write_text("old runner\n")
    (repo / "engine.py").write_text("v1\n")
    _git(tmp_path, "init", "-q", str(repo))
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "v1")
    (repo / "engine.py").write_text("v2, not committed\n")
    (harness / "evals" / "peers").mkdir(parents=True)
    (harness / "evals" / "peers" / "seesaw_runner.py").write_text("new runner\n")
    with baseline_worktree("HEAD", repo=repo, harness_from=harness) as tree:
        assert (tree.root / "engine.py").read_text() == "v1\n"                 # the revision, not the work tree
        assert tree.runner.read_text() == "new runner\n" and tree.cache_dir.is_dir()
        assert tree.label("TP2") == f"TP2@{tree.short}" and tree.commit.startswith(tree.short)
        assert str(tree.root) in _git(repo, "worktree", "list")
    assert not tree.root.exists() and str(tree.root) not in _git(repo, "worktree", "list")
    with pytest.raises(ValueError, match="is not a commit"):
        with baseline_worktree("no-such-rev", repo=repo):
            pass
