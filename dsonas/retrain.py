"""Retrain a derived architecture from scratch with the paper's recipe, and evaluate retrained weights.

Recipe (cfg.retrain; DSO-NAS §4, after NASNet/DARTS): NAG with weight decay, a per-iteration lr schedule
(`dsonas.schedule`: SGDR warm restarts for CIFAR, linear decay for ImageNet), cutout (`data.Cutout`),
dropout before the classifier, drop-path on the blocks' op outputs grown linearly from 0 to
retrain.drop_path over the epochs (as NASNet/ENAS/DARTS schedule it; set once per epoch because the rate
is a constant of the traced graph), an auxiliary head after the second-to-last stage whose loss is added
with weight retrain.aux_weight, and label smoothing. BatchNorm scale is learnable again
(`compile_genotype`). A global width multiplier scales every stage, from the config or solved for a
FLOPs/params/latency budget (`width_for_budget`); stage widths are rounded to multiples of
retrain.channel_divisor, or of a finer divisor when that is what meets the budget.

MXNet/GluonCV pieces used as they are: `gluon.Trainer` + kvstore for several devices, the "nag"
optimizer, GluonCV's cosine/linear schedulers, `SoftmaxCrossEntropyLoss(sparse_label=False)` fed smoothed
one-hot targets (GluonCV has no label-smoothing loss: its scripts smooth inline). The epoch loop reuses
`dsonas.loop` and `dsonas.checkpoint` from the search engine, so a resumed retrain continues the schedule
exactly: the checkpoint carries the pickled optimizer (lr scheduler and update count included) and every
epoch re-seeds from (seed, "retrain", epoch).

The run folder keeps `best.params` (best test accuracy) and `last.params` (Gluon `save_parameters`
format, for `--eval-only` and export), `checkpoints/retrain.ckpt` (resume), `genotype.json`,
`metrics.jsonl` and `retrain.json` (the summary, including the width multiplier and channel divisor the
params need).
"""

import json
import os
import time
from dataclasses import dataclass, replace

import mxnet as mx
from mxnet import autograd, gluon

from dsonas import cost
from dsonas.checkpoint import load_checkpoint, named_parameters, read_meta, reseed, save_checkpoint
from dsonas.data import make_datasets, make_loaders
from dsonas.errors import BudgetError, GenotypeError, RunFolderError
from dsonas.genotype import Genotype
from dsonas.io import replacing
from dsonas.loop import (
    SYNC_EVERY,
    Meter,
    check_batch_size,
    check_finite,
    evaluate,
    make_trainer,
    progress,
    split_batch,
    trainer_optimizer,
)
from dsonas.network import CHANNEL_DIVISOR, compile_genotype, deploy_net, divisor_fits
from dsonas.schedule import make_schedule

SUMMARY = "retrain.json"
STAGE = "retrain"
LR_KEYS = ["retrain.lr_max"]
# Budget name -> (cost.solve_width metric, factor from the user's unit to that metric's unit).
BUDGETS = {"flops": ("macs", 0.5), "params": ("params", 1.0), "latency": ("latency", 1.0)}
# Finer channel divisors a budget falls back to when the configured one's width steps miss it.
FALLBACK_DIVISORS = (8, 4, 2, 1)


@dataclass
class RetrainResult:
    best_acc: float
    best_epoch: int
    last_acc: float
    params: int  # of the deployable net (no aux head)
    macs: int    # per image
    width_mult: float
    channel_divisor: int
    best_params: str
    last_params: str
    summary: dict


class SmoothedCrossEntropy(gluon.loss.Loss):
    """Cross-entropy against (1 - ε)·one_hot(y) + ε/C (label smoothing, Szegedy et al. 2016)."""

    def __init__(self, num_classes, smoothing, **kwargs):
        super().__init__(weight=None, batch_axis=0, **kwargs)
        self.num_classes = num_classes
        self.smoothing = smoothing
        self.ce = gluon.loss.SoftmaxCrossEntropyLoss(sparse_label=False)

    def hybrid_forward(self, F, pred, label):
        eps, c = self.smoothing, self.num_classes
        target = F.one_hot(label, c, on_value=1.0 - eps + eps / c, off_value=eps / c)
        return self.ce(pred, target)


def training_loss(num_classes, smoothing):
    """The training loss of the recipe: plain (sparse) cross-entropy unless label smoothing is on."""
    if smoothing > 0:
        return SmoothedCrossEntropy(num_classes, smoothing)
    return gluon.loss.SoftmaxCrossEntropyLoss()


def input_shape(genotype):
    """(1, 3, S, S): one image at the resolution the genotype was searched for."""
    size = genotype.skeleton.input_size
    return (1, 3, size, size)


def width_text(width_mult, channel_divisor):
    """How a net's width reads in logs and messages; the divisor shapes nothing at width multiplier 1."""
    text = f"width multiplier {width_mult:g}"
    return text if width_mult == 1.0 else f"{text}, channel divisor {channel_divisor}"


def budget_divisors(genotype, channel_divisor):
    """The channel divisors a budget tries, in order: the configured one, then the finer fallbacks the
    skeleton can build."""
    finer = [d for d in FALLBACK_DIVISORS if d < channel_divisor and divisor_fits(genotype.skeleton, d)]
    return (channel_divisor, *finer)


def width_for_budget(genotype, budget, target, channel_divisor=CHANNEL_DIVISOR, ctx=None):
    """The cost.WidthSolution whose deployable net meets `target` (flops, params, or latency in ms on
    `ctx`), its cost in the budget's unit; channel_divisor is tried first, then `budget_divisors`."""
    metric, factor = BUDGETS[budget]
    divisors = budget_divisors(genotype, channel_divisor)
    try:
        solution = cost.solve_width(lambda w, d: deploy_net(genotype, w, d), target * factor, divisors,
                                    metric, input_shape(genotype), ctx=ctx)
    except BudgetError as e:
        note = " (FLOPs = 2 x MACs)" if budget == "flops" else ""
        raise BudgetError(f"--target-{budget} {target:g}{note} with channel divisors "
                          f"{', '.join(map(str, divisors))}: {e}") from None
    return replace(solution, cost=solution.cost / factor)


def check_data_fits(genotype, bundle):
    """The classifier is sized by the genotype: the data must have as many classes."""
    if genotype.skeleton.num_classes != bundle.num_classes:
        raise GenotypeError(f"the genotype's classifier has {genotype.skeleton.num_classes} classes but the "
                            f"data has {bundle.num_classes}; retrain on the data it was searched on (--data)")


def load_params(net, path, ctx_list):
    """Load a `best.params`/`last.params` file into a deployable net (the aux head's weights are skipped)."""
    if not os.path.isfile(path):
        raise GenotypeError(f"params file not found: {path}; pass the best.params written by retrain")
    try:
        net.load_parameters(str(path), ctx=ctx_list, ignore_extra=True)
    except (AssertionError, mx.base.MXNetError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        width = width_text(net.width_mult, net.channel_divisor)
        raise GenotypeError(f"{path} does not fit this genotype at {width} ({first}); pass the genotype, "
                            "--width-mult and retrain.channel_divisor the params were trained with") from None


def _recorded_width(record):
    """(width_mult, channel_divisor) of a retrain.json or checkpoint record; runs from before the divisor
    was configurable rounded to multiples of 8."""
    return float(record["width_mult"]), int(record.get("channel_divisor", CHANNEL_DIVISOR))


def saved_width(params_path):
    """(width_mult, channel_divisor) recorded by retrain beside a params file, or None if there is no
    record."""
    summary = os.path.join(os.path.dirname(os.path.abspath(params_path)), SUMMARY)
    try:
        with open(summary, encoding="utf-8") as f:
            return _recorded_width(json.load(f))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def params_width(params_path, width_mult, retrain_cfg):
    """(width_mult, channel_divisor) to rebuild the net of a params file: an explicit `width_mult` with
    the config's divisor, else the pair retrain recorded beside the file, else the config's pair."""
    if width_mult is not None:
        return width_mult, retrain_cfg.channel_divisor
    return saved_width(params_path) or (retrain_cfg.width_mult, retrain_cfg.channel_divisor)


def eval_data(cfg, genotype=None):
    """(test loader, DataBundle) of the configured data, checked against `genotype` when given."""
    bundle = make_datasets(cfg.data)
    if genotype is not None:
        check_data_fits(genotype, bundle)
    return make_loaders(bundle, cfg.data, seed=cfg.seed, split=False).test, bundle


def evaluate_net(net, loader, ctx_list):
    """(loss, accuracy) on `loader`; nets built with an aux head are scored on their main logits."""
    forward = (lambda x: net(x)[0]) if getattr(net, "aux", False) else net
    return evaluate(forward, gluon.loss.SoftmaxCrossEntropyLoss(), loader, ctx_list)


def evaluate_params(cfg, genotype, params_path, width_mult, ctx_list, channel_divisor=CHANNEL_DIVISOR):
    """Test loss/accuracy and costs of retrained weights, without a run folder (`--eval-only`)."""
    loader, _ = eval_data(cfg, genotype)
    net = deploy_net(genotype, width_mult, channel_divisor)
    load_params(net, params_path, ctx_list)
    net.hybridize(static_alloc=True)
    loss, acc = evaluate_net(net, loader, ctx_list)
    report = cost.count(net, input_shape(genotype))
    return {"test_loss": loss, "test_acc": acc, "params": report.params, "macs": report.macs,
            "width_mult": width_mult, "channel_divisor": channel_divisor}


def _save_params(net, path):
    """`net.save_parameters` into a temp file then rename: a crash never leaves half a params file."""
    with replacing(path) as tmp:
        net.save_parameters(tmp)


def _train_step(net, loss_fn, aux_weight, trainer, xs, ys, meter):
    """Forward/backward on every device slice with the aux loss added; one trainer step for the batch."""
    with autograd.record():
        outputs = [net(x) for x in xs]
        logits = [out[0] if net.aux else out for out in outputs]
        losses = [loss_fn(out, y) for out, y in zip(logits, ys, strict=True)]
        if net.aux:
            losses = [loss + aux_weight * loss_fn(out[1], y) for loss, out, y in zip(losses, outputs, ys,
                                                                                    strict=True)]
    autograd.backward(losses)
    trainer.step(sum(x.shape[0] for x in xs))
    meter.update(losses, logits, ys)


def _check_genotype(run_dir, genotype):
    """A resumed run must retrain the genotype it started with; a new one records it."""
    path = run_dir.path / "genotype.json"
    if path.exists():
        if Genotype.load(path).to_dict() != genotype.to_dict():
            raise RunFolderError(f"{run_dir.path} was retraining another genotype ({path}); pass that one "
                                 f"to --resume, or start a new run with --name/--force")
    else:
        genotype.save(path)


def _train_epoch(net, loader, loss_fn, aux_weight, trainer, ctx_list, epoch, epochs, state):
    """One pass over `loader`; returns (mean loss, accuracy) of the training objective."""
    meter = Meter()
    with progress(len(loader), f"retrain {epoch + 1}/{epochs}") as bar:
        for step, batch in enumerate(loader):
            xs, ys = split_batch(batch, ctx_list)
            _train_step(net, loss_fn, aux_weight, trainer, xs, ys, meter)
            state["iteration"] += 1
            if (step + 1) % SYNC_EVERY == 0:
                loss, acc = meter.read()
                check_finite(loss, STAGE, epoch, state["iteration"], LR_KEYS)
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", lr=f"{trainer.learning_rate:.4g}",
                                refresh=False)
            bar.update(1)
    loss, acc = meter.read()
    check_finite(loss, STAGE, epoch, state["iteration"], LR_KEYS)
    return loss, acc


def retrain(cfg, genotype, run_dir, ctx_list, kvstore=None, width_mult=None, channel_divisor=None,
            resume=False, log=None):
    """Train `genotype`'s net from scratch with cfg.retrain in `run_dir` (a RunDir); returns RetrainResult.

    width_mult / channel_divisor: None = cfg.retrain's. With `resume`, continue from
    checkpoints/retrain.ckpt (the width the run started with wins). Evaluates on the test split after
    every epoch.
    """
    r = cfg.retrain
    log = log or run_dir.log
    ckpt = run_dir.checkpoint_path(STAGE)
    meta = read_meta(ckpt) if resume else None
    if meta:
        width_mult, channel_divisor = _recorded_width(meta)
    else:
        width_mult = r.width_mult if width_mult is None else width_mult
        channel_divisor = r.channel_divisor if channel_divisor is None else channel_divisor
    check_batch_size(r.batch_size, ctx_list, "retrain.batch_size")
    _check_genotype(run_dir, genotype)

    bundle = make_datasets(cfg.data)
    check_data_fits(genotype, bundle)
    loaders = make_loaders(bundle, replace(cfg.data, batch_size=r.batch_size, cutout=r.cutout),
                           seed=cfg.seed, split=False)
    reseed(cfg.seed, "init", 0)
    net = compile_genotype(genotype, width_mult=width_mult, dropout=r.dropout, aux=r.aux_weight > 0,
                           channel_divisor=channel_divisor)
    # He init on fan-in: the merge 1x1 conv reads M*N*C channels into C, so fan-out scaling would grow
    # activations ~sqrt(M*N) per block (initial logits std ~10 on the default genotype, loss 7.7).
    net.initialize(mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2), ctx=ctx_list)
    # static_alloc only: with static_shape too, mxnet 1.9.1 + oneDNN computes wrong gradients on these
    # graphs (bench/README.md, "Correctness warning").
    net.hybridize(static_alloc=True)
    params = named_parameters(net)
    deployed = cost.count(deploy_net(genotype, width_mult, channel_divisor), input_shape(genotype))
    trainer = make_trainer(list(net.collect_params().values()), "nag",
                           {"lr_scheduler": make_schedule(r, len(loaders.train)), "momentum": r.momentum,
                            "wd": r.wd}, kvstore=kvstore or cfg.runtime.kvstore)
    loss_fn = training_loss(bundle.num_classes, r.label_smoothing)

    state = {"epoch": 0, "iteration": 0, "best_acc": -1.0, "best_epoch": 0, "last_acc": float("nan"),
             "width_mult": width_mult, "channel_divisor": channel_divisor}
    if meta:
        state.update(load_checkpoint(ckpt, params, {"w": trainer}))
        # The restored optimizer carries the schedule it was pickled with; a resume that extends
        # retrain.epochs must follow the new one (same config: the same lr at every update count).
        trainer_optimizer(trainer).lr_scheduler = make_schedule(r, len(loaders.train))
        log(f"retrain: resuming after epoch {state['epoch']}/{r.epochs} at "
            f"{width_text(width_mult, channel_divisor)}")
    else:
        log(f"retrain: {deployed.params / 1e6:.3f}M params, {deployed.macs / 1e6:.2f}M MACs at "
            f"{width_text(width_mult, channel_divisor)}, {r.epochs} epochs of {len(loaders.train)} "
            "iterations")
    best_path, last_path = run_dir.path / "best.params", run_dir.path / "last.params"

    def write_summary():
        """retrain.json, rewritten every epoch: it always describes the params files beside it."""
        summary = {
            "genotype": str(run_dir.path / "genotype.json"), "width_mult": width_mult,
            "channel_divisor": channel_divisor, "epochs_done": state["epoch"], "epochs": r.epochs,
            "best_acc": state["best_acc"], "best_epoch": state["best_epoch"], "last_acc": state["last_acc"],
            "params": deployed.params, "macs": deployed.macs, "flops": deployed.flops,
            "input_shape": list(input_shape(genotype)), "best_params": str(best_path),
            "last_params": str(last_path)}
        run_dir.save_json(SUMMARY, summary)
        return summary

    write_summary()
    for epoch in range(state["epoch"], r.epochs):
        reseed(cfg.seed, STAGE, epoch)
        began = time.perf_counter()
        drop_path = r.drop_path * epoch / r.epochs
        if r.drop_path > 0:
            net.set_drop_path(drop_path)
        train_loss, train_acc = _train_epoch(net, loaders.train, loss_fn, r.aux_weight, trainer, ctx_list,
                                             epoch, r.epochs, state)
        test_loss, test_acc = evaluate_net(net, loaders.test, ctx_list)
        state.update(epoch=epoch + 1, last_acc=test_acc)
        if test_acc > state["best_acc"]:
            state.update(best_acc=test_acc, best_epoch=epoch + 1)
            _save_params(net, best_path)
        _save_params(net, last_path)
        save_checkpoint(ckpt, params, {"w": trainer}, {"stage": STAGE, **state})
        write_summary()
        seconds = time.perf_counter() - began
        run_dir.write_metrics({
            "stage": STAGE, "epoch": epoch + 1, "epochs": r.epochs, "iteration": state["iteration"],
            "lr": trainer.learning_rate, "drop_path": drop_path, "train_loss": train_loss,
            "train_acc": train_acc, "test_loss": test_loss, "test_acc": test_acc,
            "best_acc": state["best_acc"], "epoch_time": round(seconds, 3)})
        log(f"retrain epoch {epoch + 1}/{r.epochs}: train loss {train_loss:.4f} acc {train_acc:.4f} | test "
            f"loss {test_loss:.4f} acc {test_acc:.4f} | best {state['best_acc']:.4f} (epoch "
            f"{state['best_epoch']}) | lr {trainer.learning_rate:.4g} | {seconds:.1f} s")

    summary = write_summary()
    return RetrainResult(best_acc=state["best_acc"], best_epoch=state["best_epoch"],
                         last_acc=state["last_acc"], params=deployed.params, macs=deployed.macs,
                         width_mult=width_mult, channel_divisor=channel_divisor, best_params=str(best_path),
                         last_params=str(last_path), summary=summary)
