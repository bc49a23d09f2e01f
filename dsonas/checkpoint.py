"""Resumable training state: one atomic checkpoint file per stage, plus deterministic per-epoch seeding.

A checkpoint is only useful whole (weights without the optimizer momentum do not continue the same
run), so everything goes into one pickled file replaced atomically: after a crash the file holds either
the previous epoch or the new one, never a mix.

Contents: every Parameter of the network as a numpy array (keyed by its name *relative to the network*,
see `named_parameters`), each Trainer's state (momentum, update counts and the pickled optimizer, which
carries APG-NAG's per-λ γ and frozen masks), Python's and numpy's RNG states, and a free `meta` dict the
loop fills (stage, epoch, iteration, current masks, ...).

MXNet's RNG state cannot be read back (`mx.random.seed` is write-only), so exact resume relies on
`reseed`: every loop re-seeds Python, numpy and MXNet at the start of each epoch from
(seed, stage, epoch). An epoch therefore draws the same shuffles, augmentations and random ops whether it
runs straight after the previous one or after a resume; mid-epoch state is never needed because
checkpoints are taken at epoch boundaries. (Data-loader worker processes keep their own RNGs, so an exact
resume needs `data.num_workers: 0`.)
"""

import os
import pickle
import random
import tempfile

import numpy as np

from dsonas.errors import RunFolderError
from dsonas.io import atomic_write_bytes

CHECKPOINT_VERSION = 1

# Stable small integers for the stage names, so reseed() never depends on Python's salted str hash.
_STAGE_IDS = {"pretrain": 1, "search": 2, "retrain": 3}


def reseed(seed, stage, epoch):
    """Seed Python, numpy and MXNet from (seed, stage, epoch): the start of an epoch is reproducible."""
    import mxnet as mx

    stage_id = _STAGE_IDS.get(stage)
    if stage_id is None:
        stage_id = int.from_bytes(stage.encode("utf-8"), "little") % (2**31)
    state = int(np.random.SeedSequence([int(seed), stage_id, int(epoch)]).generate_state(1)[0] % (2**31))
    random.seed(state)
    np.random.seed(state)
    mx.random.seed(state)


def named_parameters(net):
    """All Parameters of `net`, keyed by name with the network's prefix stripped.

    Gluon names carry a process-global counter (`dsonet0_...`, `dsonet1_...`): a network rebuilt on resume,
    or a second network in the same process, gets other absolute names but the same relative ones. Take
    this mapping once, on the full network, before any shrinking removes blocks from it: the checkpoint
    then keeps pruned weights too and a resumed run sees the same parameter set.
    """
    prefix = net.prefix
    named = {}
    for name, param in net.collect_params().items():
        key = name[len(prefix):] if prefix and name.startswith(prefix) else name
        named[key] = param
    return named


def _trainer_state_bytes(trainer):
    """Trainer.save_states only writes to a path: round-trip it through a temp file."""
    fd, tmp = tempfile.mkstemp(prefix="dsonas-trainer-", suffix=".states")
    os.close(fd)
    try:
        trainer.save_states(tmp)
        with open(tmp, "rb") as f:
            return f.read()
    finally:
        os.remove(tmp)


def _load_trainer_state_bytes(trainer, data):
    fd, tmp = tempfile.mkstemp(prefix="dsonas-trainer-", suffix=".states")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        trainer.load_states(tmp)
    finally:
        os.remove(tmp)


def save_checkpoint(path, params, trainers, meta):
    """Atomically write `params` (name -> Parameter), `trainers` (name -> gluon.Trainer) and `meta`."""
    arrays = {name: param.data(param.list_ctx()[0]).asnumpy() for name, param in params.items()}
    blob = {
        "version": CHECKPOINT_VERSION,
        "meta": meta,
        "params": arrays,
        "trainers": {name: _trainer_state_bytes(t) for name, t in trainers.items()},
        "rng": {"python": random.getstate(), "numpy": np.random.get_state()},
    }
    atomic_write_bytes(path, pickle.dumps(blob, protocol=pickle.HIGHEST_PROTOCOL))


def _read(path):
    try:
        with open(path, "rb") as f:
            blob = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
        raise RunFolderError(f"cannot read checkpoint {path} ({e}); start a new run with --force") from e
    if not isinstance(blob, dict) or blob.get("version") != CHECKPOINT_VERSION:
        raise RunFolderError(f"checkpoint {path} has an unknown format; start a new run with --force")
    return blob


def read_meta(path):
    """The `meta` dict of a checkpoint, or None when there is none yet (nothing to resume)."""
    if not os.path.exists(path):
        return None
    return _read(path)["meta"]


def load_checkpoint(path, params, trainers):
    """Restore `params`, `trainers` and the RNG states from `path`; returns its `meta`.

    The network must have the same parameter set and shapes (same config): anything else is a
    RunFolderError, because silently loading part of a checkpoint would not resume the same run.
    """
    import mxnet as mx

    blob = _read(path)
    saved = blob["params"]
    missing = sorted(set(params) - set(saved))
    extra = sorted(set(saved) - set(params))
    if missing or extra:
        example = (missing or extra)[0]
        raise RunFolderError(
            f"checkpoint {path} does not match the network ({len(missing)} missing, {len(extra)} unexpected "
            f"parameters, e.g. {example}); resume with the config the run started with, or use --force"
        )
    for name, param in params.items():
        if tuple(param.shape) != saved[name].shape:
            raise RunFolderError(
                f"checkpoint {path}: parameter {name} has shape {saved[name].shape}, the network "
                f"{tuple(param.shape)}; resume with the config the run started with, or use --force"
            )
        param.set_data(mx.nd.array(saved[name], dtype=saved[name].dtype))
    missing_trainers = sorted(set(trainers) - set(blob["trainers"]))
    if missing_trainers:
        raise RunFolderError(f"checkpoint {path} has no state for trainer {missing_trainers[0]!r}")
    for name, trainer in trainers.items():
        _load_trainer_state_bytes(trainer, blob["trainers"][name])
    random.setstate(blob["rng"]["python"])
    np.random.set_state(blob["rng"]["numpy"])
    return blob["meta"]
