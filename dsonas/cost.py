"""Cost model: parameters, multiply-adds, memory access and measured latency.

Conventions (every figure this module prints or returns follows them):

* **params** — learnable parameters: every argument of the symbol except the input, minus BatchNorm γ
  held at 1 (`fix_gamma`, Gluon's `BatchNorm(scale=False)`). BatchNorm running mean/var are auxiliary
  states and are *not* counted; learnable γ, β are. This is the convention behind the published counts
  (GluonCV, torchvision, the papers): ResNet-50 25.6M, MobileNetV2 3.5M.
* **macs** — multiply-accumulates of the linear layers only: Convolution (grouped/depthwise via the
  weight's `Cin/groups`), Deconvolution, FullyConnected, dot, batch_dot. Biases, BN, pooling, activations
  and elementwise ops add no MACs, as in the published figures (MobileNet 569M; ResNet-50 3.86G with the
  stride on the first 1x1 conv as in the original/GluonCV v1, 4.09G with it on the 3x3 as in v1b).
  Weight entries that are structural zeros (a weight concatenated from a `zeros_like` piece, as the
  split 5x5 depthwise of dsonas.ops builds) do no work in the model and are not counted, so a 5x5
  depthwise costs 25 MACs per output whichever way it runs. Likewise a convolution whose weight is a
  constant `_ones` node (the unit 1x1 depthwise convolution in front of dsonas.ops.Pool, there to change
  oneDNN's memory layout) costs nothing in any metric: it is a layout change, not part of the model.
  **FLOPs = 2 × MACs**; wherever both appear they are labelled.
* **mac** — memory access cost in the ShuffleNet V2 sense (G1-G4), in *elements* (×4 for fp32 bytes):
  per layer, every input feature map read + every output written + every weight/state read, assuming a
  cache that holds a whole layer. Pure views (Reshape, Flatten, Dropout at inference, ...) are free;
  slicing reads only what it keeps; Concat, transposes and elementwise ops pay read + write (G4).
* **fragments** — ShuffleNet V2's G3: the number of *fragmented operators*, i.e. individual convolutions
  and poolings (dense layers included), and **max_parallel**, the most of them that sit side by side:
  operators are grouped by depth (the most such operators on any path from the input to them) and the
  largest group is reported (1 for a chain, 2 for a ShuffleNet V2 down unit or a ResNet projection block,
  up to the level width for a DSO block).
* **elementwise ops** — G4: the ops with no MACs but full memory traffic, counted by kind (activation,
  add, mul, concat, shuffle = transpose/swap of axes, split = slicing, pad) with their MAC. BatchNorm is
  left out (it folds into the preceding conv for inference) and so are pure views.

Everything is counted on the symbol graph with shapes from `infer_shape`, so it works for any
hybridizable Gluon net (hybridized or not; Gluon forward hooks would not fire inside a hybridized
graph) and for exported symbols. Costs are for the whole input batch; params do not depend on it.

On top of the counter: per-op-slot and per-block costs of DsoNet's masked blocks (`op_costs`,
`block_cost`, `slot_costs`, `network_block_costs`) for the adaptive penalties and reports, a cached
per-op `LatencyTable`, and `solve_width` / `solve_width_mult` for budget targets.
"""

import functools
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field

import numpy as np

from dsonas.errors import BudgetError, ConfigError
from dsonas.io import atomic_write_json

METRICS = ("macs", "mac", "params")

# Ops that only reinterpret a buffer: no memory traffic of their own.
_VIEW_OPS = frozenset({
    "Reshape", "reshape", "Flatten", "flatten", "expand_dims", "squeeze", "reshape_like", "Dropout",
    "BlockGrad", "stop_gradient", "identity", "_identity_with_attr_like_rhs", "make_loss", "MakeLoss",
    "shape_array", "size_array",
})
# Ops that copy part of their input: they read exactly what they write.
_SLICE_OPS = frozenset({
    "slice", "slice_axis", "slice_like", "crop", "Crop", "SliceChannel", "split", "_split_v2", "take",
    "pick", "_slice_assign",
})
# Ops whose second input only supplies a shape.
_SHAPE_ONLY_SECOND = frozenset({"broadcast_like", "slice_like", "reshape_like"})
_SHAPE_ONLY_ALL = frozenset({"zeros_like", "ones_like"})
# ShuffleNet V2 G3: "the number of individual convolution or pooling operations".
FRAGMENT_OPS = frozenset({"Convolution", "Deconvolution", "Pooling", "FullyConnected"})
# ShuffleNet V2 G4: element-wise operators, by kind.
ELEMENTWISE_KINDS = {
    "activation": ("Activation", "relu", "LeakyReLU", "sigmoid", "tanh", "softrelu", "softsign",
                   "hard_sigmoid", "clip"),
    "add": ("elemwise_add", "_plus", "_Plus", "add_n", "ElementWiseSum", "broadcast_add", "broadcast_plus",
            "elemwise_sub", "_minus", "_Minus", "broadcast_sub", "broadcast_minus", "_plus_scalar",
            "_minus_scalar", "_rminus_scalar"),
    "mul": ("elemwise_mul", "_mul", "_Mul", "broadcast_mul", "_mul_scalar", "elemwise_div", "_div", "_Div",
            "broadcast_div", "_div_scalar", "_rdiv_scalar"),
    "concat": ("Concat", "concat", "stack"),
    "shuffle": ("SwapAxis", "swapaxes", "transpose"),
    "split": ("slice", "slice_axis", "SliceChannel", "split", "_split_v2", "crop", "Crop"),
    "pad": ("Pad", "pad"),
}
_ELEMENTWISE = {op: kind for kind, ops in ELEMENTWISE_KINDS.items() for op in ops}
# Ops known to cost no multiply-adds (so anything else is reported as uncounted, never silently zero).
_ZERO_MAC_OPS = _VIEW_OPS | _SLICE_OPS | _SHAPE_ONLY_SECOND | _SHAPE_ONLY_ALL | frozenset({
    "BatchNorm", "InstanceNorm", "LayerNorm", "GroupNorm", "LRN", "Pooling", "Activation", "LeakyReLU",
    "relu", "sigmoid", "tanh", "softrelu", "softsign", "hard_sigmoid", "softmax", "log_softmax",
    "SoftmaxActivation", "SoftmaxOutput", "Softmax", "Concat", "concat", "stack", "SwapAxis", "swapaxes",
    "transpose", "tile", "repeat", "clip", "Cast", "cast", "_copy", "UpSampling", "BilinearResize2D",
    "_contrib_BilinearResize2D", "Pad", "pad", "add_n", "ElementWiseSum", "elemwise_add", "elemwise_sub",
    "elemwise_mul", "elemwise_div", "_plus", "_minus", "_mul", "_div", "_Plus", "_Minus", "_Mul", "_Div",
    "_maximum", "_minimum", "_power", "broadcast_add", "broadcast_sub", "broadcast_mul", "broadcast_div",
    "broadcast_plus", "broadcast_minus", "broadcast_maximum", "broadcast_minimum", "broadcast_power",
    "broadcast_to", "_plus_scalar", "_minus_scalar", "_rminus_scalar", "_mul_scalar", "_div_scalar",
    "_rdiv_scalar", "_maximum_scalar", "_minimum_scalar", "_power_scalar", "_rpower_scalar", "negative",
    "abs", "sqrt", "rsqrt", "square", "exp", "log", "sign", "mean", "sum", "max", "min", "norm",
    "_zeros", "_ones", "_full", "where", "Embedding", "_contrib_div_sqrt_dim", "erf", "_equal",
    "_not_equal", "_greater", "_lesser", "_greater_equal", "_lesser_equal",
})


@dataclass(frozen=True)
class LayerCost:
    """One graph node: MACs, memory access (elements), learnable params first used here, output shape."""

    name: str
    op: str
    macs: int
    mac: int
    params: int
    out_shape: tuple


@dataclass
class CostReport:
    params: int
    macs: int
    mac: int
    layers: list
    input_shape: tuple
    uncounted_ops: frozenset = field(default_factory=frozenset)
    max_parallel: int = 0  # G3: most fragmented operators side by side (see the module doc)

    @property
    def flops(self):
        """FLOPs = 2 × MACs (one multiply and one add per MAC)."""
        return 2 * self.macs

    @property
    def fragments(self):
        """G3: the number of fragmented operators (convolutions, poolings, dense layers)."""
        return sum(lc.op in FRAGMENT_OPS for lc in self.layers)

    @property
    def elementwise(self):
        """G4: {kind: {"ops": count, "mac": memory access}} of the element-wise ops (kinds present only)."""
        out = {}
        for lc in self.layers:
            kind = _ELEMENTWISE.get(lc.op)
            if kind is not None:
                entry = out.setdefault(kind, {"ops": 0, "mac": 0})
                entry["ops"] += 1
                entry["mac"] += lc.mac
        return out

    @property
    def elementwise_ops(self):
        return sum(e["ops"] for e in self.elementwise.values())

    @property
    def elementwise_mac(self):
        return sum(e["mac"] for e in self.elementwise.values())

    def within(self, prefix):
        """Totals over the layers whose node name starts with `prefix` (a Gluon block's prefix)."""
        sel = [lc for lc in self.layers if lc.name.startswith(prefix)]
        return {m: sum(getattr(lc, m) for lc in sel) for m in METRICS}


def to_symbol(net_or_symbol, input_name="data"):
    """The inference graph of a HybridBlock (traced with a symbolic input) or a Symbol as given."""
    import mxnet as mx

    if isinstance(net_or_symbol, mx.sym.Symbol):
        return net_or_symbol
    if not isinstance(net_or_symbol, mx.gluon.HybridBlock):
        raise TypeError(f"cost counting needs a HybridBlock or a Symbol, got {type(net_or_symbol).__name__}")
    out = net_or_symbol(mx.sym.var(input_name))
    return mx.sym.Group(list(out)) if isinstance(out, list | tuple) else out


def _graph(sym, input_shapes):
    """JSON nodes of `sym` and the inferred shape of every (node, output) entry."""
    import mxnet as mx

    nodes = json.loads(sym.tojson())["nodes"]
    internals = sym.get_internals()
    try:
        _, out_shapes, _ = internals.infer_shape(**input_shapes)
    except mx.base.MXNetError as e:
        first = next((ln for ln in str(e).splitlines() if "Error" in ln), str(e).splitlines()[0])
        raise ConfigError(f"input shape {input_shapes} does not fit this network ({first.strip()[:200]}); "
                          "pass an input shape the network accepts (e.g. a larger --input-size)") from None
    if out_shapes is None or any(not s or 0 in s for s in out_shapes):
        raise ConfigError(f"input shape {input_shapes} leaves some shapes unknown; give the full input shape "
                          "(batch, channels, height, width)")
    # get_internals lists every node's visible outputs in the JSON's topological order.
    names = [internals[i].name for i in range(len(out_shapes))]
    shapes, k = {}, 0
    for nid, node in enumerate(nodes):
        j = 0
        while k < len(names) and names[k] == node["name"] and (j == 0 or node["op"] != "null"):
            shapes[(nid, j)] = tuple(out_shapes[k])
            k, j = k + 1, j + 1
    if k != len(names):
        raise RuntimeError("could not align the symbol's internal outputs with its nodes")
    return nodes, shapes


def _prod(shape):
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


def _flag(attrs, name, default):
    return attrs.get(name, str(default)) in ("True", "true", "1")


def _zero_fraction(nodes, shapes, entry):
    """Share of the tensor at graph entry (node, output) that is structurally zero: the zeros_like parts
    of a Concat (one level deep, which is how dsonas builds padded weights)."""
    node = nodes[entry[0]]
    if node["op"] not in ("Concat", "concat"):
        return 0.0
    zero = sum(_prod(shapes[(src, idx)]) for src, idx, _ in node["inputs"]
               if nodes[src]["op"] == "zeros_like")
    return zero / _prod(shapes[entry])


def _layout_nodes(nodes):
    """Node ids of the unit-weight convolutions (see the module doc) and of their `_ones` weights."""
    found = set()
    for nid, node in enumerate(nodes):
        if node["op"] == "Convolution" and nodes[node["inputs"][1][0]]["op"] == "_ones":
            found |= {nid, node["inputs"][1][0]}
    return found


def _node_macs(op, attrs, in_shapes, out_shapes):
    out = _prod(out_shapes[0])
    if op == "Convolution":  # weight (Cout, Cin/groups, *kernel)
        return out * _prod(in_shapes[1][1:])
    if op == "Deconvolution":  # weight (Cin, Cout/groups, *kernel): every input pixel scatters a kernel
        return _prod(in_shapes[0]) * _prod(in_shapes[1][1:])
    if op == "FullyConnected":  # weight (hidden, in_units)
        return out * in_shapes[1][1]
    if op in ("dot", "batch_dot"):
        a = in_shapes[0]
        trans_a = _flag(attrs, "transpose_a", False)
        if op == "dot":
            k = a[0] if trans_a else a[-1]
        else:
            k = a[-2] if trans_a else a[-1]
        return out * k
    return 0


def count(net_or_symbol, input_shape=(1, 3, 224, 224), input_name="data"):
    """Params, MACs and memory access of a net at `input_shape`, per layer and in total (see module doc)."""
    sym = to_symbol(net_or_symbol, input_name)
    input_shape = tuple(int(d) for d in input_shape)
    nodes, shapes = _graph(sym, {input_name: input_shape})
    aux = set(sym.list_auxiliary_states())
    fixed_gamma = {n["inputs"][1][0] for n in nodes  # symbolic BatchNorm's fix_gamma defaults to True
                   if n["op"] == "BatchNorm" and _flag(n.get("attrs", {}), "fix_gamma", True)}
    learnable = {nid for nid, n in enumerate(nodes) if n["op"] == "null" and n["name"] != input_name
                 and n["name"] not in aux and nid not in fixed_gamma}

    layers, seen, uncounted = [], set(), set()
    layout = _layout_nodes(nodes)
    depth = [0] * len(nodes)  # most fragmented operators on a path from the input, this node included
    for nid, node in enumerate(nodes):
        op = node["op"]
        counted = op != "null" and nid not in layout
        depth[nid] = (max((depth[src] for src, _, _ in node["inputs"]), default=0)
                      + (counted and op in FRAGMENT_OPS))
        if not counted:
            continue
        attrs = node.get("attrs", {})
        in_shapes = [shapes[(src, idx)] for src, idx, _ in node["inputs"]]
        outs = []
        while (nid, len(outs)) in shapes:
            outs.append(shapes[(nid, len(outs))])
        write = sum(_prod(s) for s in outs)
        if op in _VIEW_OPS:
            mac = 0
        elif op in _SLICE_OPS:
            mac = 2 * write
        else:
            read_shapes = in_shapes
            if op in _SHAPE_ONLY_ALL:
                read_shapes = []
            elif op in _SHAPE_ONLY_SECOND:
                read_shapes = in_shapes[:1]
            mac = sum(_prod(s) for s in read_shapes) + write
        if op not in _ZERO_MAC_OPS and op not in ("Convolution", "Deconvolution", "FullyConnected", "dot",
                                                  "batch_dot"):
            uncounted.add(op)
        params = 0
        for src, _, _ in node["inputs"]:
            if src in learnable and src not in seen:
                seen.add(src)
                params += _prod(shapes[(src, 0)])
        macs = _node_macs(op, attrs, in_shapes, outs)
        if macs and op in ("Convolution", "Deconvolution"):
            macs = int(round(macs * (1.0 - _zero_fraction(nodes, shapes, tuple(node["inputs"][1][:2])))))
        layers.append(LayerCost(node["name"], op, macs, mac, params, outs[0]))
    side_by_side = {}
    for nid, node in enumerate(nodes):
        if node["op"] in FRAGMENT_OPS and nid not in layout:
            side_by_side[depth[nid]] = side_by_side.get(depth[nid], 0) + 1
    return CostReport(params=sum(lc.params for lc in layers), macs=sum(lc.macs for lc in layers),
                      mac=sum(lc.mac for lc in layers), layers=layers, input_shape=input_shape,
                      uncounted_ops=frozenset(uncounted), max_parallel=max(side_by_side.values(), default=0))


# ------------------------------------------------------------------------------------ block-level costs
# The search asks for the cost of the *derived* block a mask stands for (no λ, only live ops built), many
# times as λ shrink; every figure is counted once on the real op/block classes and cached. Figures are at
# batch 1.

@functools.cache
def _op_cost(op, channels, resolution, bn_scale, sep_repeats):
    from dsonas.ops import OPS

    r = count(OPS[op](channels, bn_scale, sep_repeats), (1, channels, resolution, resolution))
    return {m: getattr(r, m) for m in METRICS}


def op_costs(spec, channels, resolution, bn_scale=False):
    """Per op slot cost of a block's candidate ops: metric -> array (spec.num_op_slots,).

    Every op keeps channels and resolution, so a slot's cost depends only on its op (slot o runs
    spec.ops[o % n_ops]); separable repeats come from `spec.sep_repeats`. What summing an op's inputs
    and merging the outputs cost is in `block_cost`, `edge_cost` and `block_fixed_cost`.
    """
    per_op = [_op_cost(op, channels, resolution, bool(bn_scale), spec.sep_repeats) for op in spec.ops]
    return {m: np.tile(np.array([c[m] for c in per_op], dtype=np.float64), spec.levels) for m in METRICS}


@functools.cache
def block_cost(spec, mask, channels, resolution, bn_scale=False, residual=True):
    """Exact cost (metric -> number) of the derived block `mask` describes: live ops, the sums feeding
    them, the merge and the residual add (none in a shuffle unit's block: residual=False). An identity
    block (nothing live) costs nothing."""
    if mask.is_identity:
        return dict.fromkeys(METRICS, 0)
    from dsonas.block import MaskedBlock

    block = MaskedBlock(spec, channels, mask, searchable=False, bn_scale=bn_scale, residual=residual)
    r = count(block, (1, channels, resolution, resolution))
    return {m: getattr(r, m) for m in METRICS}


def _mask(spec, inputs):
    """Mask with the given {slot: input nodes}, every listed slot feeding the merge."""
    from dsonas.genotype import BlockMask

    return BlockMask(inputs=tuple(inputs.get(o, ()) for o in range(spec.num_op_slots)),
                     outputs=tuple(sorted(inputs)))


def block_fixed_cost(spec, channels, resolution, n_outputs, bn_scale=False):
    """Cost (metric -> number) of a block beyond its ops when `n_outputs` ops reach the merge: the merge
    (concat + 1x1 conv over n maps, or their sum) and the residual add; 0 for an identity block.

    Measured on the real block: one whose first `n_outputs` slots each read the block input and feed the
    merge, minus those slots' op costs.
    """
    if n_outputs == 0:
        return dict.fromkeys(METRICS, 0.0)
    whole = block_cost(spec, _mask(spec, {o: (0,) for o in range(n_outputs)}), channels, resolution, bn_scale)
    ops = op_costs(spec, channels, resolution, bn_scale)
    return {m: float(whole[m] - ops[m][:n_outputs].sum()) for m in METRICS}


def edge_cost(spec, channels, resolution, level, bn_scale=False):
    """Average cost (metric -> number) of one more input edge into an op of `level` (>= 2): summing one
    more map into its input. Measured on the real block as (all candidates - one candidate) / (K - 1)
    for the first op of the level, every earlier op live."""
    earlier = {o: (0,) for o in range((level - 1) * spec.n_ops)}
    slot = (level - 1) * spec.n_ops
    candidates = spec.candidate_inputs(slot)
    one = block_cost(spec, _mask(spec, {**earlier, slot: (0,)}), channels, resolution, bn_scale)
    full = block_cost(spec, _mask(spec, {**earlier, slot: candidates}), channels, resolution, bn_scale)
    return {m: (full[m] - one[m]) / (len(candidates) - 1) for m in METRICS}


def slot_costs(spec, channels, resolution, metric, bn_scale=False, latency_table=None):
    """The per-op-slot split of a block's prunable cost in `metric` that `dsonas.penalty` consumes:
    BlockCosts(op, edge, out), each an array (num_op_slots,).

    op: the op itself; edge: each live input edge (0 on level 1, whose single input is free); out:
    feeding the merge (average increment of `block_fixed_cost` per output). For "macs" the split is
    exact: sum(op + edge·inputs + out over live slots) equals `block_cost` (sums add no MACs). For
    "latency" only the measured op latencies exist, so edge and out are None.
    """
    from dsonas.penalty import BlockCosts

    if metric == "latency":
        if latency_table is None:
            raise ValueError("slot_costs(metric='latency') needs a LatencyTable")
        return BlockCosts(op=latency_table.op_costs(spec, channels, resolution, bn_scale))
    n = spec.num_op_slots
    edge = np.zeros(n)
    for level in range(2, spec.levels + 1):
        edge[list(spec.level_slots(level))] = edge_cost(spec, channels, resolution, level, bn_scale)[metric]
    first = block_fixed_cost(spec, channels, resolution, 1, bn_scale)[metric]
    last = block_fixed_cost(spec, channels, resolution, n, bn_scale)[metric]
    out = np.full(n, (last - first) / (n - 1) if n > 1 else 0.0)
    return BlockCosts(op=op_costs(spec, channels, resolution, bn_scale)[metric], edge=edge, out=out)


def _masked_blocks(net):
    """Every MaskedBlock of `net`, in registration order (= forward order in every skeleton)."""
    from dsonas.block import MaskedBlock
    from dsonas.network import blocks_of

    return blocks_of(net, MaskedBlock)


def block_geometry(net, input_shape=None):
    """(channels, resolution) at the input of every MaskedBlock of `net`, in forward order.

    Read off a symbolic trace (a pre-hook records each block's input symbol, identity blocks included),
    so the cost model never re-derives a skeleton's channel plan or width rounding. input_shape defaults
    to one image at the net's skeleton.input_size.
    """
    import mxnet as mx

    input_shape = input_shape or (1, 3, net.skeleton.input_size, net.skeleton.input_size)
    blocks = _masked_blocks(net)
    seen = []
    hooks = [b.register_forward_pre_hook(lambda blk, args: seen.append(args[0])) for b in blocks]
    try:
        to_symbol(net)
    finally:
        for h in hooks:
            h.detach()
    if not seen:
        return []
    _, shapes, _ = mx.sym.Group(seen).infer_shape(data=tuple(input_shape))
    return [(int(s[1]), int(s[2])) for s in shapes]


def network_block_costs(net, spec=None, masks=None, input_shape=None, bn_scale=False, latency_table=None):
    """Per block cost of the derived blocks `masks` describe: metric -> array (num_blocks,).

    net: a DsoNet (supernet or derived, any width) or a Skeleton (a derived net is built for its
    geometry); only the channels and resolution of its blocks are read, so `masks` may be newer than
    the graph the net was built with (during search). spec / masks default to the net's own. Metrics:
    macs, mac, params (`block_cost`), plus "latency" (ms, summed over live ops) given a LatencyTable.
    This is the FLOPs distribution across blocks (FLOPs = 2 x MACs) that reports plot.
    """
    from dsonas.space import Skeleton

    if isinstance(net, Skeleton):
        from dsonas.genotype import BlockMask
        from dsonas.network import DsoNet

        net = DsoNet(net, spec, [BlockMask.full(spec)] * net.num_blocks, searchable=False, shared=True)
    spec = spec or net.spec
    masks = list(masks) if masks is not None else net.masks
    geometry = block_geometry(net, input_shape)
    if len(geometry) != len(masks):
        raise ValueError(f"{len(masks)} masks for a network with {len(geometry)} blocks")
    residual = [block.residual for block in _masked_blocks(net)]
    out = {m: np.zeros(len(masks)) for m in METRICS + (("latency",) if latency_table is not None else ())}
    for b, ((channels, resolution), mask) in enumerate(zip(geometry, masks, strict=True)):
        for m, v in block_cost(spec, mask, channels, resolution, bn_scale, residual[b]).items():
            out[m][b] = v
        if latency_table is not None:
            lat = latency_table.op_costs(spec, channels, resolution, bn_scale)
            out["latency"][b] = lat[list(mask.live_slots())].sum()
    return out


def network_slot_costs(net, metric, input_shape=None, bn_scale=False, latency_table=None):
    """One `slot_costs` BlockCosts per block of DsoNet `net`: the `costs` argument of
    `dsonas.penalty.make_penalty` (metric = penalty.COST_METRIC[kind])."""
    return [slot_costs(net.spec, channels, resolution, metric, bn_scale, latency_table)
            for channels, resolution in block_geometry(net, input_shape)]


# ---------------------------------------------------------------------------------------------- latency
def device_name(ctx):
    """A string naming the hardware a latency was measured on (cache key): device, model, threads."""
    import mxnet as mx

    if ctx.device_type == "gpu":
        model = "unknown-gpu"
        try:
            import glob

            infos = sorted(glob.glob("/proc/driver/nvidia/gpus/*/information"))
            with open(infos[ctx.device_id]) as f:
                model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("Model"))
        except (OSError, IndexError, StopIteration):
            pass
        return f"gpu{ctx.device_id}:{model}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count())
    return f"cpu:{model}:threads={threads}:mxnet={mx.__version__}"


def measure_latency(net, input_shape, ctx=None, repeats=20, warmup=3):
    """Median wall time (ms) of one forward pass at `input_shape`, in the form `export` writes (BN folded
    into the convolutions, dsonas.fold), hybridized with static memory.

    The median of `repeats` timed passes after `warmup` untimed ones: robust to the odd slow pass of a
    shared machine. Uninitialized parameters get the default initializer (timing does not care).
    """
    import mxnet as mx

    from dsonas.fold import folded_block

    ctx = ctx or mx.cpu()
    x = mx.nd.random.uniform(shape=input_shape, ctx=ctx)
    params = net.collect_params()
    for p in params.values():
        try:
            p.list_ctx()
        except RuntimeError:  # never initialized
            p.initialize(ctx=ctx)
    params.reset_ctx(ctx)
    net(x)  # finishes deferred initialisation: folding reads every Parameter
    net, _ = folded_block(net)
    net.hybridize(static_alloc=True, static_shape=True)
    for _ in range(max(1, warmup)):
        net(x)
        mx.nd.waitall()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        net(x)
        mx.nd.waitall()
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


def default_cache_path():
    """Where latency tables live unless a run folder is given: $DSONAS_CACHE or ~/.cache/dsonas."""
    root = os.environ.get("DSONAS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dsonas")
    return os.path.join(root, "latency.json")


class LatencyTable:
    """Measured latency (ms) of each candidate op at each (channels, resolution), for one device.

    ShuffleNet V2's first guideline is to use the direct metric on the target platform: this is the
    per-op table the latency penalty reads. Entries are keyed by the device string (`device_name`) and by
    op, channels, resolution, batch, BN scale and separable repeats, and persist in a JSON file
    (`{"version": 2, "devices": {device: {key: ms}}}`, written atomically after every new measurement,
    merged with whatever another process wrote meanwhile). A cached entry is never re-measured. Ops are
    timed as deployed: BN folded, wide depthwise kernels as one convolution (version 1 timed them
    unfolded, in the training split).
    """

    VERSION = 2

    def __init__(self, path=None, ctx=None, batch_size=1, repeats=20, warmup=3):
        import mxnet as mx

        self.path = os.fspath(path) if path else default_cache_path()
        self.ctx = ctx or mx.cpu()
        self.device = device_name(self.ctx)
        self.batch_size, self.repeats, self.warmup = batch_size, repeats, warmup
        self.entries = dict(self._read().get(self.device, {}))
        self.measured = 0  # measurements taken by this object (cache misses)

    def _read(self):
        if not os.path.exists(self.path):
            return {}
        try:
            with open(self.path) as f:
                data = json.load(f)
            if data.get("version") != self.VERSION:
                raise ValueError(f"version {data.get('version')!r}, this dsonas writes {self.VERSION}")
            return data["devices"]
        except (ValueError, KeyError, AttributeError) as e:
            raise ConfigError(f"latency cache {self.path} is unreadable ({e}); "
                              "delete it to re-measure") from None

    def key(self, op, channels, resolution, bn_scale=False, sep_repeats=1):
        return f"{op}|c{channels}|r{resolution}|b{self.batch_size}|bn{int(bool(bn_scale))}|sr{sep_repeats}"

    def op_latency(self, op, channels, resolution, bn_scale=False, sep_repeats=1):
        """Latency (ms) of candidate `op` on a (batch, channels, resolution, resolution) input."""
        k = self.key(op, channels, resolution, bn_scale, sep_repeats)
        if k not in self.entries:
            from dsonas.ops import OPS, set_depthwise_split

            block = OPS[op](channels, bn_scale, sep_repeats)
            set_depthwise_split(block, False)  # as deployed (network.deploy_net)
            shape = (self.batch_size, channels, resolution, resolution)
            self.entries[k] = measure_latency(block, shape, self.ctx, self.repeats, self.warmup)
            self.measured += 1
            self.save()
        return self.entries[k]

    def op_costs(self, spec, channels, resolution, bn_scale=False):
        """Per op slot latency (ms), shape (spec.num_op_slots,): same layout as `op_costs`."""
        per_op = [self.op_latency(op, channels, resolution, bn_scale, spec.sep_repeats) for op in spec.ops]
        return np.tile(np.asarray(per_op, dtype=np.float64), spec.levels)

    def save(self):
        devices = self._read()
        devices[self.device] = {**devices.get(self.device, {}), **self.entries}
        atomic_write_json(self.path, {"version": self.VERSION, "devices": devices})


# ---------------------------------------------------------------------------------------- width solver
@dataclass(frozen=True)
class WidthSolution:
    """A met budget: the width multiplier, the channel divisor the widths are rounded to, the cost reached."""

    width_mult: float
    channel_divisor: int | None
    cost: float


def _cost_fn(build_fn, metric, input_shape, ctx):
    """cost(w) of `build_fn(w)` in `metric`; each width is built and counted (or timed) once."""

    @functools.cache
    def cost(w):
        net = build_fn(w)
        if metric == "latency":
            return measure_latency(net, input_shape, ctx)
        return getattr(count(net, input_shape), metric)

    return cost


def _nearest_width(cost, target, lo, hi, tol):
    """Bisection on log(w) in [lo, hi] (every metric grows with width): the visited width whose cost is
    nearest `target`, stopping at the first within `tol`."""
    a, b = lo, hi
    best = min((lo, hi), key=lambda w: abs(cost(w) - target))
    while abs(cost(best) - target) > tol * target and b / a > 1.0 + 1e-4:
        mid = math.sqrt(a * b)
        if abs(cost(mid) - target) < abs(cost(best) - target):
            best = mid
        if cost(mid) < target:
            a = mid
        else:
            b = mid
    return best


def solve_width(build_fn, target, divisors, metric="macs", input_shape=(1, 3, 32, 32), lo=0.1, hi=4.0,
                tol=0.02, ctx=None):
    """The first channel divisor of `divisors` and width multiplier w in [lo, hi] whose net
    `build_fn(w, divisor)` costs `target` within `tol` (relative), as a WidthSolution.

    Channel counts are multiples of the divisor, so the cost is a step function of w, and a coarse
    divisor's steps can be wider than the tolerance (8 channels are half of a 16-filter stage): each
    divisor is bisected in turn until one lands, so list the preferred (coarsest) first. A target outside
    [cost at lo, cost at hi] of every divisor, or one no divisor lands on, is a BudgetError naming the
    reachable range (and the nearest cost found), so the user can pick a feasible target.
    metric: "macs" (FLOPs = 2 × MACs), "params", "mac" (memory access, elements) or "latency" (ms,
    measured on `ctx`).
    """
    if metric not in (*METRICS, "latency"):
        raise ConfigError(f"unknown cost metric {metric!r}; use one of macs, params, mac, latency")
    if target <= 0:
        raise BudgetError(f"target {metric} must be positive, got {target}")
    reach, nearest = [], []  # costs at lo and hi; (cost, width) nearest the target per divisor in range
    for divisor in divisors:
        cost = _cost_fn(lambda w, d=divisor: build_fn(w, d), metric, input_shape, ctx)
        reach += [cost(lo), cost(hi)]
        if cost(lo) * (1 - tol) <= target <= cost(hi) * (1 + tol):
            w = _nearest_width(cost, target, lo, hi, tol)
            if abs(cost(w) - target) <= tol * target:
                return WidthSolution(w, divisor, cost(w))
            nearest.append((cost(w), w))
    span = f"width multipliers {lo}..{hi} give {_fmt(min(reach), metric)}..{_fmt(max(reach), metric)}"
    if not nearest:
        raise BudgetError(f"target {_fmt(target, metric)} is out of reach: {span}; choose a target in that "
                          "range")
    c, w = min(nearest, key=lambda n: abs(n[0] - target))
    raise BudgetError(f"no width multiplier lands within {tol:.0%} of {_fmt(target, metric)}: the nearest is "
                      f"{_fmt(c, metric)} at width {w:.4f} ({span}); choose a target near that or a looser "
                      "tolerance")


def solve_width_mult(build_fn, target, metric="macs", input_shape=(1, 3, 32, 32), lo=0.1, hi=4.0, tol=0.02,
                     ctx=None):
    """`solve_width` for a net `build_fn(w)` with a single channel rounding: the width multiplier only."""
    return solve_width(lambda w, _: build_fn(w), target, (None,), metric, input_shape, lo, hi, tol,
                       ctx).width_mult


def _fmt(value, metric):
    if metric == "latency":
        return f"{value:.3f} ms"
    unit = {"macs": "M MACs", "params": "M params", "mac": "M elements of memory access"}[metric]
    return f"{value / 1e6:.4g}{unit}"


# ------------------------------------------------------------------------------------------- reporting
def zoo_net(name):
    """(net, default input side) of a GluonCV model-zoo model, built without downloading weights."""
    from gluoncv.model_zoo import get_model

    try:
        net = get_model(name, pretrained=False)
    except ValueError:
        raise ConfigError(f"unknown GluonCV model {name!r}; see gluoncv.model_zoo.get_model_list() for the "
                          "names, e.g. mobilenetv2_1.0, shufflenet_v2, resnet50_v1") from None
    return net, 32 if name.startswith("cifar") else 224


def genotype_net(path, width_mult, channel_divisor):
    """(derived net, skeleton input side) of a genotype file at `width_mult` (widths rounded to multiples
    of `channel_divisor`)."""
    from dsonas.genotype import Genotype
    from dsonas.network import deploy_net

    genotype = Genotype.load(path)
    net = deploy_net(genotype, width_mult, channel_divisor)
    return net, genotype.skeleton.input_size


def summarize(name, net, input_shape, latency_ctx=None, repeats=20):
    """One model's row for `count_flops`: name, input_shape, params, macs, mac, the G3/G4 counts
    (fragments, max_parallel, elementwise_ops, elementwise_mac, elementwise: ops per kind), and
    latency_ms if timed."""
    r = count(net, input_shape)
    if r.uncounted_ops:
        logging.getLogger("dsonas").warning("%s: no MACs rule for ops %s (counted in MAC only)", name,
                                            ", ".join(sorted(r.uncounted_ops)))
    row = {"name": name, "input_shape": list(r.input_shape), "params": r.params, "macs": r.macs, "mac": r.mac,
           "fragments": r.fragments, "max_parallel": r.max_parallel, "elementwise_ops": r.elementwise_ops,
           "elementwise_mac": r.elementwise_mac,
           "elementwise": {kind: e["ops"] for kind, e in sorted(r.elementwise.items())}}
    if latency_ctx is not None:
        row["latency_ms"] = round(measure_latency(net, input_shape, latency_ctx, repeats), 4)
    return row


def format_table(rows):
    """Side-by-side text table of `summarize` rows; FLOPs = 2 × MACs is printed next to MACs."""
    timed = any("latency_ms" in r for r in rows)
    head = ["name", "input", "params (M)", "MACs (M)", "FLOPs=2xMACs (M)", "MAC (M elem)", "fragments",
            "parallel", "elem ops", "elem MAC (M)"]
    head += ["latency (ms)"] if timed else []
    body = []
    for r in rows:
        cells = [r["name"], "x".join(map(str, r["input_shape"])), f"{r['params'] / 1e6:.3f}",
                 f"{r['macs'] / 1e6:.2f}", f"{2 * r['macs'] / 1e6:.2f}", f"{r['mac'] / 1e6:.2f}",
                 str(r["fragments"]), str(r["max_parallel"]), str(r["elementwise_ops"]),
                 f"{r['elementwise_mac'] / 1e6:.2f}"]
        if timed:
            cells.append(f"{r['latency_ms']:.3f}" if "latency_ms" in r else "-")
        body.append(cells)
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True))) for row in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
