"""ShuffleNet V2 units around masked blocks: the shuffle skeletons (ShuffleNASNets §III-B, ShuffleNet V2 §3).

* **Basic unit** (stride 1, ``c`` channels): channel split into two halves; the block runs on the first
  half, the second half passes through untouched; concat; channel shuffle with 2 groups, so the next
  unit's block sees half of this block's output and half of the bypassed channels.
* **Downsampling unit** (stride 2, ``c_in -> c_out``): no split, both paths read all channels and each
  produces ``c_out / 2``. The block path starts with ShuffleNet V2's own entry: 1x1 conv ``c_in -> c_out/2``
  + BN + ReLU, then 3x3 depthwise stride 2 + BN; the block follows at stride 1. ShuffleNet V2's down
  branch is exactly entry + ``conv_1x1``, so its genotype gives down units that one-op mask. The other
  path is a *bypass* (ShuffleNASNets §IV-E), one of `BYPASSES`:

  - ``factorized``: ENAS's factorized reduction, two 1x1 stride-2 convs (``c_out/4`` outputs each) on
    the input and on the input shifted by one pixel diagonally, concatenated, BN. ShuffleNASNet's choice
    (fewest params, fastest, most accurate on CIFAR) and the shuffle_cifar default.
  - ``sep_conv_3x3_x2``: two stacked depthwise-separable 3x3 convs (dw + BN, 1x1 + BN + ReLU), the
    first with stride 2.
  - ``shufflenet_v2``: one such separable conv: ShuffleNet V2's bypass, the shuffle_imagenet default.
  - ``reduction``: DSO-NAS's reduction block (1x1 and 3x3 stride-2 convs with BN, summed).

A block inside a unit has no residual add: the bypassed half already is the skip path (and a
ShuffleNASNet cell outputs the sum of its ops). `cell_bn` adds ShuffleNASNets' optional BatchNorm after
that sum (§IV-D). The network puts it exactly where a cell sums two or more ops unless told otherwise:
a sum of k normalized maps (identities included) has about k times their scale, and through a stack of
units that compounds geometrically. Measured on configs/shuffle_default.yaml: without it the supernet's
pretraining reached loss 1e19 after one epoch and NaN in the second, and a searched 16-op cell retrained
to a test loss of 3e7. A single-output cell (ShuffleNet V2's branch ends in conv-BN-ReLU) needs none.

The channel shuffle uses only ONNX-exportable reshapes: codes 0 (copy) and -1 (infer), a swap of two
axes, and `reshape_like` back to the input's shape (no -3/-4 split/merge codes).
"""

from mxnet.gluon import nn

from dsonas.block import PrunableBlock, ReductionBlock
from dsonas.errors import ConfigError
from dsonas.ops import bn_relu
from dsonas.space import BYPASSES

IMAGENET_STEM, IMAGENET_HEAD = 24, 1024  # ShuffleNet V2 Table 5 (the 0.5x-1.5x models)


def channel_shuffle(F, x, channels, groups=2):
    """Channel ``g * (channels/groups) + i`` of `x` moves to ``i * groups + g`` (ShuffleNet's shuffle).

    ``channel_shuffle(F, y, channels, channels // groups)`` is the inverse.
    """
    grouped = F.reshape(x, shape=(0, groups, channels // groups, -1))
    return F.reshape_like(F.swapaxes(grouped, dim1=1, dim2=2), x)


def _seq(prefix, layers):
    seq = nn.HybridSequential(prefix=prefix)
    with seq.name_scope():
        seq.add(*layers)
    return seq


def _dw3x3(channels, stride, bn_scale):
    """3x3 depthwise conv (any stride) + BN, no ReLU."""
    return [nn.Conv2D(channels, 3, strides=stride, padding=1, groups=channels, use_bias=False,
                      in_channels=channels), nn.BatchNorm(scale=bn_scale, in_channels=channels)]


def dw_separable(in_channels, out_channels, repeats, bn_scale, prefix="bypass_"):
    """`repeats` x (3x3 depthwise + BN, 1x1 conv + BN + ReLU), the first depthwise with stride 2."""
    layers, c = [], in_channels
    for r in range(repeats):
        layers += [*_dw3x3(c, 2 if r == 0 else 1, bn_scale),
                   nn.Conv2D(out_channels, 1, use_bias=False, in_channels=c),
                   *bn_relu(out_channels, bn_scale)]
        c = out_channels
    return _seq(prefix, layers)


class FactorizedReduce(nn.HybridBlock):
    """ENAS's factorized reduction: stride-2 1x1 convs on the even and on the odd pixel grid, concatenated.

    Output ``(N, out_channels, ceil(H/2), ceil(W/2))``; the first conv has ``out_channels // 2`` filters,
    the second the rest; one BN over the concat. The odd grid is read by shifting the input one pixel up
    and left (zero padding at the bottom/right), so both halves have the same size for any H, W.
    Params: ``in_channels * out_channels`` weights + BN.
    """

    def __init__(self, in_channels, out_channels, bn_scale, **kwargs):
        super().__init__(**kwargs)
        first = out_channels // 2
        with self.name_scope():
            self.conv_even = nn.Conv2D(first, 1, strides=2, use_bias=False, in_channels=in_channels)
            self.conv_odd = nn.Conv2D(out_channels - first, 1, strides=2, use_bias=False,
                                      in_channels=in_channels)
            self.bn = nn.BatchNorm(scale=bn_scale, in_channels=out_channels)

    def hybrid_forward(self, F, x):
        padded = F.pad(x, mode="constant", pad_width=(0, 0, 0, 0, 0, 1, 0, 1))
        shifted = F.slice(padded, begin=(None, None, 1, 1), end=(None, None, None, None))
        return self.bn(F.concat(self.conv_even(x), self.conv_odd(shifted), dim=1))


def make_bypass(kind, in_channels, out_channels, bn_scale):
    """The bypass path of a downsampling unit: `in_channels` -> `out_channels` at stride 2."""
    if kind == "factorized":
        return FactorizedReduce(in_channels, out_channels, bn_scale, prefix="bypass_")
    if kind == "sep_conv_3x3_x2":
        return dw_separable(in_channels, out_channels, 2, bn_scale)
    if kind == "shufflenet_v2":
        return dw_separable(in_channels, out_channels, 1, bn_scale)
    if kind == "reduction":
        return ReductionBlock(in_channels, out_channels, bn_scale, prefix="bypass_")
    raise ConfigError(f"bypass: unknown kind {kind!r}; use one of {', '.join(BYPASSES)}")


class ShuffleUnit(PrunableBlock):
    """One ShuffleNet V2 unit around `cell` (a MaskedBlock of ``out_channels // 2`` channels, no residual).

    stride 1 (``in_channels == out_channels``): split / cell on the first half / concat / shuffle.
    stride 2: entry (1x1 conv + BN + ReLU, 3x3 depthwise stride 2 + BN) then cell, beside `bypass`;
    concat / shuffle. Searchable cells take their λ as extra inputs: ``unit(x, *lams)``.
    """

    def __init__(self, in_channels, out_channels, stride, cell, bn_scale, bypass=None, cell_bn=False,
                 **kwargs):
        super().__init__(**kwargs)
        if out_channels % 2 or (stride == 1 and in_channels != out_channels):
            raise ValueError(f"bad unit widths {in_channels} -> {out_channels} at stride {stride}")
        self.out_channels, self.stride = out_channels, stride
        half = out_channels // 2
        self.cell = cell
        with self.name_scope():
            self.entry = self.bypass = self.cell_bn = None
            if stride == 2:
                self.entry = _seq("entry_", [nn.Conv2D(half, 1, use_bias=False, in_channels=in_channels),
                                             *bn_relu(half, bn_scale), *_dw3x3(half, 2, bn_scale)])
                self.bypass = make_bypass(bypass, in_channels, half, bn_scale)
            if cell_bn:
                self.cell_bn = nn.BatchNorm(scale=bn_scale, in_channels=half, prefix="cellbn_")

    def hybrid_forward(self, F, x, *lams):
        if self.stride == 1:
            half = self.out_channels // 2
            h = F.slice_axis(x, axis=1, begin=0, end=half)
            other = F.slice_axis(x, axis=1, begin=half, end=self.out_channels)
        else:
            h, other = self.entry(x), self.bypass(x)
        h = self.cell(h, *lams)
        if self.cell_bn is not None:
            h = self.cell_bn(h)
        return channel_shuffle(F, F.concat(h, other, dim=1), self.out_channels)


def stem(kind, channels, bn_scale):
    """shuffle_cifar: 3x3 conv to the stage-1 width + BN + ReLU (stride 1). shuffle_imagenet: ShuffleNet
    V2's 3x3 conv stride 2 to 24 channels + BN + ReLU, 3x3 max-pool stride 2."""
    if kind == "shuffle_cifar":
        return _seq("stem_", [nn.Conv2D(channels, 3, padding=1, use_bias=False, in_channels=3),
                              *bn_relu(channels, bn_scale)])
    return _seq("stem_", [nn.Conv2D(IMAGENET_STEM, 3, strides=2, padding=1, use_bias=False, in_channels=3),
                          *bn_relu(IMAGENET_STEM, bn_scale), nn.MaxPool2D(3, strides=2, padding=1)])


def stem_channels(kind, first_width):
    return first_width if kind == "shuffle_cifar" else IMAGENET_STEM


def head(kind, channels, bn_scale):
    """(layers before global pooling or None, their output width): ShuffleNet V2's 1x1 conv to 1024 + BN +
    ReLU on shuffle_imagenet; None on shuffle_cifar (every unit already ends in ReLU or BN outputs). Not an
    empty Sequential: hybridized on its own (dsonas.recompute) its output would be its input, unrecorded,
    and backward would stop there."""
    if kind == "shuffle_cifar":
        return None, channels
    return _seq("head_", [nn.Conv2D(IMAGENET_HEAD, 1, use_bias=False, in_channels=channels),
                          *bn_relu(IMAGENET_HEAD, bn_scale)]), IMAGENET_HEAD


def unit_strides(kind, stages):
    """Stride of every unit: 2 for a stage's first unit (not stage 1's on shuffle_cifar), else 1."""
    return [2 if i == 0 and (s > 0 or kind == "shuffle_imagenet") else 1
            for s, count in enumerate(stages) for i in range(count)]


def shufflenet_v2_genotype(kind="shuffle_imagenet", filters=116, stages=(4, 8, 4), num_classes=1000,
                           input_size=224):
    """ShuffleNet V2 as a genotype over the `shufflenet_v2` op set (levels 3: conv_1x1, dw_conv_3x3).

    Basic units: conv_1x1 (slot 0) -> dw_conv_3x3 (slot 3) -> conv_1x1 (slot 4), the output. Down units:
    conv_1x1 alone, after the unit's entry (1x1 conv, 3x3 depthwise stride 2), which completes ShuffleNet
    V2's down branch. Defaults: the 1.0x ImageNet model (stage widths 116, 232, 464).
    """
    from dsonas.genotype import BlockMask, Genotype
    from dsonas.space import OP_SETS, BlockSpec, Skeleton

    spec = BlockSpec(levels=3, ops=OP_SETS["shufflenet_v2"], merge="sum")
    skeleton = Skeleton(kind, filters, tuple(stages), num_classes, input_size)
    basic = BlockMask(inputs=((0,), (), (), (1,), (4,), ()), outputs=(4,))
    down = BlockMask(inputs=((0,),) + ((),) * 5, outputs=(0,))
    masks = [down if stride == 2 else basic for stride in unit_strides(kind, skeleton.stages)]
    return Genotype(skeleton=skeleton, spec=spec, shared=False, masks=masks)
