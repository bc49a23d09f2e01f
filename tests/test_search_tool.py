"""tools/search.py as a user runs it: one-line errors with exit code 2, refusing to overwrite, --resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "search.py"
TINY = ["data.limit_train=120", "data.batch_size=16", "data.input_size=16", "skeleton.filters=8",
        "skeleton.stages=[1,1]", "space.levels=2", "pretrain.epochs=1", "search.epochs=1",
        "search.gamma=0.1", "search.lambda_lr=0.2"]


def search(tmp_path, *args, overrides=TINY):
    cmd = [sys.executable, str(TOOL), "--out", str(tmp_path), "--name", "run"]
    for item in overrides:
        cmd += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_unknown_config_key_is_one_line_exit_2(tmp_path):
    proc = search(tmp_path, "--set", "search.gama=0.1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == error_lines(proc)
    assert "search.gama" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_space_that_does_not_fit_the_skeleton_is_a_clean_error(tmp_path):
    # --space shuffle alone loads configs/shuffle_default.yaml; with the cifar skeleton it cannot run.
    proc = search(tmp_path, "--space", "shuffle", "--config", str(REPO / "configs" / "default.yaml"))
    assert proc.returncode == 2, proc.stderr
    assert len(error_lines(proc)) == 1 and "Traceback" not in proc.stderr
    assert "skeleton.kind" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A complete tiny search run by the tool."""
    out = tmp_path_factory.mktemp("tool")
    proc = search(out, "--space", "share")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc


def test_full_run_prints_the_genotype_and_writes_the_run_folder(finished):
    out, proc = finished
    run = out / "run"
    assert f"genotype written to {run / 'genotype.json'}" in proc.stdout
    assert "all blocks:" in proc.stdout and "derived net:" in proc.stdout
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "genotype.json", "search_summary.json",
                 "checkpoints/pretrain.ckpt", "checkpoints/search.ckpt", "report/report.md"):
        assert (run / name).is_file(), name
    assert json.loads((run / "genotype.json").read_text())["shared"] is True
    assert f"report: {run / 'report' / 'report.md'}" in proc.stdout
    for png in ("lambda.png", "sparsity.png", "accuracy.png", "block_flops.png", "genotype.png"):
        assert (run / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_random_method_writes_seeded_genotypes_within_the_budget(tmp_path):
    args = ("--method", "random", "--num", "3", "--target-params", "6k", "--tolerance", "0.2")
    proc = search(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "random_summary.json").read_text())
    assert len(summary["genotypes"]) == 3
    for entry in summary["genotypes"]:
        assert abs(entry["params"] - 6000) <= 0.2 * 6000
        assert (tmp_path / "run" / entry["path"]).is_file()
    (tmp_path / "again").mkdir()
    assert search(tmp_path / "again", *args).returncode == 0  # same seed, same genotypes
    first = [(tmp_path / "run" / e["path"]).read_text() for e in summary["genotypes"]]
    second = sorted((tmp_path / "again" / "run" / "genotypes").glob("*.json"))
    assert first == [p.read_text() for p in second]
    assert len(set(first)) == 3


def test_random_method_refuses_an_impossible_budget(tmp_path):
    proc = search(tmp_path, "--method", "random", "--target-params", "1G")
    assert proc.returncode == 2
    assert len(error_lines(proc)) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "random_summary.json").exists()


def test_existing_run_folder_is_refused(finished):
    out, _ = finished
    before = (out / "run" / "genotype.json").read_bytes()
    proc = search(out, "--space", "share")
    assert proc.returncode == 2
    assert len(error_lines(proc)) == 1 and "--resume" in proc.stderr
    assert (out / "run" / "genotype.json").read_bytes() == before


def test_resume_extends_the_search(finished):
    out, _ = finished
    proc = search(out, "--space", "share", "--resume", overrides=[*TINY, "search.epochs=2"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in records] == [("pretrain", 1), ("search", 1), ("search", 2)]
    assert "genotype written to" in proc.stdout
