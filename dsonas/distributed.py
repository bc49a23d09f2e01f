"""Scale out through MXNet's own kvstore: several devices in one process, or several worker processes.

`Cluster` is what the training loops need to know about it:

* `trainer(...)`: a gluon.Trainer aggregating through the run's kvstore. In a `dist_*` kvstore every
  Trainer runs its optimizer on the workers after aggregation (update_on_kvstore=False): APG-NAG is a
  custom optimizer that a kvstore server cannot unpickle (the server then silently stores the summed
  gradients instead of updated values), and running NAG locally too keeps W and λ updates identical to a
  single-process run. Every worker applies the same update to the same values, so all hold the same λ
  and derive the same genotype. Gradients are summed over workers, so `rescale_grad = 1 / num_workers`
  turns the per-worker `trainer.step(local batch)` into the mean over the global batch.
* One `dist` kvstore per process, shared by all Trainers: a second `mx.kv.create("dist_sync")` in the same
  process never initialises its keys on the servers (MXNet only lets the first customer push initial
  values), and every Trainer numbers its keys from 0. Each Trainer therefore gets a view of the shared
  store with its own key range (`_KeyRange`).
* `start(trainers)`: initialise the Trainers' kvstore keys (rank 0's values are broadcast) and meet at a
  barrier before step 1, so no worker's first weight pull can race another worker's first gradient push.
* `shard(loaders)`: worker r trains on rows [r*b, (r+1)*b) of every global batch (b = batch / workers).
  Every worker draws the same shuffles and augmentations (the loops reseed per epoch), so the shards are
  deterministic and disjoint, their union is exactly the batch a single process would see, and a
  `dist_sync` run with N workers equals a one-process run with N contexts (same per-slice BatchNorm
  statistics). The price: each worker decodes the whole global batch, fine for in-memory sources.
* `is_writer`: only rank 0 writes checkpoints, metrics, reports and the genotype. Resuming needs rank 0's
  run folder readable by every worker (a shared file system across machines).
"""

from dataclasses import dataclass, field

import mxnet as mx

from dsonas.errors import ConfigError
from dsonas.loop import make_trainer

# Keys of one Trainer on a shared dist kvstore: trainer k uses [k * KEY_RANGE, (k + 1) * KEY_RANGE).
KEY_RANGE = 100_000


class _KeyRange(mx.kv.KVStore):
    """A view of a shared KVStore whose integer keys are shifted by `offset` (one range per Trainer)."""

    def __init__(self, base, offset):
        super().__init__(base.handle)
        self._base = base  # the owner frees the handle; keep it alive as long as this view
        self._offset = offset

    def __del__(self):  # the handle belongs to `base`
        pass

    def _shift(self, key):
        if isinstance(key, (list, tuple)):
            return [self._shift(k) for k in key]
        if not isinstance(key, int):
            raise TypeError(f"dsonas kvstore views take integer keys, got {key!r}")
        return key + self._offset

    def init(self, key, value):
        super().init(self._shift(key), value)

    def push(self, key, value, priority=0):
        super().push(self._shift(key), value, priority)

    def pull(self, key, out=None, priority=0, ignore_sparse=True):
        super().pull(self._shift(key), out, priority, ignore_sparse)

    def pushpull(self, key, value, out=None, priority=0):
        super().pushpull(self._shift(key), value, out, priority)

    def broadcast(self, key, value, out, priority=0):
        super().broadcast(self._shift(key), value, out, priority)

    def row_sparse_pull(self, key, out=None, priority=0, row_ids=None):
        super().row_sparse_pull(self._shift(key), out, priority, row_ids)


class ShardedLoader:
    """Rows [rank*b, (rank+1)*b) of every batch of `loader` (b = batch / num_workers); same length."""

    def __init__(self, loader, rank, num_workers):
        self.loader, self.rank, self.num_workers = loader, rank, num_workers

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            b = x.shape[0] // self.num_workers
            lo = self.rank * b
            yield x[lo:lo + b], y[lo:lo + b]


@dataclass
class Cluster:
    """The run's kvstore kind and, for dist kinds, this worker's place in the cluster."""

    kind: str
    kv: object = None  # the process's one dist KVStore; None for device/local (each Trainer makes its own)
    rank: int = 0
    num_workers: int = 1
    _trainers: int = field(default=0, repr=False)

    @property
    def distributed(self):
        return self.kv is not None

    @property
    def is_writer(self):
        """Only rank 0 writes checkpoints, metrics, reports and the genotype."""
        return self.rank == 0

    def trainer(self, params, optimizer, optimizer_params, update_on_kvstore=None):
        """A gluon.Trainer over `params` on this cluster (see the module docstring)."""
        if not self.distributed:
            return make_trainer(params, optimizer, optimizer_params, kvstore=self.kind,
                                update_on_kvstore=update_on_kvstore)
        view = _KeyRange(self.kv, self._trainers * KEY_RANGE)
        self._trainers += 1
        return make_trainer(params, optimizer, {**optimizer_params, "rescale_grad": 1.0 / self.num_workers},
                            kvstore=view, update_on_kvstore=False)

    def start(self, trainers):
        """Initialise the Trainers' kvstore keys and meet every worker at a barrier (dist kinds only)."""
        if not self.distributed:
            return
        for trainer in trainers:
            if not trainer._kv_initialized:
                trainer._init_kvstore()
            if trainer._params_to_init:
                trainer._init_params()
        mx.nd.waitall()
        self.kv._barrier()

    def shard(self, loader):
        """This worker's shard of a training loader (the loader itself outside a dist kvstore)."""
        if loader is None or self.num_workers == 1:
            return loader
        return ShardedLoader(loader, self.rank, self.num_workers)

    def check_batch_size(self, batch_size, n_ctx, key):
        if batch_size % (self.num_workers * n_ctx):
            raise ConfigError(f"{key}={batch_size} is not divisible by {self.num_workers} workers x {n_ctx} "
                              f"devices; use a multiple of {self.num_workers * n_ctx}")


def connect(kind):
    """The Cluster of kvstore `kind`; a `dist_*` kind joins the cluster described by the DMLC_* env."""
    if not kind.startswith("dist"):
        return Cluster(kind=kind)
    kv = mx.kv.create(kind)
    return Cluster(kind=kind, kv=kv, rank=kv.rank, num_workers=kv.num_workers)


class ReaderRun:
    """Rank > 0's view of rank 0's run folder: reads checkpoints (resume), writes nothing, logs with rank."""

    def __init__(self, path, rank):
        import logging

        from dsonas.runs import RunDir

        self._run = RunDir(path)
        self.path = self._run.path
        self.rank = rank
        self._logger = logging.getLogger("dsonas")

    def checkpoint_path(self, stage):
        return self._run.checkpoint_path(stage)

    def log(self, msg):
        self._logger.info("[worker %d] %s", self.rank, msg)

    def write_metrics(self, record):
        pass

    def save_json(self, name, obj):
        return self.path / name
