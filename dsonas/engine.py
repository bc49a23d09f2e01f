"""The DSO-NAS search pipeline over a run folder: pretrain -> search -> derive (paper §3.3, §4.1).

1. `pretrain`: the fully connected supernet's weights W alone (NAG with weight decay), λ held at 1, on the
   W part of the training set (the whole set when search.split is false). BatchNorm's scale is fixed to 1
   (`build_supernet`) so BN cannot undo λ later.
2. `search`: W steps (NAG) on W batches and λ steps (APG-NAG, `dsonas.optim`) on λ batches, x W steps then
   y λ steps per cycle (search.ratio = [x, y]); an epoch is one pass over the W batches, the λ batches
   are drawn round-robin from their own loader. Two Trainers over disjoint parameter sets; each step
   computes only its own set's gradients (`DsoNet.set_trained`), pretrain only W's. γ per λ comes
   from `dsonas.penalty` (recomputed every search.penalty_every iterations for the adaptive kinds, on the
   mask the current λ imply). At every prune point (search.prune_every iterations, 0 = end of each epoch)
   the live masks are derived from λ; removed λ entries are set to 0 and frozen in APG-NAG, and with
   search.shrink the network is rebuilt on the live masks (same Parameters, same Trainers: pruned
   Parameters get grad_req 'null' and the Trainers skip them), so dead ops stop costing time.
3. `derive`: the genotype of the final λ (edges with λ == 0 dropped, then ops without input or path to the
   output), written to <run>/genotype.json with the final λ values, plus a summary.

An "iteration" is one optimizer step of either kind (the paper's "x + y iterations" per cycle).

Every epoch of every stage ends with a checkpoint (`dsonas.checkpoint`: weights incl. λ and BN statistics,
both Trainers' states, RNG states, stage, epoch, iteration, masks) and one metrics.jsonl record; resuming
continues with the first epoch not checkpointed and, with data.num_workers 0 on the same devices, ends
with exactly the λ and genotype of an uninterrupted run. A NaN/inf loss raises TrainingError before the
epoch's checkpoint is written, so the previous one stays valid.
"""

import dataclasses
import itertools
import time
from dataclasses import dataclass

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from mxnet.gluon import nn

from dsonas import cost, distributed, optim, recompute  # noqa: F401  (optim registers the "apgnag" optimizer)
from dsonas.checkpoint import load_checkpoint, named_parameters, reseed, save_checkpoint
from dsonas.data import make_datasets, make_loaders
from dsonas.genotype import BlockMask, Genotype, derive_mask
from dsonas.loop import (
    SYNC_EVERY,
    Meter,
    check_batch_size,
    check_finite,
    evaluate,
    progress,
    split_batch,
    train_step,
    trainer_optimizer,
)
from dsonas.network import blocks_of, build_supernet, compile_genotype
from dsonas.penalty import COST_METRIC, make_penalty


@dataclass
class Session:
    """What every stage of one search run shares: config, devices, data, the supernet."""

    cfg: object
    ctx: list
    kvstore: str
    loaders: object
    net: object
    params: dict       # relative name -> Parameter, taken on the full supernet (see named_parameters)
    input_shape: tuple  # (1, 3, H, W), for cost counting
    log: object        # callable(str)
    loss_fn: object
    twin: object = None  # inference-only copy of the supernet, see evaluate_twin
    dist: object = None  # dsonas.distributed.Cluster: kvstore, rank, sharding, who writes

    @property
    def spec(self):
        return self.net.spec

    @property
    def w_loader(self):
        """W batches: the W part of the training set, or all of it when search.split is false."""
        return self.loaders.w if self.cfg.search.split else self.loaders.train

    @property
    def lam_loader(self):
        return self.loaders.lam if self.cfg.search.split else self.loaders.train


@dataclass
class SearchState:
    """Where the search is: epochs done, iterations done, the live mask of every block."""

    epoch: int
    iteration: int
    masks: list


@dataclass
class SearchResult:
    genotype: Genotype
    path: object
    summary: dict


def contexts(names):
    """["cpu", "gpu(0)", ...] (config runtime.ctx) -> list of mx.Context."""
    out = []
    for name in names:
        kind, _, rest = name.partition("(")
        out.append(mx.Context(kind, int(rest.rstrip(")")) if rest else 0))
    return out


def prepare(cfg, ctx_list, kvstore, log=print, cluster=None):
    """Data, loaders and the initialized, hybridized supernet of `cfg` on `ctx_list`."""
    cluster = cluster or distributed.connect(kvstore)
    check_batch_size(cfg.data.batch_size, ctx_list, "data.batch_size")
    cluster.check_batch_size(cfg.data.batch_size, len(ctx_list), "data.batch_size")
    reseed(cfg.seed, "init", 0)
    bundle = make_datasets(cfg.data)
    loaders = make_loaders(bundle, cfg.data, seed=cfg.seed, split=cfg.search.split)
    loaders = dataclasses.replace(loaders, w=cluster.shard(loaders.w), lam=cluster.shard(loaders.lam),
                                  train=cluster.shard(loaders.train))
    net = build_supernet(cfg.space, cfg.skeleton, bundle.num_classes, bundle.input_size)
    # He init on the fan-in: the merge 1x1 conv reads 16 concatenated ops (fan-in 16C, fan-out C), so a
    # fan-out init makes every block multiply the residual stream (measured at 2 blocks per stage: block
    # output std 4.5 after the first block, first-batch loss 26; fan-in: std 1.35, loss 2.9).
    net.initialize(mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2), ctx=ctx_list)
    params = named_parameters(net)
    net.set_recompute(cfg.runtime.recompute)
    _hybridize(net)
    return Session(cfg=cfg, ctx=list(ctx_list), kvstore=kvstore, loaders=loaders, net=net, params=params,
                   input_shape=(1, 3, bundle.input_size, bundle.input_size), log=log,
                   loss_fn=gluon.loss.SoftmaxCrossEntropyLoss(), dist=cluster)


# ---------------------------------------------------------------------------------------------- helpers


def _hybridize(net):
    """static_alloc, never static_shape: with static_shape=True as well, mxnet 1.9.1 + oneDNN computes wrong
    gradients on this graph (bench/README.md); static_alloc alone matches imperative gradients and is as
    fast. In recompute mode a plain hybridize: the segments run their own graphs (dsonas.recompute), and
    static buffers for the whole net would stay allocated beside them."""
    net.hybridize(static_alloc=not net.recompute)


def _w_trainer(s, stage_cfg):
    return s.dist.trainer(s.net.weight_params(), "nag",
                          {"learning_rate": stage_cfg.lr, "momentum": stage_cfg.momentum, "wd": stage_cfg.wd})


def _warmup(trainer, base_lr, step, steps):
    """Linear learning-rate warm-up of W over the first epoch trained from scratch.

    Measured (digits, 4 levels, 2 blocks per stage, lr 0.1, He fan-in init): without it the fully connected
    supernet blows up in its first steps (batch losses 3.9, 5.4, 20, 36: the merge 1x1 conv, fed by 16
    concatenated ops, gets the largest gradients) and then sits at a constant output (loss 2.30) for the
    rest of pretraining. Ramping the rate over one epoch avoids that; afterwards the configured rate applies.
    """
    trainer.set_learning_rate(base_lr * min(1.0, (step + 1) / steps))


def _lam_trainer(s):
    c = s.cfg.search
    return s.dist.trainer(s.net.lambda_params(), "apgnag",
                          {"learning_rate": c.lambda_lr, "momentum": c.lambda_momentum, "gamma": c.gamma},
                          update_on_kvstore=False)


def _derive(s, masks):
    """Live masks implied by the current λ, never reviving what `masks` already removed."""
    lambdas = s.net.lambdas_numpy()
    limit = s.cfg.search.max_inputs_per_op
    if s.net.shared:
        mask = derive_mask(s.spec, lambdas[0], limit, prev_mask=masks[0])
        return [mask] * len(masks)
    return [derive_mask(s.spec, lam, limit, prev_mask=m) for lam, m in zip(lambdas, masks, strict=True)]


def _alive_entries(spec, mask):
    """{λ key: bool array}: True where the λ entry is an edge of `mask`."""
    alive = {}
    for key, shape in spec.lambda_shapes().items():
        arr = np.zeros(shape, dtype=bool)
        if key == "out":
            arr[list(mask.outputs)] = True
        else:
            for row, slot in enumerate(spec.level_slots(int(key[2:]))):
                arr[row, list(mask.inputs[slot])] = True
        alive[key] = arr
    return alive


def _per_lambda_param(s, per_block, combine):
    """Per-block {key: array} -> {λ Parameter name: array}, combining blocks that share a Parameter."""
    grouped = {}
    for b, values in enumerate(per_block):
        for key, name in s.net.block_lambda_names(b).items():
            grouped.setdefault(name, []).append(values[key])
    return {name: combine(arrays) for name, arrays in grouped.items()}


def _apply_masks(s, masks, lam_trainer):
    """Zero and freeze the λ entries outside `masks`; with search.shrink, rebuild the graph on them."""
    alive = _per_lambda_param(s, [_alive_entries(s.spec, m) for m in masks], np.logical_or.reduce)
    opt = trainer_optimizer(lam_trainer)
    for index, param in enumerate(s.net.lambda_params()):
        keep = alive[param.name]
        opt.set_frozen(index, ~keep)
        if not keep.all():
            param.set_data(param.data(s.ctx[0]) * mx.nd.array(keep, ctx=s.ctx[0]))
    if s.cfg.search.shrink and masks != s.net.masks:
        s.net.set_masks(masks)  # clears the cached graph; the next call re-traces with the same flags


def _penalty(s):
    """The γ source of search.penalty, with the per-op-slot costs of every block for the adaptive kinds."""
    c = s.cfg.search
    if c.penalty == "none":
        return make_penalty("none", c.gamma, shared=s.net.shared)
    table = cost.LatencyTable(ctx=s.ctx[0]) if c.penalty == "latency" else None
    costs = cost.network_slot_costs(s.net, COST_METRIC[c.penalty], s.input_shape, latency_table=table)
    if table is not None:
        table.save()
    return make_penalty(c.penalty, c.gamma, costs=costs, shared=s.net.shared)


def _apply_gamma(s, penalty, masks, lam_trainer):
    """Hand the penalty's γ (for the mask the current λ imply) to APG-NAG, one array per λ Parameter."""
    current = _derive(s, masks)
    gammas = _per_lambda_param(s, penalty.gammas(current, s.net.lambdas_numpy()), lambda a: a[0])
    opt = trainer_optimizer(lam_trainer)
    for index, param in enumerate(s.net.lambda_params()):
        opt.set_gamma(index, gammas[param.name])


# Batches of the W part whose statistics replace the twin's BN running statistics before an evaluation.
BN_RECALIBRATION_BATCHES = 5


def recalibrate_bn(net, loader, ctx_list, batches=BN_RECALIBRATION_BATCHES):
    """Set the running statistics of every BN of `net` to their mean over `batches` batches of `loader`.

    The supernet's running statistics (momentum 0.9, ~10 steps) lag behind λ: an op whose input edges
    shrink from 0.07 to 0.03 within a few APG-NAG steps sees a 4x smaller input variance than its running
    estimate. Measured on the default search (γ 0.04, sparsity 0.82): eval-mode accuracy 0.10 on both the
    λ part and the test set against 0.98 with batch statistics; with recalibrated statistics eval mode
    agrees again. `net` must be built with BN momentum 0 (`evaluate_twin`), so that after a batch its
    running statistics are that batch's. MXNet updates them in BatchNorm's backward pass, so each batch
    runs forward and backward with respect to the input only (`net`'s Parameters need no gradient).
    """
    stats = [p for bn in blocks_of(net, nn.BatchNorm) for p in (bn.running_mean, bn.running_var)]
    sums, count = {}, 0
    for batch in itertools.islice(loader, batches):
        xs, _ = split_batch(batch, ctx_list)
        if getattr(net, "recompute", False):  # one segment's graph at a time
            for x in xs:
                recompute.bn_statistics_pass(net, x)
        else:
            for x in xs:
                x.attach_grad()
            with autograd.record():
                outputs = [net(x) for x in xs]
            autograd.backward(outputs)
        for p in stats:
            for data in p.list_data():
                total = data.as_in_context(ctx_list[0])
                sums[p.name] = sums[p.name] + total if p.name in sums else total.copy()
        count += len(xs)
    if count:
        for p in stats:
            p.set_data(sums[p.name] / count)


def evaluate_twin(s, loader):
    """(loss, accuracy) of the current weights in inference mode, computed on a twin of the supernet.

    Measured on MXNet 1.9 (CPU, oneDNN): calling the hybridized training graph once in inference mode
    changes the floating-point rounding of every training step after it (differences of ~1e-6 that the
    soft threshold amplifies into other zeros). A run resumed from a checkpoint never made that call, so
    it would drift from an uninterrupted one. The twin (same masks, weights copied in) keeps the training
    graph's history identical in both. Zero-initialised: building it must not consume random numbers.
    Its BN running statistics are recalibrated on W batches first (`recalibrate_bn`); the supernet's own
    are left as training made them.
    """
    if s.twin is None:
        s.twin = build_supernet(s.cfg.space, s.cfg.skeleton, s.net.skeleton.num_classes, s.input_shape[2])
        s.twin.initialize(mx.init.Zero(), ctx=s.ctx)
        for bn in blocks_of(s.twin, nn.BatchNorm):
            bn._kwargs["momentum"] = 0.0  # running statistics := the last batch's (Gluon has no setter)
        for param in s.twin.collect_params().values():
            param.grad_req = "null"
        s.twin.set_recompute(s.net.recompute)
        # Not static_shape either: with it, the recalibration's backward pass leaves the BN statistics such
        # that inference is wrong (accuracy 0.11 where the same batch in training mode and the
        # unhybridized twin give 0.98, measured on MXNet 1.9.1).
        _hybridize(s.twin)
    if s.twin.masks != s.net.masks:
        s.twin.set_masks(s.net.masks)
    twin_params = named_parameters(s.twin)
    for name, param in s.params.items():
        twin_params[name].set_data(param.data(s.ctx[0]))
    recalibrate_bn(s.twin, s.w_loader, s.ctx)
    return evaluate(s.twin, s.loss_fn, loader, s.ctx)


def sparsity(s):
    """Fraction of all λ entries (live and pruned) that are exactly 0."""
    zeros = total = 0
    for param in s.net.lambda_params():
        data = param.data(s.ctx[0])
        zeros += float((data == 0).sum().asscalar())
        total += data.size
    return zeros / total if total else 0.0


def genotype_of(s, masks, with_lambdas=True):
    """The Genotype of `masks` (one shared mask for a share net), optionally with the current λ."""
    lambdas = s.net.lambdas_numpy() if with_lambdas else None
    if s.net.shared:
        masks = masks[:1]
        lambdas = lambdas[:1] if lambdas is not None else None
    return Genotype(skeleton=s.net.skeleton, spec=s.spec, shared=s.net.shared, masks=list(masks),
                    lambdas=lambdas, bypass=s.net.bypass, cell_bn=s.net.cell_bn)


class _DerivedCost:
    """Params and MACs of the derived net of a set of masks, and MACs per block, counted once per masks."""

    def __init__(self):
        self._cache = {}

    def __call__(self, s, masks):
        key = tuple(masks)
        if key not in self._cache:
            report = cost.count(compile_genotype(genotype_of(s, masks, with_lambdas=False)), s.input_shape)
            blocks = cost.network_block_costs(s.net, masks=list(masks), input_shape=s.input_shape)["macs"]
            self._cache[key] = {"derived_params": report.params, "derived_macs": report.macs,
                                "block_macs": blocks.tolist()}
        return self._cache[key]


def _human(n):
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _live_ops_text(live_ops, n_slots):
    if len(set(live_ops)) == 1:
        return f"{live_ops[0]}/{n_slots} per block"
    return f"{'/'.join(map(str, live_ops))} of {n_slots}"


def _record(s, run_dir, stage, epoch, epochs, iteration, w, lam, masks, derived_cost, seconds):
    """One metrics.jsonl record and one log line at the end of an epoch.

    Besides the scalars, the record keeps the λ values (one dict per λ set, as in genotype.json) and the
    live MACs of every block, so reports can draw λ trajectories and the per-block FLOPs (Fig. 5a).
    """
    costs = derived_cost(s, masks)
    live_ops = [len(m.live_slots()) for m in masks]
    lambdas = s.net.lambdas_numpy()
    rec = {"stage": stage, "epoch": epoch + 1, "epochs": epochs, "iteration": iteration,
           "w_loss": w[0], "w_acc": w[1], "lam_loss": lam[0], "lam_acc": lam[1],
           "sparsity": sparsity(s), "live_ops": live_ops, **costs, "epoch_time": round(seconds, 3),
           "lambdas": lambdas[:1] if s.net.shared else lambdas}
    run_dir.write_metrics(rec)
    s.log(f"{stage} epoch {epoch + 1}/{epochs}: W loss {w[0]:.4f} acc {w[1]:.4f} | λ-part loss {lam[0]:.4f} "
          f"acc {lam[1]:.4f} | sparsity {rec['sparsity']:.3f} | live ops "
          f"{_live_ops_text(live_ops, s.spec.num_op_slots)} | derived {_human(costs['derived_params'])} "
          f"params, {_human(costs['derived_macs'])} MACs | {seconds:.1f} s")
    return rec


def _postfix(bar, meters, **extra):
    """Progress-bar postfix "name=loss/acc" per meter, plus `extra` values."""
    values = {}
    for name, meter in meters.items():
        loss, acc = meter.read()
        values[name] = f"{loss:.3f}/{acc:.2f}"
    bar.set_postfix(values, refresh=False, **extra)


# ---------------------------------------------------------------------------------------------- stages


def pretrain(s, run_dir, resume=False):
    """Stage 1: W only, λ fixed at 1; checkpoints <run>/checkpoints/pretrain.ckpt every epoch."""
    c = s.cfg.pretrain
    trainer = _w_trainer(s, c)
    path = run_dir.checkpoint_path("pretrain")
    start, iteration = 0, 0
    if resume and path.exists():
        meta = load_checkpoint(path, s.params, {"w": trainer})
        start, iteration = meta["epoch"], meta["iteration"]
        if start < c.epochs:
            s.log(f"pretrain: resuming after epoch {start}/{c.epochs}")
    s.dist.start([trainer])
    s.net.set_trained("weights")  # λ stay at 1: their gradients would go unused
    masks = s.net.masks
    derived_cost = _DerivedCost()
    for epoch in range(start, c.epochs):
        reseed(s.cfg.seed, "pretrain", epoch)
        began = time.perf_counter()
        meter = Meter()
        loader = s.w_loader
        with progress(len(loader), f"pretrain {epoch + 1}/{c.epochs}") as bar:
            for step, batch in enumerate(loader):
                if epoch == 0:
                    _warmup(trainer, c.lr, step, len(loader))
                xs, ys = split_batch(batch, s.ctx)
                train_step(s.net, s.loss_fn, trainer, xs, ys, meter)
                iteration += 1
                if (step + 1) % SYNC_EVERY == 0:
                    check_finite(meter.read()[0], "pretrain", epoch, iteration, ["pretrain.lr"])
                    _postfix(bar, {"W": meter})
                bar.update(1)
        trainer.set_learning_rate(c.lr)
        w = meter.read()
        check_finite(w[0], "pretrain", epoch, iteration, ["pretrain.lr"])
        # The λ part is not trained on here: its accuracy (inference mode) tracks generalization.
        lam = evaluate_twin(s, s.lam_loader)
        if s.dist.is_writer:
            save_checkpoint(path, s.params, {"w": trainer},
                            {"stage": "pretrain", "epoch": epoch + 1, "iteration": iteration})
        _record(s, run_dir, "pretrain", epoch, c.epochs, iteration, w, lam, masks, derived_cost,
                time.perf_counter() - began)


def search_plan(n_w, ratio):
    """The step kinds of one search epoch: n_w "w" steps in cycles of x "w" then y "lam" (ratio [x, y])."""
    x, y = ratio
    plan = []
    done = 0
    while done < n_w:
        k = min(x, n_w - done)
        plan += ["w"] * k + ["lam"] * y
        done += k
    return plan


def _cycle(loader):
    """Endless batches of `loader`, one shuffled pass after another."""
    while True:
        yield from loader


def search(s, run_dir, resume=False):
    """Stage 2: W and λ interleaved; returns the final SearchState. Checkpoints search.ckpt every epoch."""
    c = s.cfg.search
    w_trainer, lam_trainer = _w_trainer(s, c), _lam_trainer(s)
    trainers = {"w": w_trainer, "lam": lam_trainer}
    path = run_dir.checkpoint_path("search")
    state = SearchState(epoch=0, iteration=0, masks=[BlockMask.full(s.spec)] * s.net.num_blocks)
    if resume and path.exists():
        meta = load_checkpoint(path, s.params, trainers)
        state = SearchState(epoch=meta["epoch"], iteration=meta["iteration"], masks=list(meta["masks"]))
        _apply_masks(s, state.masks, lam_trainer)
        if state.epoch < c.epochs:
            s.log(f"search: resuming after epoch {state.epoch}/{c.epochs}")
    s.dist.start([w_trainer, lam_trainer])
    penalty = _penalty(s)
    adaptive = c.penalty != "none"
    lr_keys = ["search.lr", "search.lambda_lr"]
    derived_cost = _DerivedCost()
    for epoch in range(state.epoch, c.epochs):
        reseed(s.cfg.seed, "search", epoch)
        began = time.perf_counter()
        w_meter, lam_meter = Meter(), Meter()
        w_batches, lam_batches = iter(s.w_loader), _cycle(s.lam_loader)
        last_gamma = None  # γ is recomputed at the first λ step of every epoch, then every penalty_every
        plan = search_plan(len(s.w_loader), c.ratio)
        from_scratch = epoch == 0 and s.cfg.pretrain.epochs == 0
        w_steps = 0
        with progress(len(plan), f"search {epoch + 1}/{c.epochs}") as bar:
            for step, kind in enumerate(plan):
                if kind == "w":
                    if from_scratch:
                        _warmup(w_trainer, c.lr, w_steps, len(s.w_loader))
                        w_steps += 1
                    xs, ys = split_batch(next(w_batches), s.ctx)
                    s.net.set_trained("weights")
                    train_step(s.net, s.loss_fn, w_trainer, xs, ys, w_meter)
                else:
                    if adaptive and (last_gamma is None or state.iteration - last_gamma >= c.penalty_every):
                        _apply_gamma(s, penalty, state.masks, lam_trainer)
                        last_gamma = state.iteration
                    xs, ys = split_batch(next(lam_batches), s.ctx)
                    s.net.set_trained("lambdas")
                    train_step(s.net, s.loss_fn, lam_trainer, xs, ys, lam_meter)
                state.iteration += 1
                if c.prune_every and state.iteration % c.prune_every == 0:
                    state.masks = _derive(s, state.masks)
                    _apply_masks(s, state.masks, lam_trainer)
                if (step + 1) % SYNC_EVERY == 0:
                    check_finite(w_meter.read()[0], "search", epoch, state.iteration, lr_keys)
                    check_finite(lam_meter.read()[0], "search", epoch, state.iteration, lr_keys)
                    _postfix(bar, {"W": w_meter, "λ": lam_meter}, sparsity=f"{sparsity(s):.3f}")
                bar.update(1)
        w_trainer.set_learning_rate(c.lr)
        w, lam = w_meter.read(), lam_meter.read()
        check_finite(w[0], "search", epoch, state.iteration, lr_keys)
        check_finite(lam[0], "search", epoch, state.iteration, lr_keys)
        if not c.prune_every:
            state.masks = _derive(s, state.masks)
            _apply_masks(s, state.masks, lam_trainer)
        state.epoch = epoch + 1
        if s.dist.is_writer:
            save_checkpoint(path, s.params, trainers, {"stage": "search", "epoch": state.epoch,
                                                       "iteration": state.iteration, "masks": state.masks})
        _record(s, run_dir, "search", epoch, c.epochs, state.iteration, w, lam, state.masks, derived_cost,
                time.perf_counter() - began)
    return state


def derive(s, run_dir, masks):
    """Stage 3: the genotype of the final λ -> <run>/genotype.json (with λ values) and a summary."""
    masks = _derive(s, masks)
    genotype = genotype_of(s, masks)
    path = run_dir.path / "genotype.json"
    if s.dist.is_writer:
        genotype.save(path)
    costs = _DerivedCost()(s, masks)
    params, macs = costs["derived_params"], costs["derived_macs"]
    test_loss, test_acc = evaluate_twin(s, s.loaders.test)
    summary = {
        "genotype": str(path),
        "sparsity": sparsity(s),
        "live_ops": [len(m.live_slots()) for m in masks],
        "edges": [m.num_edges() for m in masks],
        "derived_params": params,
        "derived_macs": macs,
        "supernet_test_loss": test_loss,
        "supernet_test_acc": test_acc,
    }
    run_dir.save_json("search_summary.json", summary)
    s.log(f"derive: {path} | sparsity {summary['sparsity']:.3f} | live ops "
          f"{_live_ops_text(summary['live_ops'], s.spec.num_op_slots)} | derived {_human(params)} params, "
          f"{_human(macs)} MACs | supernet test acc {test_acc:.4f}")
    return SearchResult(genotype=genotype, path=path, summary=summary)


def format_summary(result):
    """Text printed at the end of a search: the genotype and what its derived net costs."""
    s = result.summary
    return (f"{result.genotype.summary()}\n"
            f"derived net: {_human(s['derived_params'])} params, {_human(s['derived_macs'])} MACs "
            f"(FLOPs = 2 x MACs); λ sparsity {s['sparsity']:.3f}; supernet test accuracy "
            f"{s['supernet_test_acc']:.4f}\n"
            f"genotype written to {result.path}")


def run_search(cfg, run_dir, ctx_list=None, kvstore=None, resume=False, cluster=None):
    """The whole pipeline of `cfg` in `run_dir` (a RunDir); with `resume`, continue from its checkpoints.

    ctx_list / kvstore default to cfg.runtime.ctx / cfg.runtime.kvstore. Returns a SearchResult.
    """
    ctx_list = ctx_list or contexts(cfg.runtime.ctx)
    s = prepare(cfg, ctx_list, kvstore or cfg.runtime.kvstore, log=run_dir.log, cluster=cluster)
    searched = resume and run_dir.checkpoint_path("search").exists()
    if not searched:  # a search checkpoint already holds the pretrained weights
        pretrain(s, run_dir, resume=resume)
    state = search(s, run_dir, resume=resume)
    return derive(s, run_dir, state.masks)
