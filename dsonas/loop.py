"""Building blocks shared by every training loop (pretrain, search, retrain).

Multi-device from the start: a batch is split across the context list with `gluon.utils.split_and_load`,
each device runs forward/backward on its slice, and the Trainer aggregates gradients through its kvstore.
Running sums (loss, correct predictions) stay on the devices and are only read back every few steps,
so MXNet's asynchronous engine is not forced to wait after every step.
"""

import math
import sys

from dsonas.errors import ConfigError, TrainingError

# Read the on-device metrics back (sync point, NaN check, progress-bar postfix) every this many steps.
SYNC_EVERY = 10


def make_trainer(params, optimizer, optimizer_params, kvstore="device", update_on_kvstore=None):
    """A gluon.Trainer over `params` (a list of Parameters) aggregating through `kvstore`.

    Custom optimizers (APG-NAG) must pass update_on_kvstore=False: a kvstore server cannot unpickle
    them, and the update then has to run on the workers after aggregation.
    """
    from mxnet import gluon

    return gluon.Trainer(params, optimizer, optimizer_params, kvstore=kvstore,
                         update_on_kvstore=update_on_kvstore)


def trainer_optimizer(trainer):
    """The live optimizer of a Trainer (it is replaced by `load_states`, so never cache it)."""
    return trainer._optimizer


def split_batch(batch, ctx_list):
    """Split an (x, y) batch along axis 0 over `ctx_list` -> (xs, ys), one slice per device."""
    from mxnet import gluon

    x, y = batch
    even = x.shape[0] % len(ctx_list) == 0
    return (gluon.utils.split_and_load(x, ctx_list, even_split=even),
            gluon.utils.split_and_load(y, ctx_list, even_split=even))


def check_batch_size(batch_size, ctx_list, key):
    """Training batches are split evenly so every device keeps one static shape."""
    if batch_size % len(ctx_list):
        raise ConfigError(f"{key}={batch_size} is not divisible by the {len(ctx_list)} devices; "
                          f"use a multiple of {len(ctx_list)}")


class Meter:
    """Sums of loss, correct predictions and samples, kept on each device until `read`."""

    def __init__(self):
        self._loss = []
        self._correct = []
        self.count = 0

    def update(self, losses, outputs, labels):
        for i, (loss, out, y) in enumerate(zip(losses, outputs, labels, strict=True)):
            l_sum = loss.sum()
            c_sum = (out.argmax(axis=1) == y.astype(out.dtype)).sum()
            if i < len(self._loss):
                self._loss[i] = self._loss[i] + l_sum
                self._correct[i] = self._correct[i] + c_sum
            else:
                self._loss.append(l_sum)
                self._correct.append(c_sum)
            self.count += y.shape[0]

    def read(self):
        """(mean loss, accuracy) as floats; (nan, nan) before the first update."""
        if not self.count:
            return math.nan, math.nan
        loss = sum(float(v.asscalar()) for v in self._loss)
        correct = sum(float(v.asscalar()) for v in self._correct)
        return loss / self.count, correct / self.count


def check_finite(loss, stage, epoch, iteration, lr_keys):
    """NaN/inf loss -> TrainingError; the last checkpoint (previous epoch) is left untouched."""
    if not math.isfinite(loss):
        raise TrainingError(
            f"{stage} diverged: loss is {loss} in epoch {epoch + 1} (iteration {iteration}); "
            f"lower the learning rate ({', '.join(lr_keys)}) and resume or restart the run"
        )


def train_step(net, loss_fn, trainer, xs, ys, meter, ignore_stale_grad=False):
    """Forward/backward on every device slice, one trainer step for the whole batch.

    A net in recompute mode (DsoNet.set_recompute) runs its segments through dsonas.recompute instead.
    """
    from mxnet import autograd

    from dsonas import recompute

    if getattr(net, "recompute", False):
        outputs, losses = recompute.forward_backward(net, loss_fn, xs, ys)
    else:
        with autograd.record():
            outputs = [net(x) for x in xs]
            losses = [loss_fn(out, y) for out, y in zip(outputs, ys, strict=True)]
        autograd.backward(losses)
    trainer.step(sum(x.shape[0] for x in xs), ignore_stale_grad=ignore_stale_grad)
    meter.update(losses, outputs, ys)


def evaluate(net, loss_fn, loader, ctx_list):
    """(mean loss, accuracy) of `net` in inference mode over `loader`."""
    meter = Meter()
    for batch in loader:
        xs, ys = split_batch(batch, ctx_list)
        outputs = [net(x) for x in xs]
        meter.update([loss_fn(out, y) for out, y in zip(outputs, ys, strict=True)], outputs, ys)
    return meter.read()


def progress(total, desc):
    """A tqdm bar on stderr: live refresh on a terminal, a sparse line every 30 s in CI logs."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=interactive,
                mininterval=0.5 if interactive else 30.0, ascii=not interactive)
