"""Run folders: everything a long job leaves behind, in one place a user can inspect and resume.

    runs/<name>/config.yaml      the resolved config (written atomically)
    runs/<name>/log.txt          human-readable log, appended
    runs/<name>/metrics.jsonl    one JSON object per line (per epoch), appended
    runs/<name>/checkpoints/     <stage>.ckpt files, written by the engine
    runs/<name>/*.json           genotype, reports ... (save_json, atomic)

An existing run is never overwritten by accident: `create` refuses a folder holding results (metrics,
checkpoints, anything beyond the config and the log of a run that failed at start-up) unless the caller
asks to resume it (the config must be compatible) or to start over (`force`, which moves the old folder
aside and only then deletes it, so a crash never leaves half a run).
"""

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from .errors import RunFolderError
from .io import atomic_write_json, atomic_write_text

logger = logging.getLogger("dsonas")

# A resumed run may extend its schedule or move to other devices; anything else changes what is trained.
RESUMABLE_CHANGES = ("name", "pretrain.epochs", "search.epochs", "retrain.epochs", "data.num_workers",
                     "data.test_batch_size", "runtime.")


class RunDir:
    """One run folder; build it with `RunDir.create`."""

    def __init__(self, path):
        self.path = Path(path)

    @classmethod
    def create(cls, out="runs", name="default", config_dict=None, resume=False, force=False):
        """Open runs/<name> for a new run, a resumed run (`resume`) or a fresh start over an old one
        (`force`); config_dict (plain dicts) is saved as config.yaml."""
        if resume and force:
            raise RunFolderError("--resume and --force contradict each other; pass only one of them")
        if not name or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name):
            raise RunFolderError(f"run name {name!r} must be a plain folder name (no path separators)")
        path = Path(out) / name
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"{path} exists and is not a folder; pick another --name or --out")
        busy = path.is_dir() and _has_results(path)
        if resume:
            if not (path / "config.yaml").is_file():
                raise RunFolderError(f"nothing to resume in {path} (no config.yaml); drop --resume to start "
                                     f"a new run")
            if config_dict is not None:
                _check_resumable(path, config_dict)
        elif busy:
            if not force:
                raise RunFolderError(f"run folder {path} already exists; pass --resume to continue it, "
                                     f"--force to overwrite it, or a new --name")
            _remove_run(path)
        run = cls(path)
        run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if config_dict is not None:
            atomic_write_text(path / "config.yaml", yaml.safe_dump(config_dict, sort_keys=False,
                                                                   default_flow_style=None))
        run.log(f"{'resumed' if resume else 'started'} run {path}")
        return run

    @property
    def checkpoint_dir(self):
        return self.path / "checkpoints"

    def checkpoint_path(self, stage):
        """Where the engine keeps the checkpoint of a stage ("pretrain", "search", "retrain", ...)."""
        return self.checkpoint_dir / f"{stage}.ckpt"

    def log(self, msg):
        """Append a timestamped line to log.txt and pass the message on to the "dsonas" logger."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path / "log.txt", "a", encoding="utf-8") as f:
            f.write(f"{stamp} {msg}\n")
        logger.info(msg)

    def write_metrics(self, record):
        """Append one JSON object (numpy scalars allowed) as a line of metrics.jsonl."""
        line = json.dumps(record, default=_json_default)
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def read_metrics(self):
        """Every record of metrics.jsonl, oldest first (a torn last line from a crash is skipped)."""
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        records = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def save_json(self, name, obj):
        """Write <run>/<name> atomically and return its path."""
        path = self.path / name
        atomic_write_json(path, obj)
        return path


def _has_results(path):
    """Whether a folder holds anything to lose. A run that stopped before its first metrics line or
    checkpoint (bad data path, typo in a flag) left only config.yaml, log.txt and an empty checkpoints/:
    starting it again must not need --force."""
    for entry in path.iterdir():
        if entry.name in ("config.yaml", "log.txt"):
            continue
        if entry.name == "checkpoints" and entry.is_dir() and not any(entry.iterdir()):
            continue
        return True
    return False


def _json_default(value):
    """numpy scalars and arrays -> Python numbers and lists (json cannot encode them)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to metrics.jsonl")


def _flatten(d, prefix=""):
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _check_resumable(path, config_dict):
    try:
        saved = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        msg = f"{path}/config.yaml is damaged; cannot resume, use --force to start over"
        raise RunFolderError(msg) from None
    old, new = _flatten(saved), _flatten(config_dict)
    changed = [k for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES)]
    if changed:
        k = changed[0]
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise RunFolderError(f"cannot resume {path} with a different config: {k} was {old.get(k)!r}, now "
                             f"{new.get(k)!r}{more}; pass the same --config/--set as the original run")


def _remove_run(path):
    """Delete an old run for --force, refusing folders that do not look like a run folder (a typo in
    --out/--name must not wipe a source tree). The folder is renamed first, so the delete is all or nothing
    from the run's point of view."""
    path = path.resolve()
    if not (path / "config.yaml").is_file() and not (path / "log.txt").is_file():
        raise RunFolderError(f"{path} is not empty and is not a dsonas run folder (no config.yaml); "
                             f"refusing to delete it, pick another --name or --out")
    if path in (Path.cwd().resolve(), Path.home().resolve()) or path in Path.cwd().resolve().parents:
        raise RunFolderError(f"refusing to delete {path}: it contains the current folder")
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, trash / path.name)
    shutil.rmtree(trash)
