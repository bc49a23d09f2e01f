import json

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

from dsonas import cost
from dsonas.block import MaskedBlock, ReductionBlock
from dsonas.genotype import BlockMask, derive_mask
from dsonas.network import blocks_of
from dsonas.ops import OPS, DepthwiseConv, Pool
from dsonas.space import KNOWN_OPS, OP_SETS, BlockSpec

C, HW, BATCH = 4, 6, 3


def spec_of(merge="concat", levels=3, ops="dso"):
    return BlockSpec(levels=levels, ops=OP_SETS[ops], merge=merge)


def random_lambdas(spec, seed=0, low=0.3, high=1.5):
    rng = np.random.default_rng(seed)
    return {key: rng.uniform(low, high, size=shape) for key, shape in spec.lambda_shapes().items()}


def lam_inputs(spec, values):
    """λ NDArrays in block-argument order, recording gradients."""
    arrays = [mx.nd.array(values[key]) for key in spec.lambda_keys()]
    for a in arrays:
        a.attach_grad()
    return arrays


def make_block(spec, mask, searchable=True, formulation="fast", seed=0, bn_scale=False, **kwargs):
    block = MaskedBlock(spec, C, mask, searchable, bn_scale, formulation, prefix="blk_", **kwargs)
    mx.random.seed(seed)
    block.initialize(mx.init.Normal(0.5))
    return block


def copy_params(src, dst):
    """Copy every Parameter of `dst` from the same-named one of `src` (same prefix)."""
    values = {name: p.data() for name, p in src.collect_params().items()}
    for name, p in dst.collect_params().items():
        p.set_data(values[name])


def run(block, x, lams):
    """Output and gradients (x, λ, weights) of sum(out * fixed random projection)."""
    x = x.copy()
    x.attach_grad()
    proj = mx.nd.array(np.random.default_rng(9).normal(size=(BATCH, C, HW, HW)))
    with autograd.record():
        out = block(x, *lams)
        loss = (out * proj).sum()
    loss.backward()
    weights = {name: p.grad().asnumpy() for name, p in block.collect_params().items() if p.grad_req != "null"}
    return out.asnumpy(), x.grad.asnumpy(), [a.grad.asnumpy() for a in lams], weights


def data(seed=0):
    return mx.nd.array(np.random.default_rng(seed).normal(size=(BATCH, C, HW, HW)))


def pruned_mask(spec, seed=3):
    """A mask with dead ops, partial input rows (pruned λ sharing a row with live ones), dead outputs."""
    lam = random_lambdas(spec, seed)
    rng = np.random.default_rng(seed)
    for key in lam:
        lam[key] *= rng.uniform(size=lam[key].shape) > 0.45
    lam["in2"][0, :] = 0
    mask = derive_mask(spec, lam)
    assert 0 < len(mask.live_slots()) < spec.num_op_slots and len(mask.outputs) > 1
    return mask


def test_every_registered_op_keeps_the_shape():
    assert set(OPS) == set(KNOWN_OPS)
    x = data()
    for name, factory in OPS.items():
        op = factory(C, False, 2)
        op.initialize()
        assert op(x).shape == x.shape, name
        params = op.collect_params()
        assert not any(n.endswith("bias") for n in params), name
        for n, p in params.items():
            if n.endswith("gamma"):
                assert p.grad_req == "null", "BN scale must be fixed while searching"
    depthwise = [n for n in OPS["sep_conv_5x5"](C, True, 2).collect_params() if n.endswith("weight")]
    assert len(depthwise) == 4  # two (depthwise, pointwise) pairs


@pytest.mark.parametrize("kernel", [3, 5, 7])
def test_depthwise_conv_equals_the_plain_convolution(kernel):
    conv = DepthwiseConv(C, kernel)
    conv.initialize(mx.init.Normal(1.0))
    x = mx.nd.array(np.random.default_rng(0).normal(size=(2, C, 7, 9)))
    weight = conv.weight.data().copy()
    weight.attach_grad()
    with autograd.record():
        ours = conv(x)
        loss = ((ours - 1) ** 2).sum()
    loss.backward()
    with autograd.record():
        plain = mx.nd.Convolution(x, weight, kernel=(kernel, kernel), pad=(kernel // 2,) * 2, num_filter=C,
                                  num_group=C, no_bias=True)
        loss = ((plain - 1) ** 2).sum()
    loss.backward()
    np.testing.assert_allclose(ours.asnumpy(), plain.asnumpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(conv.weight.grad().asnumpy(), weight.grad.asnumpy(), rtol=1e-4, atol=1e-3)


def test_avg_pool_ignores_padding():
    pool = OPS["avg_pool_3x3"](C, False, 1)
    pool.initialize()
    y = pool[0](mx.nd.ones((1, C, HW, HW)))
    assert np.allclose(y.asnumpy(), 1.0)


@pytest.mark.parametrize("layout_conv", [True, False])
@pytest.mark.parametrize("hybridize", [False, True])
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pool_equals_the_plain_pooling(kind, hybridize, layout_conv):
    """The unit 1x1 convolution in front of ops.Pool (searchable blocks) only changes the layout: the same
    outputs and input gradients, bit for bit, as one Pooling; the cost model sees one pooling, no MACs."""
    pool = Pool(kind, C, layout_conv=layout_conv)
    pool.initialize()
    if hybridize:
        pool.hybridize(static_alloc=True)
    rng = np.random.default_rng(0)
    x = mx.nd.array(rng.normal(size=(2, C, 7, 9)))
    head = mx.nd.array(rng.normal(size=(2, C, 7, 9)))
    results = []
    for fn in (pool, lambda t: mx.nd.Pooling(t, kernel=(3, 3), stride=(1, 1), pad=(1, 1), pool_type=kind,
                                             count_include_pad=False)):
        t = x.copy()
        t.attach_grad()
        with autograd.record():
            out = fn(t)
        out.backward(head)
        results.append((out.asnumpy(), t.grad.asnumpy()))
    (ours, ours_grad), (plain, plain_grad) = results
    np.testing.assert_array_equal(ours, plain)
    np.testing.assert_array_equal(ours_grad, plain_grad)
    report = cost.count(Pool(kind, C, layout_conv=layout_conv), (1, C, 7, 9))
    assert (report.macs, report.fragments, report.mac) == (0, 1, 2 * C * 7 * 9)


def test_only_searchable_blocks_pool_through_the_layout_conv():
    """The λ mixing hands a searchable block's ops plain-layout views; a derived block sums blocked maps."""
    spec = spec_of()
    for searchable in (True, False):
        block = MaskedBlock(spec, C, BlockMask.full(spec), searchable, bn_scale=False)
        pools = blocks_of(block, Pool)
        assert pools and all(p.layout_conv == searchable for p in pools)


@pytest.mark.parametrize("merge", ["concat", "sum"])
def test_supernet_block_with_unit_lambdas_equals_the_derived_block(merge):
    spec = spec_of(merge)
    mask = BlockMask.full(spec)
    searched = make_block(spec, mask, searchable=True)
    derived = make_block(spec, mask, searchable=False, seed=1)
    copy_params(searched, derived)
    ones = lam_inputs(spec, {k: np.ones(s) for k, s in spec.lambda_shapes().items()})
    a = run(searched, data(), ones)
    b = run(derived, data(), [])
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-4, atol=1e-4)
    # inference (running BN statistics); no backward here: MKLDNN's max-pool backward is only valid
    # for graphs recorded in training mode
    x = data(1)
    np.testing.assert_allclose(searched(x, *ones).asnumpy(), derived(x).asnumpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("merge, ops", [("concat", "dso"), ("sum", "shuffle")])
@pytest.mark.parametrize("pruned", [False, True])
def test_fast_and_naive_formulations_agree(merge, ops, pruned):
    spec = spec_of(merge, ops=ops)
    mask = pruned_mask(spec) if pruned else BlockMask.full(spec)
    lam = random_lambdas(spec, seed=5)
    fast = make_block(spec, mask, formulation="fast")
    naive = make_block(spec, mask, formulation="naive", seed=1)
    copy_params(fast, naive)
    out_f, dx_f, dlam_f, dw_f = run(fast, data(), lam_inputs(spec, lam))
    out_n, dx_n, dlam_n, dw_n = run(naive, data(), lam_inputs(spec, lam))
    np.testing.assert_allclose(out_f, out_n, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dx_f, dx_n, rtol=1e-3, atol=1e-4)
    for a, b in zip(dlam_f, dlam_n, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
    assert dw_f.keys() == dw_n.keys()
    for name in dw_f:
        np.testing.assert_allclose(dw_f[name], dw_n[name], rtol=1e-3, atol=1e-3, err_msg=name)
    if pruned:  # λ of pruned edges get exactly zero gradient
        for key, grad in zip(spec.lambda_keys(), dlam_f, strict=True):
            if key == "out":
                dead = [o for o in range(spec.num_op_slots) if o not in mask.outputs]
                assert not grad[dead].any()
            else:
                level = int(key[2:])
                for n, o in enumerate(spec.level_slots(level)):
                    dead = [k for k in spec.candidate_inputs(o) if k not in mask.inputs[o]]
                    assert not grad[n, dead].any(), (key, n)


@pytest.mark.parametrize("pruned", [False, True])
def test_fast_mixing_makes_each_node_a_column_once(pruned):
    """Every node a level mixes is turned into a column once per block, however many levels read it."""
    spec = spec_of()
    mask = pruned_mask(spec) if pruned else BlockMask.full(spec)
    block = make_block(spec, mask)
    lams = [mx.sym.var(key) for key in spec.lambda_keys()]
    nodes = json.loads(block(mx.sym.var("data"), *lams).tojson())["nodes"]
    mixed = {k for o in mask.live_slots() if spec.level_of(o) > 1 for k in mask.inputs[o]}
    assert sum(n["op"] == "expand_dims" for n in nodes) == len(mixed) > 0


def test_hybridized_block_equals_imperative():
    spec = spec_of()
    mask = pruned_mask(spec)
    block = make_block(spec, mask)
    lams = lam_inputs(spec, random_lambdas(spec))
    imperative = run(block, data(), lams)
    block.hybridize(static_alloc=True)
    hybrid = run(block, data(), lams)
    for a, b in zip(imperative[:2], hybrid[:2], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_pruned_block_holds_only_live_ops():
    spec = spec_of()
    mask = pruned_mask(spec)
    for searchable in (True, False):
        block = make_block(spec, mask, searchable=searchable)
        assert sorted(block._children) == sorted(f"op{o}" for o in mask.live_slots())
        merged = spec.num_op_slots if searchable else len(mask.outputs)
        assert block.merge_weight.shape == (C, merged * C, 1, 1)
    derived = make_block(spec, mask, searchable=False)
    assert derived(data()).shape == (BATCH, C, HW, HW)


def test_identity_block_returns_its_input():
    spec = spec_of()
    lam = random_lambdas(spec)
    lam["out"][:] = 0
    mask = derive_mask(spec, lam)
    block = make_block(spec, mask, searchable=False)
    assert not list(block.collect_params().keys())
    x = data()
    assert np.array_equal(block(x).asnumpy(), x.asnumpy())


def test_set_mask_only_shrinks():
    spec = spec_of()
    pruned = pruned_mask(spec)
    block = make_block(spec, pruned)
    with pytest.raises(ValueError, match="masks may only shrink"):
        block.set_mask(BlockMask.full(spec))
    with pytest.raises(ValueError, match="searchable"):
        make_block(spec, pruned, searchable=False).set_mask(pruned)


def test_drop_path_drops_whole_samples_in_training_only():
    spec = BlockSpec(levels=1, ops=("sep_conv_3x3",), merge="sum")
    mask = BlockMask.full(spec)
    plain = make_block(spec, mask, searchable=False)
    dropping = make_block(spec, mask, searchable=False, drop_path=0.5)
    copy_params(plain, dropping)
    x = mx.nd.array(np.random.default_rng(0).normal(size=(32, C, HW, HW)))
    np.testing.assert_allclose(dropping(x).asnumpy(), plain(x).asnumpy(), rtol=1e-6)  # inference
    with autograd.record():
        branch = (plain(x) - x).asnumpy()
        dropped = (dropping(x) - x).asnumpy()
    kept = [np.allclose(d, 2 * b, rtol=1e-4, atol=1e-5) for d, b in zip(dropped, branch, strict=True)]
    zeroed = [np.allclose(d, 0, atol=1e-6) for d in dropped]
    assert all(k or z for k, z in zip(kept, zeroed, strict=True))
    assert any(kept) and any(zeroed)


def test_reduction_block_halves_resolution_and_sets_channels():
    red = ReductionBlock(C, 2 * C, bn_scale=True)
    red.initialize()
    for side in (6, 7):
        assert red(mx.nd.ones((2, C, side, side))).shape == (2, 2 * C, (side + 1) // 2, (side + 1) // 2)
    assert not any(name.endswith("bias") for name in red.collect_params())
