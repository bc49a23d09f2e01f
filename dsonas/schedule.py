"""Learning-rate schedules for retraining, as MXNet `LRScheduler`s driven per iteration.

MXNet calls a scheduler with `num_update`, the 1-based count of the update about to be applied, so the
first step of training sees `num_update == 1`. Every schedule here maps that to *epochs done so far*,
`(num_update - 1) / iters_per_epoch`, so "lr at epoch 0" is the lr of the very first step and a restart
at epoch 10 happens exactly on the first step of epoch 10.

GluonCV's `gluoncv.utils.LRScheduler` already has cosine, linear and constant decay; we use it for those
(with `offset=1` for the 1-based count) and only write what it lacks: SGDR cosine with warm restarts
(Loshchilov & Hutter), the DSO-NAS CIFAR recipe. Schedulers are pickled with the optimizer by
`Trainer.save_states`, which is what makes a resumed run continue the schedule exactly.
"""

import math

import mxnet as mx
from gluoncv.utils import LRScheduler as GluonCVScheduler

from .errors import ConfigError

SCHEDULES = ("cosine_restarts", "cosine", "linear", "constant")


class SGDRScheduler(mx.lr_scheduler.LRScheduler):
    """Cosine annealing from `base_lr` (lr_max) to `lr_min` over cycles of T0, T0*Tmul, T0*Tmul^2... epochs.

    The cosine is evaluated at the fractional epoch of every iteration, so the lr falls smoothly inside an
    epoch and jumps back to lr_max on the first iteration of each new cycle.
    """

    def __init__(self, lr_max, lr_min, t0, tmul, iters_per_epoch):
        if t0 <= 0 or tmul < 1 or iters_per_epoch <= 0 or lr_min > lr_max:
            raise ValueError(f"bad SGDR parameters: t0={t0} tmul={tmul} iters_per_epoch={iters_per_epoch} "
                             f"lr_min={lr_min} lr_max={lr_max}")
        super().__init__(base_lr=lr_max)
        self.lr_min = lr_min
        self.t0 = t0
        self.tmul = tmul
        self.iters_per_epoch = iters_per_epoch

    def cycle_position(self, epoch):
        """(epochs into the current cycle, length of the current cycle) at fractional `epoch`."""
        t, length = epoch, float(self.t0)
        while t >= length:
            t -= length
            length *= self.tmul
        return t, length

    def lr_at(self, epoch):
        t, length = self.cycle_position(epoch)
        return self.lr_min + 0.5 * (self.base_lr - self.lr_min) * (1.0 + math.cos(math.pi * t / length))

    def __call__(self, num_update):
        return self.lr_at(max(num_update - 1, 0) / self.iters_per_epoch)


def make_schedule(retrain_cfg, iters_per_epoch):
    """The lr schedule named by `retrain_cfg.schedule`, stepping per iteration.

    cosine_restarts: SGDR lr_max -> lr_min, cycles t0, t0*tmul, ... epochs (DSO-NAS CIFAR recipe).
    cosine:          one cosine lr_max -> lr_min over all `epochs`.
    linear:          lr_max -> lr_min linearly over all `epochs` (ImageNet recipe; set lr_min 0 there).
    constant:        lr_max throughout.
    The last iteration of cosine/linear reaches lr_min exactly.
    """
    c = retrain_cfg
    if c.schedule == "cosine_restarts":
        return SGDRScheduler(c.lr_max, c.lr_min, c.t0, c.tmul, iters_per_epoch)
    if c.schedule in ("cosine", "linear", "constant"):
        # GluonCV divides by (iterations - 1): a one-iteration run can only be constant.
        mode = c.schedule if c.epochs * iters_per_epoch > 1 else "constant"
        return GluonCVScheduler(mode, base_lr=c.lr_max, target_lr=c.lr_min, nepochs=c.epochs,
                                iters_per_epoch=iters_per_epoch, offset=1)
    raise ConfigError(f"retrain.schedule={c.schedule!r} is unknown: use one of {', '.join(SCHEDULES)}")
