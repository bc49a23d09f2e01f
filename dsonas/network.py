"""Skeletons that stack masked blocks into a classifier: the supernet and every derived net.

Layout (DSO-NAS Fig. 3): stem -> S stages of B blocks, a ReductionBlock (stride 2, channels doubled)
between stages -> ReLU -> global average pool -> dropout -> dense.

* cifar stem: 3x3 conv + BN to `filters` channels, stride 1. The stem outputs exactly the stage-1 block
  width (not 3x as DARTS-style stems do) because a block's residual needs input width = block width.
* imagenet stem: 3x3 conv stride 2 (filters/2 channels) + BN + ReLU, 3x3 conv stride 2 (filters) + BN:
  224x224 inputs reach stage 1 at 56x56, then 28, 14, 7 for the paper's four stages (2, 2, 13, 6).
* width_mult scales every stage's channel count; when it is not 1 the result is rounded to a multiple
  of `channel_divisor` (at least one divisor): 8 by default, the granularity vectorised CPU kernels like;
  a budget target may need a finer one (`dsonas.retrain.width_for_budget`).
* λ Parameters (searchable nets) live on the network, initialised to 1, and are passed to the blocks:
  `share` registers one set for all blocks, `full` one set per block.
* aux=True adds an auxiliary classifier (ReLU, 1x1 conv 128 + BN + ReLU, global pool, dense) after the
  second-to-last stage; the net then ALWAYS returns (logits, aux_logits), in training and inference alike,
  because a hybridized graph has a fixed number of outputs (evaluation uses out[0]).
* shuffle_cifar / shuffle_imagenet: every block sits in a ShuffleNet V2 unit (dsonas.shuffle) instead,
  on half of the unit's channels, without a residual add; the stage's first unit downsamples, with the
  bypass path `bypass` (default per kind, dsonas.space.DEFAULT_BYPASS). Blocks keep the names
  ``cell{b}_`` either way, so per-block costs and reports read them alike.
"""

import mxnet as mx
from mxnet.gluon import nn

from dsonas import shuffle
from dsonas.block import MaskedBlock, PrunableBlock, ReductionBlock
from dsonas.errors import ConfigError
from dsonas.genotype import BlockMask
from dsonas.ops import set_depthwise_split
from dsonas.recompute import SegmentGraphs
from dsonas.space import DEFAULT_BYPASS, BlockSpec, Skeleton, check_space_kind

CHANNEL_DIVISOR = 8


def blocks_of(net, cls):
    """Every sub-block of `net` (itself included) that is a `cls`, in registration order."""
    found = []
    net.apply(lambda b: found.append(b) if isinstance(b, cls) else None)
    return found


def scale_channels(channels, width_mult, divisor=CHANNEL_DIVISOR):
    """channels x width_mult, rounded to a multiple of `divisor` (min `divisor`); exactly `channels` at
    width_mult 1, so a searched genotype retrains at the widths it was searched with."""
    if width_mult == 1.0:
        return channels
    return max(divisor, int(round(channels * width_mult / divisor)) * divisor)


def divisor_fits(skeleton, divisor):
    """Whether stage widths in multiples of `divisor` can build `skeleton`: a ShuffleNet V2 unit splits
    its channels in half, so shuffle skeletons need an even divisor."""
    return divisor >= 1 and not (skeleton.is_shuffle and divisor % 2)


def _stem(kind, channels, bn_scale):
    stem = nn.HybridSequential(prefix="stem_")
    with stem.name_scope():
        if kind == "cifar":
            stem.add(nn.Conv2D(channels, 3, padding=1, use_bias=False, in_channels=3),
                     nn.BatchNorm(scale=bn_scale, in_channels=channels))
        else:
            half = max(8, channels // 2)
            stem.add(nn.Conv2D(half, 3, strides=2, padding=1, use_bias=False, in_channels=3),
                     nn.BatchNorm(scale=bn_scale, in_channels=half), nn.Activation("relu"),
                     nn.Conv2D(channels, 3, strides=2, padding=1, use_bias=False, in_channels=half),
                     nn.BatchNorm(scale=bn_scale, in_channels=channels))
    return stem


def _aux_head(channels, num_classes, bn_scale):
    head = nn.HybridSequential(prefix="aux_")
    with head.name_scope():
        head.add(nn.Activation("relu"), nn.Conv2D(128, 1, use_bias=False, in_channels=channels),
                 nn.BatchNorm(scale=bn_scale, in_channels=128), nn.Activation("relu"),
                 nn.GlobalAvgPool2D(), nn.Dense(num_classes, in_units=128))
    return head


# What a training step computes gradients for (DsoNet.set_trained).
TRAINED_GROUPS = ("all", "weights", "lambdas")


class DsoNet(PrunableBlock):
    """A DSO-NAS network: `searchable` = supernet with λ (search), else a derived net (retrain/export).

    masks: one BlockMask per block (a `share` net repeats the same mask). `shared` decides how λ are
    owned (one set for all blocks vs one per block) and is recorded in derived genotypes, as are `bypass`
    (kept resolved to the kind's default: what was searched) and `cell_bn`.
    """

    def __init__(self, skeleton, spec, masks, searchable, shared, width_mult=1.0, bn_scale=True, dropout=0.0,
                 drop_path=0.0, aux=False, formulation="fast", bypass=None, cell_bn=None,
                 channel_divisor=CHANNEL_DIVISOR, prefix="dsonet_", **kwargs):
        super().__init__(prefix=prefix, **kwargs)
        masks = list(masks)
        if len(masks) != skeleton.num_blocks:
            raise ValueError(f"expected {skeleton.num_blocks} masks (one per block), got {len(masks)}")
        if aux and len(skeleton.stages) < 2:
            raise ConfigError("retrain.aux_weight: the auxiliary head needs at least 2 stages; set it to 0")
        if not skeleton.is_shuffle and (bypass is not None or cell_bn is not None):
            raise ConfigError(f"bypass and cell_bn apply to shuffle skeletons, not {skeleton.kind!r}")
        if not divisor_fits(skeleton, channel_divisor):
            raise ConfigError(f"retrain.channel_divisor: {channel_divisor} cannot build a {skeleton.kind} "
                              "skeleton (it must be at least 1, and even for shuffle skeletons, whose units "
                              "halve their widths)")
        self.skeleton, self.spec = skeleton, spec
        self.searchable, self.shared, self.aux = searchable, shared, aux
        self.bypass = (bypass or DEFAULT_BYPASS[skeleton.kind]) if skeleton.is_shuffle else None
        self.cell_bn = cell_bn
        self.width_mult, self.channel_divisor = width_mult, channel_divisor
        self._cell_args = (masks, searchable, bn_scale, formulation, drop_path)
        widths = [scale_channels(skeleton.filters * 2 ** s, width_mult, channel_divisor)
                  for s in range(len(skeleton.stages))]
        self._lambda_names = []  # per block: attribute names of its λ, in spec.lambda_keys() order
        self._layers = []        # forward order: (block index or None, child)
        # names of the Parameters whose grad_req the net itself turned to 'null', by reason: "pruned" (outside
        # the graph of the current masks, set_masks) and "frozen" (not trained by this step, set_trained)
        self._off = {"pruned": set(), "frozen": set()}
        self._trained = "all"
        self.recompute = False   # see set_recompute
        self.segment_graphs = None
        with self.name_scope():
            if skeleton.is_shuffle:
                features = self._build_shuffle(widths, bn_scale)
            else:
                features = self._build_dso(widths, bn_scale)
            self.pool = nn.GlobalAvgPool2D()
            self.dropout = nn.Dropout(dropout) if dropout > 0 else None
            self.classifier = nn.Dense(skeleton.num_classes, in_units=features, prefix="classifier_")
        if searchable:
            self._sync_grad_reqs()

    def _make_cell(self, block, channels, residual=True):
        """MaskedBlock `block` (named cell{block}_ in the net's scope), registering its λ if searchable."""
        masks, searchable, bn_scale, formulation, drop_path = self._cell_args
        cell = MaskedBlock(self.spec, channels, masks[block], searchable, bn_scale, formulation, drop_path,
                           residual=residual, prefix=f"cell{block}_")
        if searchable:
            self._lambda_names.append(self._register_lambdas(block))
        return cell

    def _add_aux_head(self, stage, width, bn_scale, block):
        if self.aux and stage == len(self.skeleton.stages) - 2:
            self.aux_head = _aux_head(width, self.skeleton.num_classes, bn_scale)
            self._aux_after = block

    def _build_dso(self, widths, bn_scale):
        """Stem, blocks with reduction blocks between stages, final ReLU; returns the pooled width."""
        self.stem = _stem(self.skeleton.kind, widths[0], bn_scale)
        block = 0
        for stage, count in enumerate(self.skeleton.stages):
            if stage > 0:
                reduce = ReductionBlock(widths[stage - 1], widths[stage], bn_scale, prefix=f"reduce{stage}_")
                self.register_child(reduce, f"reduce{stage}")
                self._layers.append((None, reduce))
            for _ in range(count):
                cell = self._make_cell(block, widths[stage])
                self.register_child(cell, f"cell{block}")
                self._layers.append((block, cell))
                block += 1
            self._add_aux_head(stage, widths[stage], bn_scale, block - 1)
        self.head = nn.Activation("relu")
        return widths[-1]

    def _build_shuffle(self, widths, bn_scale):
        """Stem, one ShuffleNet V2 unit per block, the kind's head; returns the pooled width.

        cell_bn None: BN after a cell's sum exactly when it sums two or more ops (see dsonas.shuffle).
        """
        kind = self.skeleton.kind
        self.stem = shuffle.stem(kind, widths[0], bn_scale)
        strides = iter(shuffle.unit_strides(kind, self.skeleton.stages))
        in_channels, block = shuffle.stem_channels(kind, widths[0]), 0
        for stage, count in enumerate(self.skeleton.stages):
            for _ in range(count):
                cell = self._make_cell(block, widths[stage] // 2, residual=False)
                norm = len(cell.mask.outputs) > 1 if self.cell_bn is None else self.cell_bn
                unit = shuffle.ShuffleUnit(in_channels, widths[stage], next(strides), cell, bn_scale,
                                           self.bypass, norm, prefix=f"unit{block}_")
                self.register_child(unit, f"unit{block}")
                self._layers.append((block, unit))
                in_channels, block = widths[stage], block + 1
            self._add_aux_head(stage, widths[stage], bn_scale, block - 1)
        self.head, features = shuffle.head(kind, widths[-1], bn_scale)
        return features

    def _register_lambdas(self, block):
        owner = "" if self.shared else str(block)
        names = []
        for key, shape in self.spec.lambda_shapes().items():
            name = f"lam{owner}_{key}"
            if not hasattr(self, name):
                setattr(self, name, self.params.get(name, shape=shape, init=mx.init.One(), grad_req="write",
                                                    wd_mult=0.0))
            names.append(name)
        return names

    @property
    def _blocks(self):
        """The MaskedBlocks in forward order (a property: Gluon warns about stored lists of grandchildren)."""
        return [child.cell if isinstance(child, shuffle.ShuffleUnit) else child
                for b, child in self._layers if b is not None]

    @property
    def num_blocks(self):
        return len(self._blocks)

    @property
    def masks(self):
        return [cell.mask for cell in self._blocks]

    def hybrid_forward(self, F, x, **lams):
        h = self.stem(x)
        aux_logits = None
        for block, layer in self._layers:
            if block is None:
                h = layer(h)
                continue
            h = layer(h, *[lams[name] for name in self._lambda_names[block]]) if self.searchable else layer(h)
            if self.aux and block == self._aux_after:
                aux_logits = self.aux_head(h)
        logits = self._classify(h)
        return (logits, aux_logits) if self.aux else logits

    def _classify(self, h):
        """The head after the last block: ReLU (or the shuffle head, if any), global pool, dropout, dense."""
        if self.head is not None:
            h = self.head(h)
        h = self.pool(h)
        if self.dropout is not None:
            h = self.dropout(h)
        return self.classifier(h)

    def segment_layers(self):
        """The forward pass before the head as (layer, λ Parameters it reads) in order: the stem, every
        block and reduction. Blocks pruned to the identity are left out: their output is their input,
        which a graph of its own would not record."""
        if self.aux:
            raise ValueError("segments: the auxiliary head branches off mid-net; build with aux=False")
        out = [(self.stem, [])]
        for block, layer in self._layers:
            if isinstance(layer, MaskedBlock) and layer.mask.is_identity:
                continue
            searched = block is not None and self.searchable
            lams = [getattr(self, name) for name in self._lambda_names[block]] if searched else []
            out.append((layer, lams))
        return out

    def segments(self, ctx):
        """The forward pass as callables h -> h run in sequence: `segment_layers` (reading the λ of
        context `ctx`), then the classifier head. Their composition is `self(x)`."""
        return [lambda h, layer=layer, lams=lams: layer(h, *[p.data(ctx) for p in lams])
                for layer, lams in self.segment_layers()] + [self._classify]

    def set_recompute(self, on):
        """Train by recomputing each segment's activations in backward (dsonas.recompute): far less memory
        for one more forward pass. Live Parameters get grad_req 'add' (gradients summed over segments,
        zeroed by every step). The segments run their own graphs (`segment_graphs`); hybridize the net
        itself without static_alloc, whose buffers for the whole graph would stay allocated beside them."""
        if on and any(cell.drop_path > 0 for cell in self._blocks):
            raise ConfigError("recompute needs deterministic blocks: drop-path would draw different masks "
                              "when a block is recomputed; set drop_path to 0 or turn recompute off")
        self.recompute = bool(on)
        self.segment_graphs = SegmentGraphs(self) if on else None
        for param in self.collect_params().values():
            if param.grad_req != "null":
                param.grad_req = self._live_grad_req

    def set_trained(self, group):
        """Compute only the gradients a step uses: "weights" (a W step), "lambdas" (a λ step) or "all".

        The other group's Parameters get grad_req 'null', so backward skips their gradients (oneDNN then
        runs no backward-weights kernel for the convolutions of a λ step). The published implementation
        computes every gradient in every step and lets the optimizer pick. Same updates, same results;
        measured ~5% per W+λ step pair on the CIFAR supernet (bench/README.md). Changing the group
        changes the backward graph, which the cached graph rebuilds on its next call.
        A λ step then has no backward before the first λ (the stem, the first block's level-1 ops), and
        MXNet updates BN running statistics in BN's backward: those BNs' supernet statistics follow the W
        steps only. Nothing reads them: evaluation recalibrates a twin's (engine.evaluate_twin).
        """
        if group not in TRAINED_GROUPS:
            raise ValueError(f"set_trained: group must be one of {TRAINED_GROUPS}, got {group!r}")
        if group == self._trained:
            return
        self._trained = group
        lambdas = {p.name for p in self.lambda_params()}
        for param in self.collect_params().values():
            frozen = group != "all" and (param.name in lambdas) != (group == "lambdas")
            self._switch(param, "frozen", off=frozen)

    def lambda_params(self):
        """The λ Parameters (one set if shared, one per block if full); empty for a derived net."""
        names = dict.fromkeys(name for names in self._lambda_names for name in names)
        return [getattr(self, name) for name in names]

    def weight_params(self):
        """Every other Parameter (including ones a pruned mask no longer uses: their grad_req is 'null')."""
        lam = {p.name for p in self.lambda_params()}
        return [p for p in self.collect_params().values() if p.name not in lam]

    def block_lambda_names(self, block):
        """{λ key: Parameter name} of block `block` (the same names for every block of a share net)."""
        return {key: getattr(self, name).name
                for key, name in zip(self.spec.lambda_keys(), self._lambda_names[block], strict=True)}

    def lambdas_numpy(self):
        """Per block, {λ key: np.ndarray} (a share net returns the same arrays for every block).

        Reads the first context's copy: data-parallel copies are identical after each update."""
        values = {name: getattr(self, name).list_data()[0].asnumpy()
                  for name in dict.fromkeys(n for names in self._lambda_names for n in names)}
        return [{key: values[name] for key, name in zip(self.spec.lambda_keys(), names, strict=True)}
                for names in self._lambda_names]

    def set_masks(self, masks):
        """Shrink the supernet to `masks` (one per block) in place, keeping every Parameter object.

        Pruned ops and λ leave the traced graph; their grad_req becomes 'null' so a gluon.Trainer built on
        weight_params()/lambda_params() skips them (no stale-gradient error, no weight decay on dead
        weights). The cached graph is cleared: the next call re-traces with the same hybridize flags.
        """
        masks = list(masks)
        if len(masks) != self.num_blocks:
            raise ValueError(f"expected {self.num_blocks} masks (one per block), got {len(masks)}")
        if self.shared and len(set(masks)) > 1:
            raise ValueError("a share net takes the same mask for every block")
        for cell, mask in zip(self._blocks, masks, strict=True):
            cell.set_mask(mask)
        self._clear_cached_ops()
        self._sync_grad_reqs()

    def set_depthwise_split(self, split):
        """Train wide depthwise kernels as groups at most 3 wide (split=True) or run them as one convolution
        (inference, export): same Parameters, same outputs (see ops.DepthwiseConv); clears the graph."""
        set_depthwise_split(self, split)
        self._clear_cached_ops()

    def set_drop_path(self, prob):
        """Change the drop-path probability (e.g. a schedule growing it over epochs); clears the graph."""
        if prob > 0 and self.recompute:
            raise ConfigError("drop-path needs recompute off (a recomputed block would draw new masks)")
        for cell in self._blocks:
            cell.drop_path = prob
        self._clear_cached_ops()

    def _clear_cached_ops(self):
        """Drop the traced graph of this net and of every sub-block: with recompute the segments run
        their own graphs, which a changed mask or kernel split invalidates as well."""
        self.apply(lambda block: block._clear_cached_op() if isinstance(block, nn.HybridBlock) else None)
        if self.segment_graphs is not None:
            self.segment_graphs.clear()

    @property
    def _live_grad_req(self):
        return "add" if self.recompute else "write"

    def _sync_grad_reqs(self):
        """grad_req 'null' for Parameters outside the current graph, the live req again for those back in."""
        out = self(mx.sym.var("data"))
        used = set((mx.sym.Group(list(out)) if isinstance(out, tuple) else out).list_inputs())
        for param in self.collect_params().values():
            self._switch(param, "pruned", off=param.name not in used)

    def _switch(self, param, reason, off):
        """Turn `param`'s gradient off (grad_req 'null') or back on for `reason` ("pruned" or "frozen").

        It is on again only once no reason holds. A Parameter that was 'null' for another cause (BN
        running statistics, a caller's own freeze) is never turned on.
        """
        held = self._off[reason]
        if off:
            if param.grad_req != "null" or any(param.name in names for names in self._off.values()):
                held.add(param.name)
            param.grad_req = "null"
        elif param.name in held:
            held.discard(param.name)
            if not any(param.name in names for names in self._off.values()):
                param.grad_req = self._live_grad_req


def build_supernet(space_cfg, skeleton_cfg, num_classes, input_size, formulation="fast"):
    """The fully connected searchable net of a config (BN scale fixed to 1, λ = 1).

    space.kind share / full: one λ set for all blocks / one per block, on a cifar or imagenet skeleton.
    space.kind shuffle: one λ set (one cell, as ShuffleNASNet searches) for every unit of a shuffle_*
    skeleton (BN after each cell's sum, as for every shuffle cell summing several ops).
    """
    spec = BlockSpec.from_config(space_cfg)
    skeleton = Skeleton.from_config(skeleton_cfg, num_classes, input_size)
    if space_cfg.kind not in ("share", "full", "shuffle"):
        raise ConfigError(f"space.kind: expected share, full or shuffle, got {space_cfg.kind!r}")
    check_space_kind(space_cfg.kind, skeleton.kind)
    masks = [BlockMask.full(spec)] * skeleton.num_blocks
    return DsoNet(skeleton, spec, masks, searchable=True, shared=space_cfg.kind != "full", bn_scale=False,
                  formulation=formulation, bypass=skeleton_cfg.bypass)


def compile_genotype(genotype, width_mult=1.0, dropout=0.0, drop_path=0.0, aux=False, bypass=None,
                     cell_bn=None, channel_divisor=CHANNEL_DIVISOR):
    """The derived net of a genotype, for retraining from scratch (BN scale learnable, no λ).

    bypass / cell_bn: shuffle skeletons only (dsonas.shuffle), overriding the genotype's own (e.g. for an
    ablation); None keeps the genotype's, whose None is the skeleton kind's default bypass / BN after the
    cells that sum two or more ops. channel_divisor: see `scale_channels`.
    """
    return DsoNet(genotype.skeleton, genotype.spec, genotype.block_masks(), searchable=False,
                  shared=genotype.shared, width_mult=width_mult, bn_scale=True, dropout=dropout,
                  drop_path=drop_path, aux=aux, bypass=bypass or genotype.bypass,
                  cell_bn=genotype.cell_bn if cell_bn is None else cell_bn, channel_divisor=channel_divisor)


def deploy_net(genotype, width_mult=1.0, channel_divisor=CHANNEL_DIVISOR):
    """The net as deployed, counted and timed: no aux head, no dropout or drop-path (inference ignores
    them), wide depthwise kernels as one convolution (the training split only pays off in backward)."""
    net = compile_genotype(genotype, width_mult=width_mult, channel_divisor=channel_divisor)
    net.set_depthwise_split(False)
    return net
