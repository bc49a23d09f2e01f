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


def test_space_not_implemented_is_a_clean_error(tmp_path):
    proc = search(tmp_path, "--space", "shuffle")
    assert proc.returncode == 2, proc.stderr
    assert len(error_lines(proc)) == 1 and "Traceback" not in proc.stderr


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
                 "checkpoints/pretrain.ckpt", "checkpoints/search.ckpt"):
        assert (run / name).is_file(), name
    assert json.loads((run / "genotype.json").read_text())["shared"] is True


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
