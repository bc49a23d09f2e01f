"""Training steps that recompute each block's activations in backward instead of storing them.

Why: backward needs the intermediate maps of every op of every block. The fully connected supernet has
~120 of them per block (16 ops with their conv, BN and ReLU outputs, the level concats, the merge
concat), so at the CIFAR setting (48 filters, 8+8+8 blocks) a step at batch 16 holds ~5.5 GB, and the
paper's batch 128 would need ~45 GB. Here the forward pass runs once without recording and keeps only
each segment's input (stem, every block and reduction, the classifier head: `DsoNet.segments`); backward
then goes from the last segment to the first, re-running each one recorded from its stored input and
back-propagating the gradient of its output through it. What is held at once is the segment inputs plus
one segment's graph; the price is a second forward pass and, because a static memory plan would keep
every segment's buffers, a plain `hybridize()`: at the paper's shape 0.31 of the naive formulation's
memory at 1.6x the step time of the default (bench/README.md).

Same maths as `loop.train_step`: every segment sees the same input twice, so BN batch statistics are the
same, and MXNet updates BN running statistics in BN's backward only, which runs once per step. Float
rounding differs (gradients are summed in another order): a step agrees to ~1e-6, and a long search drifts
from the ordinary one as it would with another thread count. Gradients
of a Parameter read by several segments (a share net's λ) must be summed over the segments, so
`DsoNet.set_recompute` gives live Parameters grad_req 'add' and each step starts by zeroing them.
A segment must be deterministic: drop-path would draw different masks in the two passes (refused).
"""

from mxnet import autograd


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
        *body, head = net.segments(x.context)
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
    for segment in net.segments(x.context):
        h = h.detach()
        h.attach_grad()
        with autograd.record():
            h = segment(h)
        h.backward()
