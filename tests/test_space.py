from types import SimpleNamespace

import pytest

from dsonas.errors import ConfigError
from dsonas.space import KNOWN_OPS, OP_SETS, BlockSpec, Skeleton

DSO = BlockSpec(levels=4, ops=OP_SETS["dso"])


def test_slot_and_node_numbering():
    assert DSO.n_ops == 4 and DSO.num_op_slots == 16
    assert [DSO.level_of(o) for o in (0, 3, 4, 11, 12, 15)] == [1, 1, 2, 3, 4, 4]
    assert DSO.op_name(5) == "sep_conv_5x5" and DSO.op_name(15) == "max_pool_3x3"
    assert list(DSO.level_slots(3)) == [8, 9, 10, 11]
    assert DSO.candidate_inputs(0) == (0,)
    assert DSO.candidate_inputs(7) == (0, 1, 2, 3, 4)
    assert DSO.candidate_inputs(15) == tuple(range(13))


def test_lambda_shapes_give_124_per_block():
    assert DSO.lambda_shapes() == {"in2": (4, 5), "in3": (4, 9), "in4": (4, 13), "out": (16,)}
    assert DSO.lambda_keys() == ("in2", "in3", "in4", "out")
    assert DSO.num_lambdas() == 124
    one_level = BlockSpec(levels=1, ops=("sep_conv_3x3", "max_pool_3x3"), merge="sum")
    assert one_level.lambda_shapes() == {"out": (2,)}


def test_op_sets():
    assert OP_SETS["shuffle"][:4] == OP_SETS["dso"]
    assert set(KNOWN_OPS) == set().union(*OP_SETS.values())


@pytest.mark.parametrize("kwargs, field", [
    (dict(levels=0, ops=OP_SETS["dso"]), "space.levels"),
    (dict(levels=2, ops=()), "space.ops"),
    (dict(levels=2, ops=("sep_conv_3x3", "conv_7x7")), "space.ops[1]: unknown op 'conv_7x7'"),
    (dict(levels=2, ops=("identity", "identity")), "space.ops: duplicate"),
    (dict(levels=2, ops=("identity",), merge="mean"), "space.merge"),
    (dict(levels=2, ops=("identity",), sep_repeats=0), "space.sep_repeats"),
])
def test_block_spec_rejects_bad_values(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        BlockSpec(**kwargs)


def test_block_spec_from_config_accepts_an_op_set_name():
    cfg = SimpleNamespace(levels=3, ops="shuffle", merge="sum", sep_repeats=2)
    spec = BlockSpec.from_config(cfg)
    assert spec.ops == OP_SETS["shuffle"] and spec.merge == "sum" and spec.sep_repeats == 2
    with pytest.raises(ConfigError, match="unknown op set"):
        BlockSpec.from_config(SimpleNamespace(levels=3, ops="nope", merge="sum", sep_repeats=1))


def test_skeleton():
    sk = Skeleton("cifar", 16, [8, 8, 8], 10, 32)
    assert sk.stages == (8, 8, 8) and sk.num_blocks == 24
    assert [sk.stage_of_block(b) for b in (0, 7, 8, 23)] == [0, 0, 1, 2]
    assert Skeleton(**sk.to_dict()) == sk
    cfg = SimpleNamespace(kind="imagenet", filters=48, stages=[2, 2, 13, 6], num_classes=None)
    assert Skeleton.from_config(cfg, num_classes=1000, input_size=224).num_classes == 1000
    for bad, field in [(dict(kind="resnet"), "skeleton.kind"), (dict(filters=0), "skeleton.filters"),
                       (dict(stages=()), "skeleton.stages"), (dict(stages=(2, 0)), r"skeleton.stages\[1\]")]:
        with pytest.raises(ConfigError, match=field):
            Skeleton(**{**sk.to_dict(), **bad})
