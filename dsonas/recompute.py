"""Training steps that recompute each block's activations in backward instead of storing them.

Why: backward needs the intermediate maps of every op of every block. The fully connected supernet has
~120 of them per block (16 ops with their conv, BN and ReLU outputs, the level concats, the merge
concat), so at the CIFAR setting (48 filters, 8+8+8 blocks) a step at batch 16 holds ~5.5 GB, and the
paper's batch 128 would need ~45 GB. Here the forward pass runs once without recording and keeps only
each segment's input (stem, every block and reduction, the classifier head: `DsoNet.segments`); backward
then goes from the last segment to the first, re-running each one recorded from its stored input and
back-propagating the gradient of its output through it. What is held at once is the segment inputs plus
one segment's graph; the price is a second forward pass.

The segments run as CachedOps of their own (`SegmentGraphs`), not through the net's hybridization. A
graph allocated afresh on every call (a plain `hybridize()`) pays for its buffers in both passes of
each of the 27 segments at the paper's shape, and a static memory plan per segment would keep all of
them (the default's memory). The blocks of a stage have the same graph, so one static CachedOp runs all
of them, and backward visits the segments stage by stage: only the graph in use is kept, allocated once
per stage and step.

Same maths as `loop.train_step`: every segment sees the same input twice, so BN batch statistics are the
same, and MXNet updates BN running statistics in BN's backward only, which runs once per step. Float
rounding differs (gradients are summed in another order): a step agrees to ~1e-6, and a long search drifts
from the ordinary one as it would with another thread count. Gradients
of a Parameter read by several segments (a share net's λ) must be summed over the segments, so
`DsoNet.set_recompute` gives live Parameters grad_req 'add' and each step starts by zeroing them.
A segment must be deterministic: drop-path would draw different masks in the two passes (refused).
"""

import json

import mxnet as mx
from mxnet import autograd

_DATA = "data"
_LAMBDA = "__lambda{}__"


def _signature(symbol, prefix):
    """The graph of `symbol` with its Parameters named relative to `prefix`: equal for two layers built
    alike (the blocks of a stage), whose names differ only in their prefix."""
    nodes = json.loads(symbol.tojson())["nodes"]
    return json.dumps([(n["op"], n.get("attrs", {}), n["inputs"],
                        n["name"].removeprefix(prefix) if n["op"] == "null" else "") for n in nodes])


class SegmentGraphs:
    """The segments of a DsoNet in recompute mode, each run through a CachedOp shared by every segment
    with the same graph.

    The unrecorded forward pass uses plain CachedOps (buffers freed as the pass goes). A recorded call
    uses a static_alloc one, and only the latest such graph is kept: backward runs the segments from the
    last to the first, so a stage's blocks reuse one allocation and the next stage's graph replaces it.
    `clear` (DsoNet._clear_cached_ops: a mask, kernel split or drop-path change) drops every trace.
    """

    def __init__(self, net):
        self.net = net
        self.clear()

    def clear(self):
        self._traces = {}        # id(layer) -> _trace's (symbol, signature, sources)
        self._plain = {}         # signature -> CachedOp without static buffers
        self._recorded = (None, None)  # (signature, static CachedOp): the one recorded graph kept

    @property
    def num_graphs(self):
        """Distinct graphs among the segments traced so far."""
        return len({trace[1] for trace in self._traces.values()})

    def segments(self, ctx):
        """Like `DsoNet.segments`: callables h -> h, the net's segments in order, then its head."""
        return [lambda h, layer=layer, lams=lams: self._run(layer, lams, h, ctx)
                for layer, lams in self.net.segment_layers()] + [self.net._classify]

    def _trace(self, layer, lams):
        """(symbol, signature, sources): `sources` gives, per input of the symbol, None for the data or
        the Parameter to read."""
        if id(layer) not in self._traces:
            names = [_LAMBDA.format(i) for i in range(len(lams))]
            symbol = layer(mx.sym.var(_DATA), *[mx.sym.var(name) for name in names])
            params = {p.name: p for p in layer.collect_params().values()}
            params.update(zip(names, lams, strict=True))
            sources = [None if name == _DATA else params[name] for name in symbol.list_inputs()]
            self._traces[id(layer)] = (symbol, _signature(symbol, layer.prefix), sources)
        return self._traces[id(layer)]

    def _op(self, symbol, signature):
        if not autograd.is_recording():
            if signature not in self._plain:
                self._plain[signature] = mx.nd.CachedOp(symbol)
            return self._plain[signature]
        if self._recorded[0] != signature:
            self._recorded = (None, None)  # free the previous graph's buffers before allocating these
            self._recorded = (signature, mx.nd.CachedOp(symbol, [("static_alloc", True)]))
        return self._recorded[1]

    def _run(self, layer, lams, h, ctx):
        symbol, signature, sources = self._trace(layer, lams)
        return self._op(symbol, signature)(*[h if p is None else p.data(ctx) for p in sources])


def forward_backward(net, loss_fn, xs, ys):
    """Forward and backward of `net` (a DsoNet in recompute mode) on every device slice.

    Returns (outputs, losses) per slice, as `autograd.record` + `autograd.backward` would leave them,
    with the Parameters' gradients accumulated.
    """
    for param in net.collect_params().values():
        if param.grad_req != "null":
            param.zero_grad()
    outputs, losses = [], []
    for x, y in zip(xs, ys, strict=True):
        *body, head = net.segment_graphs.segments(x.context)
        inputs, h = [], x
        with autograd.train_mode():  # training-mode forward, nothing recorded
            for segment in body:
                inputs.append(h)
                h = segment(h)
        h.attach_grad()
        with autograd.record():
            out = head(h)
            loss = loss_fn(out, y)
        loss.backward()
        grad = h.grad
        for index in range(len(body) - 1, -1, -1):
            if index == 0 and not any(p.grad_req != "null" for p in net.stem.collect_params().values()):
                break  # the stem (segment 0) reads the data only: nothing to differentiate (a λ step)
            h = inputs[index]
            if index > 0:  # the data batch itself needs no gradient
                h.attach_grad()
            with autograd.record():
                h_out = body[index](h)
            h_out.backward(grad)
            grad = h.grad if index > 0 else None
            inputs[index] = None  # free the stored input as soon as its segment is done
        outputs.append(out)
        losses.append(loss)
    return outputs, losses


def bn_statistics_pass(net, x):
    """Forward and backward (with respect to the input, ones as the head gradient) of each segment of
    `net` in turn, each on the previous one's output: every BN updates its running statistics (MXNet does
    that in BN's backward) while only one segment's graph is alive. For BN recalibration."""
    h = x
    for segment in net.segment_graphs.segments(x.context):
        h = h.detach()
        h.attach_grad()
        with autograd.record():
            h = segment(h)
        h.backward()
