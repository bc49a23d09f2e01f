import copy
import json

import numpy as np
import pytest

from dsonas.errors import GenotypeError
from dsonas.genotype import BlockMask, Genotype, check_mask, derive_mask
from dsonas.space import OP_SETS, BlockSpec, Skeleton

SPEC = BlockSpec(levels=4, ops=OP_SETS["dso"])
SKELETON = Skeleton("cifar", 16, (2, 2), 10, 32)


def ones():
    return {key: np.ones(shape) for key, shape in SPEC.lambda_shapes().items()}


def test_full_mask():
    mask = BlockMask.full(SPEC)
    assert mask.live_slots() == tuple(range(16)) and mask.outputs == tuple(range(16))
    assert mask.num_edges() == 4 * (1 + 5 + 9 + 13) + 16
    assert not mask.is_identity
    check_mask(SPEC, mask)
    assert derive_mask(SPEC, ones()) == mask


def test_derive_drops_zero_edges_and_isolated_ops():
    lam = ones()
    lam["in2"][0, :] = 0          # op slot 4 loses every input -> dead, and node 5 leaves its consumers
    lam["out"][15] = 0            # op slot 15 (level 4) feeds nothing else -> dead
    lam["in3"][1, 2] = 0          # a single edge: node 2 -> op slot 9
    before = copy.deepcopy(lam)
    mask = derive_mask(SPEC, lam)
    assert all(np.array_equal(lam[k], before[k]) for k in lam)  # pure
    assert mask.inputs[4] == () and mask.inputs[15] == ()
    assert 4 not in mask.outputs and 15 not in mask.outputs
    assert all(5 not in mask.inputs[o] for o in range(16))
    assert mask.inputs[9] == (0, 1, 3, 4, 6, 7, 8)
    check_mask(SPEC, mask)


def test_derive_reaches_the_fixpoint_through_consumers():
    lam = ones()
    lam["in4"][0, :] = 0          # op slot 12 dies (no input)
    lam["out"][8] = 0             # op slot 8 no longer feeds the output directly ...
    lam["in4"][1:, 9] = 0         # ... and feeds only op slot 12, which is dead -> op slot 8 dies too
    mask = derive_mask(SPEC, lam)
    assert mask.inputs[12] == () and mask.inputs[8] == ()
    assert all(9 not in nodes for nodes in mask.inputs)
    check_mask(SPEC, mask)
    assert derive_mask(SPEC, lam, prev_mask=mask) == mask  # idempotent


def test_all_pruned_block_is_identity():
    lam = ones()
    lam["out"][:] = 0
    mask = derive_mask(SPEC, lam)
    assert mask.is_identity and mask.outputs == () and mask.live_slots() == ()
    check_mask(SPEC, mask)
    lam = ones()
    for key in ("in2", "in3", "in4"):
        lam[key][:] = 0
    lam["out"][4:] = 0.5          # only level-1 ops can still reach the output
    assert derive_mask(SPEC, lam).live_slots() == (0, 1, 2, 3)


def test_max_inputs_per_op_keeps_the_largest_live_lambda():
    rng = np.random.default_rng(0)
    lam = {key: rng.uniform(0.1, 1.0, size=shape) for key, shape in SPEC.lambda_shapes().items()}
    lam["in3"][0, :] = 0.5        # a tie: the earliest node wins
    mask = derive_mask(SPEC, lam, max_inputs_per_op=1)
    for o in range(4, 16):
        level = SPEC.level_of(o)
        row = lam[f"in{level}"][o - (level - 1) * 4]
        assert mask.inputs[o] == (int(np.argmax(row)),)
    assert mask.inputs[8] == (0,)
    lam["in2"][0, 0] = 0          # op slot 4's best input is gone: the best remaining one is kept
    best_two = tuple(sorted(np.argsort(-lam["in2"][0])[:2]))
    assert derive_mask(SPEC, lam, max_inputs_per_op=2).inputs[4] == best_two


def test_prev_mask_edges_stay_gone():
    lam = ones()
    lam["in2"][1, 0] = 0
    lam["out"][3] = 0
    first = derive_mask(SPEC, lam)
    again = derive_mask(SPEC, ones(), prev_mask=first)
    assert again == first


def test_derive_rejects_wrong_shapes():
    lam = ones()
    lam["in3"] = np.ones((4, 8))
    with pytest.raises(ValueError, match="in3"):
        derive_mask(SPEC, lam)


def make_genotype(shared=False, lambdas=True):
    rng = np.random.default_rng(1)
    n = 1 if shared else SKELETON.num_blocks
    lams = [{key: rng.uniform(0, 1, size=shape) * (rng.uniform(size=shape) > 0.4)
             for key, shape in SPEC.lambda_shapes().items()} for _ in range(n)]
    masks = [derive_mask(SPEC, lam) for lam in lams]
    return Genotype(SKELETON, SPEC, shared, masks, lambdas=lams if lambdas else None)


@pytest.mark.parametrize("shared", [True, False])
def test_json_round_trip(tmp_path, shared):
    geno = make_genotype(shared)
    path = tmp_path / "genotype.json"
    geno.save(path)
    back = Genotype.load(path)
    assert back.masks == geno.masks and back.skeleton == geno.skeleton and back.spec == geno.spec
    assert back.shared == shared and back.version == 1
    for a, b in zip(back.lambdas, geno.lambdas, strict=True):
        assert all(np.allclose(a[k], b[k]) for k in a)
    assert back.block_masks() == [geno.mask_for_block(b) for b in range(4)]
    no_lam = make_genotype(shared, lambdas=False)
    no_lam.save(path)
    assert Genotype.load(path).lambdas is None


def test_summary_names_ops_and_identity():
    geno = make_genotype(shared=False)
    lam = ones()
    lam["out"][:] = 0
    geno.masks[1] = derive_mask(SPEC, lam)
    text = geno.summary()
    assert "block 1: 0/16 ops" in text and "(identity)" in text
    assert "op0 L1 sep_conv_3x3 <- in" in text
    assert text.count(") + in") == sum(not m.is_identity for m in geno.masks)  # each merge adds its input


def _set(path, value):
    def mutate(doc):
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def _delete(key):
    def mutate(doc):
        del doc[key]
    return mutate


BAD = [
    (_set(["version"], 2), "genotype.version: expected 1, got 2"),
    (_delete("masks"), "genotype.masks: missing"),
    (_set(["extra"], 1), "genotype.extra: unknown key"),
    (_set(["space", "ops", 1], "conv_9x9"), "genotype.space.ops[1]: unknown op 'conv_9x9'"),
    (_set(["space", "merge"], "mean"), "genotype.space.merge"),
    (_set(["space", "levels"], "4"), "genotype.space.levels"),
    (_set(["skeleton", "stages"], 4), "genotype.skeleton.stages: expected a list"),
    (_set(["skeleton", "kind"], "vgg"), "genotype.skeleton.kind"),
    (_set(["shared"], "no"), "genotype.shared"),
    (lambda d: d["masks"].pop(), "genotype.masks: expected a list of 4 masks"),
    (lambda d: d["masks"][3]["inputs"].pop(), "genotype.masks[3].inputs: expected 16 entries"),
    (lambda d: d["masks"][3]["inputs"][5].append(7),
     "genotype.masks[3].inputs[5]: node 7 is not earlier than op slot 5"),
    (lambda d: d["masks"][3]["inputs"][5].append(6),
     "genotype.masks[3].inputs[5]: node 6 is not earlier than op slot 5"),
    (lambda d: d["masks"][3]["inputs"][5].append(5),
     "genotype.masks[3].inputs[5]: node 5 (op slot 4) is in the same level"),
    (lambda d: d["masks"][0]["inputs"][5].append(99),
     "genotype.masks[0].inputs[5]: node 99 out of range 0..16"),
    (lambda d: d["masks"][0]["inputs"][5].append(-1), "genotype.masks[0].inputs[5]: node -1 out of range"),
    (lambda d: d["masks"][0]["inputs"][5].append("a"), "genotype.masks[0].inputs[5]: expected integer node"),
    (lambda d: d["masks"][0]["inputs"][0].append(0), "genotype.masks[0].inputs[0]: a node is listed twice"),
    (lambda d: d["masks"][0]["outputs"].append(16),
     "genotype.masks[0].outputs: op slot 16 out of range 0..15"),
    (_set(["masks", 0, "outputs"], "all"), "genotype.masks[0].outputs: expected a list"),
    (_set(["masks", 0, "inputs", 2], []),
     "genotype.masks[0].inputs[4]: node 3 is the output of op slot 2"),
    (_set(["masks", 0, "outputs"], []), "reaches no output"),
    (_set(["lambdas", 0, "in2"], [[1.0]]), "genotype.lambdas[0].in2: expected shape (4, 5)"),
    (_set(["lambdas", 0, "out"], [float("nan")] * 16), "genotype.lambdas[0].out: contains NaN"),
    (_set(["lambdas"], []), "genotype.lambdas: expected null or a list of 4"),
]


@pytest.mark.parametrize("mutate, message", BAD)
def test_load_names_the_bad_field(tmp_path, mutate, message):
    doc = make_genotype(shared=False).to_dict()
    doc["masks"] = [BlockMask.full(SPEC).to_dict() for _ in doc["masks"]]
    mutate(doc)
    path = tmp_path / "g.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(GenotypeError) as err:
        Genotype.load(path)
    text = str(err.value)
    assert message in text and text.startswith(str(path)) and "\n" not in text


def test_load_missing_file_and_bad_json(tmp_path):
    with pytest.raises(GenotypeError, match="genotype file not found"):
        Genotype.load(tmp_path / "none.json")
    path = tmp_path / "bad.json"
    path.write_text('{"version": 1,')
    with pytest.raises(GenotypeError, match="not valid JSON"):
        Genotype.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(GenotypeError, match="genotype: expected an object"):
        Genotype.load(path)


def test_check_mask_semantics():
    full = BlockMask.full(SPEC)
    dead_source = BlockMask(inputs=((),) + full.inputs[1:], outputs=full.outputs[1:])
    with pytest.raises(GenotypeError, match=r"mask.inputs\[4\]: node 1 is the output of op slot 0"):
        check_mask(SPEC, dead_source)
    dead_output = BlockMask(inputs=full.inputs[:15] + ((),), outputs=full.outputs)
    with pytest.raises(GenotypeError, match="op slot 15 has no inputs"):
        check_mask(SPEC, dead_output)


SHUFFLE_SPEC = BlockSpec(levels=3, ops=OP_SETS["shufflenet_v2"], merge="sum")
SHUFFLE_GENOTYPE = Genotype(Skeleton("shuffle_cifar", 8, (1, 1), 10, 8), SHUFFLE_SPEC, True,
                            [BlockMask.full(SHUFFLE_SPEC)])


def test_unit_options_round_trip_and_old_files_keep_the_defaults(tmp_path):
    path = tmp_path / "g.json"
    Genotype(**{**vars(SHUFFLE_GENOTYPE), "bypass": "sep_conv_3x3_x2", "cell_bn": False}).save(path)
    doc = json.loads(path.read_text())
    assert (doc["bypass"], doc["cell_bn"]) == ("sep_conv_3x3_x2", False)
    back = Genotype.load(path)
    assert (back.bypass, back.cell_bn) == ("sep_conv_3x3_x2", False)
    del doc["bypass"], doc["cell_bn"]  # a file written before these fields existed
    path.write_text(json.dumps(doc))
    old = Genotype.load(path)
    assert (old.bypass, old.cell_bn) == (None, None) and "bypass" not in old.to_dict()


CIFAR_GENOTYPE = make_genotype(shared=True)


@pytest.mark.parametrize("genotype, key, value, message", [
    (SHUFFLE_GENOTYPE, "bypass", "sep_conv", "genotype.bypass: unknown bypass 'sep_conv'; use one of"),
    (SHUFFLE_GENOTYPE, "bypass", 3, "genotype.bypass: unknown bypass 3"),
    (SHUFFLE_GENOTYPE, "cell_bn", "yes", "genotype.cell_bn: expected true, false or null"),
    (CIFAR_GENOTYPE, "bypass", "factorized", "genotype.bypass: applies to shuffle skeletons only"),
    (CIFAR_GENOTYPE, "cell_bn", True, "genotype.cell_bn: applies to shuffle skeletons only"),
])
def test_bad_unit_options_name_the_field(tmp_path, genotype, key, value, message):
    path = tmp_path / "g.json"
    path.write_text(json.dumps({**genotype.to_dict(), key: value}))
    with pytest.raises(GenotypeError) as err:
        Genotype.load(path)
    assert message in str(err.value) and str(err.value).startswith(str(path))
