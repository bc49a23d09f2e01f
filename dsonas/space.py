"""The search space as plain data: the block (levels x ops, merge) and the macro skeleton.

Nothing here touches MXNet, so genotype files, cost models and tools can reason about a space without
building a network.

Numbering (used by masks, λ arrays and genotype files alike):

* op slot ``o`` (0-based, ``0 <= o < levels * n_ops``) sits at level ``o // n_ops + 1`` and runs the op
  ``ops[o % n_ops]``;
* node ``0`` is the block input and node ``o + 1`` is the output of op slot ``o``;
* an op of level ``l`` may read node 0 and every node of the levels ``< l`` (its *candidate inputs*);
* λ ``"in{l}"[n, k]`` (levels ``l >= 2``) scales candidate input ``k`` (an index into
  ``candidate_inputs``) of the ``n``-th op of level ``l``; ``"out"[o]`` scales op slot ``o`` into the merge.
  Level-1 ops have no input λ: their only input feeds a conv/pool followed by BatchNorm, which ignores its
  scale, so that λ would get exactly zero gradient and the L1 term alone would prune it.
"""

from dataclasses import dataclass

from dsonas.errors import ConfigError

OP_SETS = {
    # DSO-NAS's block (paper §4.1).
    "dso": ("sep_conv_3x3", "sep_conv_5x5", "avg_pool_3x3", "max_pool_3x3"),
    # ShuffleNASNet's cells (§III-A): the ENAS ops (separable convs applied twice: sep_repeats=2) plus
    # identity and 1x1 conv.
    "shuffle": ("sep_conv_3x3", "sep_conv_5x5", "avg_pool_3x3", "max_pool_3x3", "identity", "conv_1x1"),
    # ShuffleNet V2's branch (1x1 conv, 3x3 depthwise, 1x1 conv) as a mask over these two ops.
    "shufflenet_v2": ("conv_1x1", "dw_conv_3x3"),
    # FPNAS's mobile space (§3.1): inverted bottlenecks, kernel 3 or 5, expansion 3 or 6.
    "mobile": ("mbconv_k3_e3", "mbconv_k3_e6", "mbconv_k5_e3", "mbconv_k5_e6"),
}
# Every op name a spec may use; dsonas.ops registers exactly these.
KNOWN_OPS = tuple(dict.fromkeys(name for ops in OP_SETS.values() for name in ops))
MERGES = ("concat", "sum")
SKELETON_KINDS = ("cifar", "imagenet", "shuffle_cifar", "shuffle_imagenet")
SHUFFLE_KINDS = ("shuffle_cifar", "shuffle_imagenet")
# The second path of a shuffle skeleton's downsampling units (dsonas.shuffle), and each kind's default.
BYPASSES = ("factorized", "sep_conv_3x3_x2", "shufflenet_v2", "reduction")
DEFAULT_BYPASS = {"shuffle_cifar": "factorized", "shuffle_imagenet": "shufflenet_v2"}


def check_space_kind(space_kind, skeleton_kind):
    """Raise ConfigError unless the search space kind fits the skeleton: `shuffle` searches one cell inside
    the ShuffleNet V2 units of a shuffle_* skeleton; `share` / `full` search DSO blocks of a cifar /
    imagenet skeleton. No MXNet needed, so a tool can check a config before creating a run folder."""
    shuffle_skeleton = skeleton_kind in SHUFFLE_KINDS
    if space_kind == "shuffle" and not shuffle_skeleton:
        raise ConfigError(f"space.kind: shuffle searches a cell inside ShuffleNet V2 units, but "
                          f"skeleton.kind is {skeleton_kind!r}; set skeleton.kind to shuffle_cifar or "
                          f"shuffle_imagenet (see configs/shuffle_default.yaml)")
    if space_kind != "shuffle" and shuffle_skeleton:
        raise ConfigError(f"skeleton.kind: {skeleton_kind} is searched with space.kind shuffle, not "
                          f"{space_kind!r}; set space.kind=shuffle or a cifar/imagenet skeleton")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class BlockSpec:
    """One block of the space: `levels` levels of the ops `ops`, merged by `merge` (concat+1x1 or sum).

    Invalid values raise ConfigError naming the field as ``space.<field>`` (the same key in the config
    file and in a genotype file).
    """

    levels: int
    ops: tuple
    merge: str = "concat"
    sep_repeats: int = 1

    def __post_init__(self):
        object.__setattr__(self, "ops", tuple(self.ops))
        if not _is_int(self.levels) or self.levels < 1:
            raise ConfigError(f"space.levels: expected an integer >= 1, got {self.levels!r}")
        if not self.ops:
            raise ConfigError("space.ops: the op list is empty; name at least one op, e.g. sep_conv_3x3")
        for i, name in enumerate(self.ops):
            if name not in KNOWN_OPS:
                raise ConfigError(f"space.ops[{i}]: unknown op {name!r}; known ops: {', '.join(KNOWN_OPS)}")
        if len(set(self.ops)) != len(self.ops):
            raise ConfigError(f"space.ops: duplicate op names in {list(self.ops)}; list each op once")
        if self.merge not in MERGES:
            raise ConfigError(f"space.merge: expected one of {', '.join(MERGES)}, got {self.merge!r}")
        if not _is_int(self.sep_repeats) or self.sep_repeats < 1:
            raise ConfigError(f"space.sep_repeats: expected an integer >= 1, got {self.sep_repeats!r}")

    @classmethod
    def from_config(cls, space_cfg):
        """BlockSpec from the config's `space` section (`ops` may also name an OP_SETS entry)."""
        ops = space_cfg.ops
        if isinstance(ops, str):
            if ops not in OP_SETS:
                raise ConfigError(f"space.ops: unknown op set {ops!r}; use a list of ops or one of "
                                  f"{', '.join(OP_SETS)}")
            ops = OP_SETS[ops]
        return cls(levels=space_cfg.levels, ops=tuple(ops), merge=space_cfg.merge,
                   sep_repeats=space_cfg.sep_repeats)

    @property
    def n_ops(self):
        return len(self.ops)

    @property
    def num_op_slots(self):
        return self.levels * self.n_ops

    def level_of(self, slot):
        """Level (1-based) of op slot `slot`."""
        return slot // self.n_ops + 1

    def op_name(self, slot):
        return self.ops[slot % self.n_ops]

    def level_slots(self, level):
        """The op slots of `level` (1-based), in order."""
        return range((level - 1) * self.n_ops, level * self.n_ops)

    def candidate_inputs(self, slot):
        """Nodes op slot `slot` may read: node 0 and every node of the earlier levels, ascending."""
        return tuple(range((self.level_of(slot) - 1) * self.n_ops + 1))

    def lambda_keys(self):
        """λ array names in the order blocks take them: in2 .. in{levels}, out."""
        return tuple(f"in{level}" for level in range(2, self.levels + 1)) + ("out",)

    def lambda_shapes(self):
        """{"in2": (N, 1+N), ..., "in{M}": (N, 1+(M-1)N), "out": (M*N,)}."""
        shapes = {f"in{level}": (self.n_ops, 1 + (level - 1) * self.n_ops)
                  for level in range(2, self.levels + 1)}
        shapes["out"] = (self.num_op_slots,)
        return shapes

    def num_lambdas(self):
        total = 0
        for shape in self.lambda_shapes().values():
            size = 1
            for dim in shape:
                size *= dim
            total += size
        return total

    def to_dict(self):
        return {"levels": self.levels, "ops": list(self.ops), "merge": self.merge,
                "sep_repeats": self.sep_repeats}


@dataclass(frozen=True)
class Skeleton:
    """The macro network around the blocks.

    kind: "cifar" (stride-1 stem) or "imagenet" (stride-4 stem): DSO-NAS blocks with a reduction block
    between stages; "shuffle_cifar" / "shuffle_imagenet": ShuffleNet V2 units, each running one block on
    half of its channels (dsonas.shuffle). filters: channels of the stage-1 blocks (DSO) or units
    (shuffle: the block sees half of them; must be even), doubled by every stage. stages: blocks per
    stage; in a shuffle skeleton every unit is a block, and a stage's first unit downsamples (except
    stage 1 of shuffle_cifar, whose stem keeps the resolution). num_classes / input_size: classifier
    width and square input side.
    """

    kind: str
    filters: int
    stages: tuple
    num_classes: int
    input_size: int

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(self.stages))
        if self.kind not in SKELETON_KINDS:
            raise ConfigError(f"skeleton.kind: expected one of {', '.join(SKELETON_KINDS)}, "
                              f"got {self.kind!r}")
        for field in ("filters", "num_classes", "input_size"):
            value = getattr(self, field)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"skeleton.{field}: expected an integer >= 1, got {value!r}")
        if not self.stages:
            raise ConfigError("skeleton.stages: empty; give the number of blocks per stage, e.g. [2, 2, 2]")
        for i, blocks in enumerate(self.stages):
            if not _is_int(blocks) or blocks < 1:
                raise ConfigError(f"skeleton.stages[{i}]: expected an integer >= 1, got {blocks!r}")
        if self.is_shuffle and self.filters % 2:
            raise ConfigError(f"skeleton.filters: a {self.kind} unit splits its channels in two halves; "
                              f"use an even number, got {self.filters}")

    @classmethod
    def from_config(cls, skeleton_cfg, num_classes, input_size):
        """Skeleton from the config's `skeleton` section; `num_classes` is used when the config says None."""
        classes = skeleton_cfg.num_classes if skeleton_cfg.num_classes is not None else num_classes
        return cls(kind=skeleton_cfg.kind, filters=skeleton_cfg.filters, stages=tuple(skeleton_cfg.stages),
                   num_classes=classes, input_size=input_size)

    @property
    def is_shuffle(self):
        """ShuffleNet V2 units (channel split, block on one half, concat, channel shuffle)."""
        return self.kind in SHUFFLE_KINDS

    @property
    def num_blocks(self):
        return sum(self.stages)

    def stage_of_block(self, block):
        """Stage index (0-based) of searchable block `block` (0-based, counted over the whole net)."""
        for stage, count in enumerate(self.stages):
            if block < count:
                return stage
            block -= count
        raise IndexError(f"block {block} out of range")

    def to_dict(self):
        return {"kind": self.kind, "filters": self.filters, "stages": list(self.stages),
                "num_classes": self.num_classes, "input_size": self.input_size}
