import json
import os

import numpy as np
import pytest
import yaml
from common import run_tool, setup_threads

from dsonas.config import Config, config_to_dict
from dsonas.errors import DataError, RunFolderError
from dsonas.runs import RunDir


@pytest.fixture
def cfg_dict():
    return config_to_dict(Config())


def test_new_run_folder_layout(tmp_path, cfg_dict):
    run = RunDir.create(out=tmp_path, name="r1", config_dict=cfg_dict)
    assert run.path == tmp_path / "r1"
    assert yaml.safe_load((run.path / "config.yaml").read_text()) == cfg_dict
    assert run.checkpoint_dir.is_dir()
    assert run.checkpoint_path("search") == run.path / "checkpoints" / "search.ckpt"
    run.log("hello")
    assert (run.path / "log.txt").read_text().splitlines()[-1].endswith("hello")
    run.write_metrics({"epoch": 0, "loss": np.float32(1.5), "sparsity": np.array([0.25, 0.5])})
    run.write_metrics({"epoch": 1, "loss": 1.0})
    assert run.read_metrics() == [{"epoch": 0, "loss": 1.5, "sparsity": [0.25, 0.5]},
                                  {"epoch": 1, "loss": 1.0}]
    path = run.save_json("genotype.json", {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert not [p for p in run.path.iterdir() if p.name.startswith(".tmp")]


def test_existing_run_is_refused(tmp_path, cfg_dict):
    run = RunDir.create(out=tmp_path, name="r", config_dict=cfg_dict)
    run.write_metrics({"epoch": 0})
    with pytest.raises(RunFolderError, match="--resume .*--force"):
        RunDir.create(out=tmp_path, name="r", config_dict=cfg_dict)
    assert run.read_metrics() == [{"epoch": 0}]          # nothing was touched
    (tmp_path / "empty").mkdir()                         # an empty folder is fine to use
    RunDir.create(out=tmp_path, name="empty", config_dict=cfg_dict)


def test_run_that_failed_at_start_can_be_started_again(tmp_path, cfg_dict):
    RunDir.create(out=tmp_path, name="r", config_dict=cfg_dict)      # e.g. the data path was wrong
    changed = config_to_dict(Config())
    changed["data"]["root"] = "/data/fixed"
    run = RunDir.create(out=tmp_path, name="r", config_dict=changed)
    assert yaml.safe_load((run.path / "config.yaml").read_text())["data"]["root"] == "/data/fixed"
    assert (run.path / "log.txt").read_text().count("started run") == 2


def test_resume_keeps_the_run(tmp_path, cfg_dict):
    with pytest.raises(RunFolderError, match="nothing to resume"):
        RunDir.create(out=tmp_path, name="r", config_dict=cfg_dict, resume=True)
    run = RunDir.create(out=tmp_path, name="r", config_dict=cfg_dict)
    run.write_metrics({"epoch": 0})
    run.checkpoint_path("search").write_bytes(b"state")
    longer = config_to_dict(Config())
    longer["search"]["epochs"] = 40                      # extending the schedule is allowed
    longer["runtime"]["threads"] = 3
    again = RunDir.create(out=tmp_path, name="r", config_dict=longer, resume=True)
    assert again.read_metrics() == [{"epoch": 0}]
    assert again.checkpoint_path("search").read_bytes() == b"state"
    assert yaml.safe_load((again.path / "config.yaml").read_text())["search"]["epochs"] == 40
    assert "resumed" in (again.path / "log.txt").read_text()


def test_resume_with_a_different_config_is_refused(tmp_path, cfg_dict):
    RunDir.create(out=tmp_path, name="r", config_dict=cfg_dict)
    changed = config_to_dict(Config())
    changed["search"]["gamma"] = 0.5
    with pytest.raises(RunFolderError, match=rf"search\.gamma was {Config().search.gamma}, now 0\.5"):
        RunDir.create(out=tmp_path, name="r", config_dict=changed, resume=True)


def test_force_starts_over(tmp_path, cfg_dict):
    run = RunDir.create(out=tmp_path, name="r", config_dict=cfg_dict)
    run.write_metrics({"epoch": 0})
    run.checkpoint_path("search").write_bytes(b"old")
    fresh = RunDir.create(out=tmp_path, name="r", config_dict=cfg_dict, force=True)
    assert fresh.read_metrics() == [] and not fresh.checkpoint_path("search").exists()
    assert (fresh.path / "config.yaml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]    # no leftovers from the move aside


def test_force_refuses_a_folder_that_is_not_a_run(tmp_path, cfg_dict):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "precious.py").write_text("x = 1\n")
    with pytest.raises(RunFolderError, match="not a dsonas run folder"):
        RunDir.create(out=tmp_path, name="src", config_dict=cfg_dict, force=True)
    assert (tmp_path / "src" / "precious.py").read_text() == "x = 1\n"


@pytest.mark.parametrize("name", ["a/b", "..", ""])
def test_bad_run_names(tmp_path, cfg_dict, name):
    with pytest.raises(RunFolderError):
        RunDir.create(out=tmp_path, name=name, config_dict=cfg_dict)


def test_resume_and_force_together(tmp_path, cfg_dict):
    with pytest.raises(RunFolderError, match="only one"):
        RunDir.create(out=tmp_path, name="r", config_dict=cfg_dict, resume=True, force=True)


# ---------------------------------------------------------------------------------------------------------
# tool plumbing (tools/common.py)


def test_run_tool_turns_user_errors_into_exit_2(capsys):
    def main():
        raise DataError("CIFAR-10 not found in /x; pass --data-root")

    with pytest.raises(SystemExit) as info:
        run_tool(main)
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: CIFAR-10 not found in /x; pass --data-root"


def test_run_tool_exit_codes():
    def interrupted():
        raise KeyboardInterrupt

    for main, code in ((lambda: None, 0), (lambda: 3, 3), (interrupted, 130)):
        with pytest.raises(SystemExit) as info:
            run_tool(main)
        assert info.value.code == code

    def bug():
        raise ValueError("a bug keeps its traceback")

    with pytest.raises(ValueError):
        run_tool(bug)


def test_setup_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert setup_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert setup_threads() == 1                          # the user's environment wins over the default
    assert setup_threads(3) == 3 and os.environ["OMP_NUM_THREADS"] == "3"   # runtime.threads wins over both


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    """mkstemp/mkdtemp create 0600/0700 entries; results must be readable like any file the user makes."""
    from dsonas.io import atomic_write_text, new_folder

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        folder = new_folder(tmp_path, ".t-")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert os.stat(folder).st_mode & 0o777 == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.txt", os.path.basename(folder)])
