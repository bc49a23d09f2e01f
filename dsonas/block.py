"""The masked block (supernet and derived nets are the same class) and the reduction block.

Node 0 is the block input, node o+1 the output of op slot o (see dsonas.space). The op of slot o reads
the sum of its input nodes, weighted by λ in the searchable block (Eq. 3); the block output merges the
outputs listed in the mask (concat + 1x1 conv, Eq. 4, or sum), weighted by λ_out when searchable, plus
the block input (unless built with residual=False: in a ShuffleNet V2 unit the untouched half of the
channels is the skip path, and a ShuffleNASNet cell outputs the plain sum of its ops).

Two formulations of the searchable block compute the same function with the same Parameters:

* ``fast``: a level's mixing is ONE 1x1 convolution. Each node becomes a (B, 1, C, H, W) column once per
  block (`_columns`); a level concatenates its K candidate columns, views them as (B, K, C*H, W) and
  convolves them with the level's (ops x K) λ matrix as a 1x1 kernel, giving every op's input at once;
  its backward is two oneDNN kernels instead of one slow reduction kernel per edge. This beat stacking
  on a new axis + ``dot`` by 1.2-1.5x on the mixing alone, and the per-op inputs are contiguous channel
  groups of the result. (Viewing each level's channel concat instead, which oneDNN holds blocked, cost a
  reorder and a copy of all K maps at every level: 4-9% of the paper-shape step, bench/README.md.)
  The concat merge scales the 1x1 conv's *weight* by λ_out per input-channel group
  (Σ_o W_o (λ_o h_o) = Σ_o (λ_o W_o) h_o), which costs a few thousand multiplies instead of a pass over
  every activation; the sum merge is one product.
* ``naive``: one ``broadcast_mul`` per edge and ``add_n`` (the published implementation's way), kept for
  the benchmark and the equivalence test.

A pruned mask builds only its live ops. λ sub-matrices are cut with slices (never index arrays: those
would have to be Constant parameters, renamed whenever the mask changes), and λ of pruned edges that
share a row with live ones are replaced by exact zeros, so they receive no gradient.
"""

import warnings

from mxnet.gluon import nn

from dsonas.genotype import check_mask
from dsonas.ops import make_op, set_pool_layout_conv

FORMULATIONS = ("fast", "naive")


def _runs(indices):
    """Sorted integers -> list of (begin, end) ranges of consecutive values."""
    runs = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [tuple(r) for r in runs]


def _take(F, data, axis, indices, size):
    """`data` restricted to the sorted `indices` along `axis` (of length `size`), by slicing."""
    runs = _runs(indices)
    if runs == [(0, size)]:
        return data
    parts = [F.slice_axis(data, axis=axis, begin=b, end=e) for b, e in runs]
    return parts[0] if len(parts) == 1 else F.concat(*parts, dim=axis)


def _sum(F, xs):
    return xs[0] if len(xs) == 1 else F.add_n(*xs)


def _scalar(F, lam, index):
    """λ[index] shaped (1, 1, 1, 1) to broadcast over an NCHW tensor (naive formulation)."""
    return F.reshape(F.slice(lam, begin=index, end=tuple(i + 1 for i in index)), shape=(1, 1, 1, 1))


def _columns(F, nodes, keys, columns):
    """The maps `nodes[k]` for k in `keys`, each as a (B, 1, C, H, W) column, made once per node.

    One column serves every level that reads the node, so each node is turned plain once per block, not
    once per reading level. `expand_dims` is a generic (non-oneDNN) operator: mxnet 1.9.1 runs it on a
    plain copy of a map that oneDNN holds blocked, and if the memory planner gives the column the node's
    buffer, the output goes through a temporary too, so the node's layout is never touched. A oneDNN
    reshape of the node would reorder a buffer that other ops read, in place (it gave wrong hybridized
    gradients in an earlier variant, bench/README.md).
    """
    for k in keys:
        if k not in columns:
            columns[k] = F.expand_dims(nodes[k], axis=1)
    return [columns[k] for k in keys]


def _contract(F, matrix, rows, columns, channels):
    """[Σ_k matrix[n, k] * columns[k] for n < rows]: a list of `rows` (B, C, H, W) maps (fast formulation).

    The K columns (see `_columns`) are concatenated along their unit axis and viewed as K channels of a
    (C*H, W) image, so the contraction is one 1x1 convolution whose (rows, K) weight is `matrix`.
    """
    k = len(columns)
    data = columns[0] if k == 1 else F.concat(*columns, dim=1)  # (B, K, C, H, W)
    data = F.reshape(data, shape=(0, 0, -3, 0))  # (B, K, C*H, W)
    mixed = F.Convolution(data, F.reshape(matrix, shape=(rows, k, 1, 1)), kernel=(1, 1), num_filter=rows,
                          no_bias=True)
    mixed = F.reshape(mixed, shape=(0, rows * channels, -1, 0))  # (B, rows*C, H, W)
    if rows == 1:
        return [mixed]
    return list(F.split(mixed, num_outputs=rows, axis=1))


def _group_scale(F, lam, matrix, group):
    """A matrix shaped like `matrix` (rows, len(lam) * group) whose column block o holds lam[o].

    Built from two outer products so that the λ gradient is a GEMM: broadcast_mul's λ gradient goes
    through MXNet's generic reduction kernel, measured 7x slower on a (192, 16*192) merge weight.
    """
    ones_cols = F.ones_like(F.slice(matrix, begin=(0, 0), end=(1, group)))
    ones_rows = F.ones_like(F.slice_axis(matrix, axis=1, begin=0, end=1))
    row = F.reshape(F.dot(F.reshape(lam, shape=(-1, 1)), ones_cols), shape=(1, -1))
    return F.dot(ones_rows, row)


def _level_matrix(F, lam, shape, rows, cols, edges):
    """λ[rows][:, cols] of a level's λ (`shape`), with exact zeros where (row, col) is not a mask edge."""
    if all(set(e) == set(cols) for e in edges):
        return _take(F, _take(F, lam, 0, rows, shape[0]), 1, cols, shape[1])
    out = []
    for r, edge in zip(rows, edges, strict=True):
        row = F.slice_axis(lam, axis=0, begin=r, end=r + 1)
        segments = []  # ["edge", begin, end] over consecutive edge columns, or ["zero", count]
        for c in cols:
            if c in edge:
                if segments and segments[-1][0] == "edge" and segments[-1][2] == c:
                    segments[-1][2] = c + 1
                else:
                    segments.append(["edge", c, c + 1])
            elif segments and segments[-1][0] == "zero":
                segments[-1][1] += 1
            else:
                segments.append(["zero", 1])
        parts = [F.slice_axis(row, axis=1, begin=s[1], end=s[2]) if s[0] == "edge"
                 else F.zeros_like(F.slice_axis(row, axis=1, begin=0, end=s[1])) for s in segments]
        out.append(parts[0] if len(parts) == 1 else F.concat(*parts, dim=1))
    return out[0] if len(out) == 1 else F.concat(*out, dim=0)


class PrunableBlock(nn.HybridBlock):
    """A HybridBlock that keeps the Parameters of pruned ops (so optimizer states stay aligned).

    Gluon warns about every Parameter outside a traced graph; after a mask shrinks that is expected, so
    tracing silences just that warning (the net, and each block when dsonas.recompute traces it alone).
    """

    def _build_cache(self, *args):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Parameter .* is not used by any computation")
            return super()._build_cache(*args)


class MaskedBlock(PrunableBlock):
    """One block of `spec` at `channels` channels, restricted to `mask`.

    searchable=True: ``block(x, *lams)`` with lams in ``spec.lambda_keys()`` order (in2 .. in{M}, out).
    The λ Parameters belong to the network, so a `share` net passes the same ones to every block.
    Level-1 ops read the block input directly (no λ: see dsonas.space). The concat merge's 1x1 conv
    keeps its full (C, M*N*C) weight whatever the mask, so `set_mask` can shrink the block in place.
    searchable=False: the derived block, no λ at all: op inputs are summed, the 1x1 conv only sees the
    merged ops. residual=False drops the "+ input" (the merge alone is the output; an identity mask
    still returns its input). drop_path > 0 zeroes whole samples of each non-identity op output before the
    merge during training (scaled by 1/keep, like dropout; a no-op at inference).
    """

    def __init__(self, spec, channels, mask, searchable, bn_scale, formulation="fast", drop_path=0.0,
                 residual=True, **kwargs):
        super().__init__(**kwargs)
        if formulation not in FORMULATIONS:
            raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
        check_mask(spec, mask)
        self.spec = spec
        self.channels = channels
        self.searchable = searchable
        self.formulation = formulation
        self.drop_path = drop_path
        self.residual = residual
        self._ops = {}
        with self.name_scope():
            for o in mask.live_slots():
                op = make_op(spec.op_name(o), channels, bn_scale, spec.sep_repeats, prefix=f"op{o}_")
                if searchable:  # the mixing hands its ops plain-layout views (see ops.Pool)
                    set_pool_layout_conv(op, True)
                self.register_child(op, f"op{o}")
                self._ops[o] = op
            if spec.merge == "concat" and mask.outputs:
                merged = spec.num_op_slots if searchable else len(mask.outputs)
                self.merge_weight = self.params.get("merge_weight", shape=(channels, merged * channels, 1, 1))
        self._route(mask)

    def _route(self, mask):
        self.mask = mask
        self._level_slots = {}
        for level in range(1, self.spec.levels + 1):
            slots = [o for o in self.spec.level_slots(level) if mask.inputs[o]]
            if slots:
                self._level_slots[level] = slots

    def set_mask(self, mask):
        """Restrict a searchable block to a sub-mask of the one it was built with (same Parameters).

        The caller (DsoNet.set_masks) clears the cached graph so the next call traces the new routing.
        """
        if not self.searchable:
            raise ValueError("set_mask is for searchable blocks; build a new derived block instead")
        check_mask(self.spec, mask)
        missing = [o for o in mask.live_slots() if o not in self._ops]
        if missing:
            raise ValueError(f"op slots {missing} were not built in this block; masks may only shrink")
        self._route(mask)

    def hybrid_forward(self, F, x, *lams, merge_weight=None):
        if self.mask.is_identity:
            return x
        nodes, columns = {0: x}, {}
        for level, slots in self._level_slots.items():
            if level == 1:
                inputs = [x] * len(slots)
            elif not self.searchable:
                inputs = [_sum(F, [nodes[k] for k in self.mask.inputs[o]]) for o in slots]
            elif self.formulation == "fast":
                inputs = self._mix_fast(F, level, slots, nodes, columns, lams[level - 2])
            else:
                inputs = self._mix_naive(F, level, slots, nodes, lams[level - 2])
            for o, h in zip(slots, inputs, strict=True):
                nodes[o + 1] = self._ops[o](h)
        outs = []
        for o in self.mask.outputs:
            h = nodes[o + 1]
            if self.drop_path > 0 and self.spec.op_name(o) != "identity":
                h = F.Dropout(h, p=self.drop_path, axes=(1, 2, 3))
            outs.append(h)
        # a sum merge contracts columns too: the nodes' own, unless drop-path changed the maps
        merged = self._merge(F, outs, {} if self.drop_path > 0 else columns,
                             lams[-1] if self.searchable else None, merge_weight)
        return merged + x if self.residual else merged

    def _rows(self, level, slots):
        return [o - (level - 1) * self.spec.n_ops for o in slots]

    def _mix_fast(self, F, level, slots, nodes, columns, lam):
        cols = sorted(set().union(*(self.mask.inputs[o] for o in slots)))
        shape = self.spec.lambda_shapes()[f"in{level}"]
        edges = [self.mask.inputs[o] for o in slots]
        matrix = _level_matrix(F, lam, shape, self._rows(level, slots), cols, edges)
        return _contract(F, matrix, len(slots), _columns(F, nodes, cols, columns), self.channels)

    def _mix_naive(self, F, level, slots, nodes, lam):
        return [_sum(F, [F.broadcast_mul(nodes[k], _scalar(F, lam, (r, k))) for k in self.mask.inputs[o]])
                for o, r in zip(slots, self._rows(level, slots), strict=True)]

    def _merge(self, F, outs, columns, lam_out, weight):
        slots = self.mask.outputs
        n_slots = self.spec.num_op_slots
        fast = self.searchable and self.formulation == "fast"
        if self.searchable and not fast:
            outs = [F.broadcast_mul(h, _scalar(F, lam_out, (o,))) for h, o in zip(outs, slots, strict=True)]
        if self.spec.merge == "sum":
            if not fast:
                return _sum(F, outs)
            lam = F.reshape(_take(F, lam_out, 0, slots, n_slots), shape=(1, -1))
            keys = [o + 1 for o in slots]
            maps = dict(zip(keys, outs, strict=True))
            return _contract(F, lam, 1, _columns(F, maps, keys, columns), self.channels)[0]
        c = self.channels
        if self.searchable:
            weight = F.reshape(_take(F, F.reshape(weight, shape=(c, n_slots, c)), 1, slots, n_slots),
                               shape=(c, len(slots) * c))
            if fast:
                weight = weight * _group_scale(F, _take(F, lam_out, 0, slots, n_slots), weight, c)
            weight = F.reshape(weight, shape=(c, len(slots) * c, 1, 1))
        data = outs[0] if len(outs) == 1 else F.concat(*outs, dim=1)
        return F.Convolution(data, weight, kernel=(1, 1), num_filter=c, no_bias=True)


class ReductionBlock(nn.HybridBlock):
    """Between stages: (1x1 conv stride 2 + BN) + (3x3 conv stride 2 + BN), channels doubled by the caller.

    No ReLU: its output joins the residual stream like a block output, and every op applies its own ReLU.
    """

    def __init__(self, in_channels, out_channels, bn_scale, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv1 = nn.Conv2D(out_channels, 1, strides=2, use_bias=False, in_channels=in_channels)
            self.bn1 = nn.BatchNorm(scale=bn_scale, in_channels=out_channels)
            self.conv3 = nn.Conv2D(out_channels, 3, strides=2, padding=1, use_bias=False,
                                   in_channels=in_channels)
            self.bn3 = nn.BatchNorm(scale=bn_scale, in_channels=out_channels)

    def hybrid_forward(self, F, x):
        return self.bn1(self.conv1(x)) + self.bn3(self.conv3(x))
