"""Candidate operations of a block: stride 1, channel count kept, Conv-BN-ReLU order.

Every op that transforms its input ends in BatchNorm (+ ReLU), so the outputs of convolutions and poolings
have comparable scales when λ weighs them against each other. Convolutions have no bias (BN follows).
During pretrain and search BN is built with ``scale=False`` (γ_BN fixed to 1) so BN cannot undo λ.
ReLU is ``Activation(act_type='relu')``, measurably faster than ``F.relu`` on MXNet 1.9 CPUs.

Two ops end in BN without ReLU, because the architectures they come from are defined that way:
``dw_conv_3x3`` (ShuffleNet V2's depthwise layer between its two 1x1 convs) and the inverted bottlenecks
``mbconv_k{3,5}_e{3,6}`` (MobileNetV2's linear bottleneck, FPNAS's edge op: a ReLU on the projected,
narrow output loses information).
"""

import mxnet as mx
from mxnet.gluon import nn

from dsonas.space import KNOWN_OPS


def bn_relu(channels, bn_scale):
    """BatchNorm + ReLU as a list of layers, the tail of every op."""
    return [nn.BatchNorm(scale=bn_scale, in_channels=channels), nn.Activation("relu")]


def _sequential(layers):
    seq = nn.HybridSequential(prefix="")
    with seq.name_scope():
        seq.add(*layers)
    return seq


class DepthwiseConv(nn.HybridBlock):
    """kxk depthwise convolution (odd k, stride 1, 'same' padding, no bias); weight (C, 1, k, k).

    For training (split=True), kernels wider than 3 run as a sum of column groups at most 3 wide over
    width-shifted windows of the input padded in width only. Same maths and Parameter, but oneDNN 2.x
    (MXNet 1.9.1) has a JIT depthwise backward-weights kernel only for kernel widths <= 3; a 5x5 one falls
    back to a GEMM path measured 3-4x slower for the whole forward+backward (bench/README.md). Its forward
    kernel is fast, though, and the split costs ~10 small operators per 5x5 op, so inference and export use
    one plain convolution (split=False, see set_depthwise_split).
    """

    def __init__(self, channels, kernel, split=True, **kwargs):
        super().__init__(**kwargs)
        self.channels, self.kernel, self.split = channels, kernel, split
        self.weight = self.params.get("weight", shape=(channels, 1, kernel, kernel))

    def hybrid_forward(self, F, x, weight):
        k, c, pad = self.kernel, self.channels, self.kernel // 2
        conv = dict(num_filter=c, num_group=c, no_bias=True)
        if k <= 3 or not self.split:
            return F.Convolution(x, weight, kernel=(k, k), pad=(pad, pad), **conv)
        padded = F.pad(x, mode="constant", pad_width=(0, 0, 0, 0, 0, 0, pad, pad))
        out = []
        for begin in range(0, k, 3):
            width = min(3, k - begin)  # the last group may be narrower (a 5x5 kernel: widths 3 and 2)
            w = F.slice_axis(weight, axis=3, begin=begin, end=begin + width)
            right = k - begin - width  # padded columns beyond this group's window
            window = F.slice_axis(padded, axis=3, begin=begin, end=-right if right else None)
            out.append(F.Convolution(window, w, kernel=(k, width), pad=(pad, 0), **conv))
        return F.add_n(*out)


def set_depthwise_split(block, split):
    """Every DepthwiseConv in `block` trained as column groups (split=True) or run as one convolution."""
    block.apply(lambda b: setattr(b, "split", split) if isinstance(b, DepthwiseConv) else None)


def set_pool_layout_conv(block, on):
    """Every Pool in `block` reading its input through its layout convolution (on=True) or directly."""
    block.apply(lambda b: setattr(b, "layout_conv", on) if isinstance(b, Pool) else None)


def sep_conv(channels, kernel, bn_scale, repeats):
    """(depthwise kxk -> pointwise 1x1 -> BN -> ReLU) x repeats."""
    layers = []
    for _ in range(repeats):
        layers += [
            DepthwiseConv(channels, kernel),
            nn.Conv2D(channels, 1, use_bias=False, in_channels=channels),
            *bn_relu(channels, bn_scale),
        ]
    return _sequential(layers)


def dw_conv(channels, kernel, bn_scale):
    """kxk depthwise conv + BN, no ReLU (ShuffleNet V2's middle layer)."""
    return _sequential([DepthwiseConv(channels, kernel), nn.BatchNorm(scale=bn_scale, in_channels=channels)])


def mbconv(channels, kernel, expand, bn_scale):
    """Inverted bottleneck (MobileNetV2, FPNAS §3.1): 1x1 expand to `expand` x channels + BN + ReLU,
    kxk depthwise + BN + ReLU, 1x1 project back + BN (linear: no ReLU).

    ReLU rather than MobileNetV2's ReLU6: the cap only helps low-precision inference, and ReLU is the
    faster kernel here (see the module doc).
    """
    wide = channels * expand
    return _sequential([
        nn.Conv2D(wide, 1, use_bias=False, in_channels=channels), *bn_relu(wide, bn_scale),
        DepthwiseConv(wide, kernel), *bn_relu(wide, bn_scale),
        nn.Conv2D(channels, 1, use_bias=False, in_channels=wide),
        nn.BatchNorm(scale=bn_scale, in_channels=channels),
    ])


class Pool(nn.HybridBlock):
    """3x3 stride-1 max or average pooling (average ignores the zero padding at the borders); with
    layout_conv=True it reads its input through a 1x1 depthwise convolution with unit weights, as the
    pools of a searchable block do (MaskedBlock turns it on).

    Why the convolution: the op inputs the λ mixing hands out are views in oneDNN's plain NCHW layout, and
    oneDNN 2.x (MXNet 1.9.1) pools plain data with a slow kernel. On an AVX2 CPU (AMD EPYC), 16x48x32x32:
    a 3x3 max pool took 60-66 ms forward or forward+backward, the same pool behind the unit convolution
    (whose output oneDNN lays out blocked) 5-10 ms; at batch 1, inference, 4.5 vs 0.4 ms (bench/README.md).
    On the AVX-512 Intel CPU of earlier measurements the same trick was within noise; on a GPU it costs one
    pass over the map. x * 1 is exact, so outputs and gradients are the pool's; the convolution has no
    Parameter and the cost model counts it as a free layout change (dsonas.cost). Derived blocks go
    without it: their pool inputs are sums of maps oneDNN already holds blocked, and there it only cost
    time (a derived ImageNet net at inference, batch 1: 37-40 vs 27-33 ms; a derived CIFAR net's training
    step: 2476 vs 2360 ms; bench/README.md).
    """

    def __init__(self, kind, channels, layout_conv=False, **kwargs):
        super().__init__(**kwargs)
        self.kind, self.channels, self.layout_conv = kind, channels, layout_conv

    def hybrid_forward(self, F, x):
        c = self.channels
        if self.layout_conv:  # an NDArray needs its device; a graph node runs on the graph's
            device = {"ctx": x.context} if isinstance(x, mx.nd.NDArray) else {}
            unit = F.ones((c, 1, 1, 1), **device)
            x = F.Convolution(x, unit, kernel=(1, 1), num_filter=c, num_group=c, no_bias=True, name="layout")
        return F.Pooling(x, kernel=(3, 3), stride=(1, 1), pad=(1, 1), pool_type=self.kind,
                         count_include_pad=False)


def pool(kind, bn_scale, channels):
    """3x3 stride-1 pooling (see Pool) + BN + ReLU."""
    return _sequential([Pool(kind, channels), *bn_relu(channels, bn_scale)])


def conv_1x1(channels, bn_scale):
    return _sequential([nn.Conv2D(channels, 1, use_bias=False, in_channels=channels),
                        *bn_relu(channels, bn_scale)])


class Identity(nn.HybridBlock):
    """Pass-through (ShuffleNASNet's `identity` op)."""

    def hybrid_forward(self, F, x):
        return x


# name -> factory(channels, bn_scale, sep_repeats) -> HybridBlock
OPS = {
    "sep_conv_3x3": lambda c, bn_scale, sep_repeats: sep_conv(c, 3, bn_scale, sep_repeats),
    "sep_conv_5x5": lambda c, bn_scale, sep_repeats: sep_conv(c, 5, bn_scale, sep_repeats),
    "avg_pool_3x3": lambda c, bn_scale, sep_repeats: pool("avg", bn_scale, c),
    "max_pool_3x3": lambda c, bn_scale, sep_repeats: pool("max", bn_scale, c),
    "identity": lambda c, bn_scale, sep_repeats: Identity(),
    "conv_1x1": lambda c, bn_scale, sep_repeats: conv_1x1(c, bn_scale),
    "dw_conv_3x3": lambda c, bn_scale, sep_repeats: dw_conv(c, 3, bn_scale),
    **{f"mbconv_k{k}_e{e}": (lambda c, bn_scale, sep_repeats, k=k, e=e: mbconv(c, k, e, bn_scale))
       for k in (3, 5) for e in (3, 6)},
}
assert set(OPS) == set(KNOWN_OPS), "dsonas.space.KNOWN_OPS and dsonas.ops.OPS must list the same ops"


def make_op(name, channels, bn_scale, sep_repeats, prefix):
    """Build op `name` under the parameter-name prefix `prefix` (stable names let a rebuilt block reuse
    the same Parameters)."""
    wrapper = nn.HybridSequential(prefix=prefix)
    with wrapper.name_scope():
        wrapper.add(OPS[name](channels, bn_scale, sep_repeats))
    return wrapper
