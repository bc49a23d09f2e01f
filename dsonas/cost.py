"""Cost model: parameters, multiply-adds, memory access and measured latency.

Conventions (every figure this module prints or returns follows them):

* **params** — learnable parameters: every argument of the symbol except the input, minus BatchNorm γ
  held at 1 (`fix_gamma`, Gluon's `BatchNorm(scale=False)`). BatchNorm running mean/var are auxiliary
  states and are *not* counted; learnable γ, β are. This is the convention behind the published counts
  (GluonCV, torchvision, the papers): ResNet-50 25.6M, MobileNetV2 3.5M.
* **macs** — multiply-accumulates of the linear layers only: Convolution (grouped/depthwise via the
  weight's `Cin/groups`), Deconvolution, FullyConnected, dot, batch_dot. Biases, BN, pooling, activations
  and elementwise ops add no MACs, as in the published figures (MobileNet 569M, ResNet-50 4.1G).
  **FLOPs = 2 × MACs**; wherever both appear they are labelled.
* **mac** — memory access cost in the ShuffleNet V2 sense (G1-G4), in *elements* (×4 for fp32 bytes):
  per layer, every input feature map read + every output written + every weight/state read, assuming a
  cache that holds a whole layer. Pure views (Reshape, Flatten, Dropout at inference, ...) are free;
  slicing reads only what it keeps; Concat, transposes and elementwise ops pay read + write (G4).

Everything is counted on the symbol graph with shapes from `infer_shape`, so it works for any
hybridizable Gluon net (hybridized or not; Gluon forward hooks would not fire inside a hybridized
graph) and for exported symbols. Costs are for the whole input batch; params do not depend on it.
"""

import functools
import json
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

    @property
    def flops(self):
        """FLOPs = 2 × MACs (one multiply and one add per MAC)."""
        return 2 * self.macs

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
    for nid, node in enumerate(nodes):
        op = node["op"]
        if op == "null":
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
        layers.append(LayerCost(node["name"], op, _node_macs(op, attrs, in_shapes, outs), mac, params,
                                outs[0]))
    return CostReport(params=sum(lc.params for lc in layers), macs=sum(lc.macs for lc in layers),
                      mac=sum(lc.mac for lc in layers), layers=layers, input_shape=input_shape,
                      uncounted_ops=frozenset(uncounted))


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
    """Median wall time (ms) of one forward pass at `input_shape`, hybridized with static memory.

    The median of `repeats` timed passes after `warmup` untimed ones: robust to the odd slow pass of a
    shared machine. Uninitialized parameters get the default initializer (timing does not care).
    """
    import mxnet as mx

    ctx = ctx or mx.cpu()
    x = mx.nd.random.uniform(shape=input_shape, ctx=ctx)
    params = net.collect_params()
    for p in params.values():
        try:
            p.list_ctx()
        except RuntimeError:  # never initialized
            p.initialize(ctx=ctx)
    params.reset_ctx(ctx)
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
    (`{"version": 1, "devices": {device: {key: ms}}}`, written atomically after every new measurement,
    merged with whatever another process wrote meanwhile). A cached entry is never re-measured.
    """

    VERSION = 1

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
                raise ValueError(f"version {data.get('version')!r}")
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
            from dsonas.ops import OPS

            block = OPS[op](channels, bn_scale, sep_repeats)
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
def solve_width_mult(build_fn, target, metric="macs", input_shape=(1, 3, 32, 32), lo=0.1, hi=4.0, tol=0.02,
                     ctx=None):
    """The width multiplier w in [lo, hi] whose net `build_fn(w)` costs `target` within `tol` (relative).

    Bisection on log(w): every metric here grows with width. Channel counts are integers, so the cost is
    a step function of w; if no step lands within `tol` of the target, or the target lies outside what
    [lo, hi] can reach, a BudgetError names the reachable range so the user can pick a feasible target.
    metric: "macs" (FLOPs = 2 × MACs), "params", "mac" (memory access, elements) or "latency" (ms,
    measured on `ctx`).
    """
    if metric not in (*METRICS, "latency"):
        raise ConfigError(f"unknown cost metric {metric!r}; use one of macs, params, mac, latency")
    if target <= 0:
        raise BudgetError(f"target {metric} must be positive, got {target}")

    @functools.cache
    def cost(w):
        net = build_fn(w)
        if metric == "latency":
            return measure_latency(net, input_shape, ctx)
        return getattr(count(net, input_shape), metric)

    def close(c):
        return abs(c - target) <= tol * target

    c_lo, c_hi = cost(lo), cost(hi)
    if not c_lo * (1 - tol) <= target <= c_hi * (1 + tol):
        raise BudgetError(f"target {_fmt(target, metric)} is out of reach: width multipliers {lo}..{hi} give "
                          f"{_fmt(c_lo, metric)}..{_fmt(c_hi, metric)}; choose a target in that range")
    a, b = lo, hi
    best = min((lo, hi), key=lambda w: abs(cost(w) - target))
    while not close(cost(best)) and b / a > 1.0 + 1e-4:
        mid = math.sqrt(a * b)
        if abs(cost(mid) - target) < abs(cost(best) - target):
            best = mid
        if cost(mid) < target:
            a = mid
        else:
            b = mid
    if not close(cost(best)):
        raise BudgetError(f"no width multiplier lands within {tol:.0%} of {_fmt(target, metric)}: the "
                          f"nearest is {_fmt(cost(best), metric)} at width {best:.4f}; choose a target near "
                          "that or a looser tolerance")
    return best


def _fmt(value, metric):
    if metric == "latency":
        return f"{value:.3f} ms"
    unit = {"macs": "M MACs", "params": "M params", "mac": "M elements of memory access"}[metric]
    return f"{value / 1e6:.4g}{unit}"
