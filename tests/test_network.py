import json
import warnings
from types import SimpleNamespace

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

from dsonas.errors import ConfigError
from dsonas.genotype import BlockMask, Genotype
from dsonas.network import DsoNet, build_supernet, compile_genotype, scale_channels
from dsonas.space import OP_SETS, BlockSpec, Skeleton

SPEC = BlockSpec(levels=3, ops=OP_SETS["dso"])
SKELETON = Skeleton("cifar", 8, (1, 1), 5, 8)
BATCH = 4


def supernet(shared, formulation="fast", skeleton=SKELETON, spec=SPEC, seed=0):
    net = DsoNet(skeleton, spec, [BlockMask.full(spec)] * skeleton.num_blocks, searchable=True, shared=shared,
                 bn_scale=False, formulation=formulation)
    mx.random.seed(seed)
    net.initialize(mx.init.Xavier())
    return net


def batch(seed=0, size=8):
    rng = np.random.default_rng(seed)
    return mx.nd.array(rng.normal(size=(BATCH, 3, size, size))), mx.nd.array(rng.integers(0, 5, size=BATCH))


def set_random_lambdas(net, seed=0):
    rng = np.random.default_rng(seed)
    for p in net.lambda_params():
        p.set_data(mx.nd.array(rng.uniform(0.5, 1.5, size=p.shape)))


def loss_and_grads(net, x, y):
    with autograd.record():
        loss = gluon.loss.SoftmaxCrossEntropyLoss()(net(x), y).mean()
    loss.backward()
    return loss.asscalar()


def test_share_has_one_lambda_set_and_full_one_per_block():
    share, full = supernet(True), supernet(False)
    assert [p.shape for p in share.lambda_params()] == list(SPEC.lambda_shapes().values())
    assert len(full.lambda_params()) == len(SPEC.lambda_keys()) * SKELETON.num_blocks
    assert share.block_lambda_names(0) == share.block_lambda_names(1)
    assert set(full.block_lambda_names(0).values()).isdisjoint(full.block_lambda_names(1).values())
    for net in (share, full):
        lam, weights = net.lambda_params(), net.weight_params()
        assert {p.name for p in lam} | {p.name for p in weights} == set(net.collect_params().keys())
        assert not {p.name for p in lam} & {p.name for p in weights}
        assert all(np.array_equal(p.data().asnumpy(), np.ones(p.shape)) for p in lam)
        assert len(net.lambdas_numpy()) == net.num_blocks


@pytest.mark.parametrize("shared", [True, False])
def test_every_lambda_gets_a_nonzero_gradient(shared):
    net = supernet(shared)
    loss_and_grads(net, *batch())
    for p in net.lambda_params():
        grad = p.grad().asnumpy()
        assert np.all(grad != 0), (p.name, grad)


# ShuffleNASNet form: a sum merge, identity ops, cells inside ShuffleNet V2 units
SHUFFLE = (Skeleton("shuffle_cifar", 8, (1, 2), 5, 8),
           BlockSpec(levels=2, ops=OP_SETS["shuffle"], merge="sum"))


# Shrunk masks whose mixing or merge reads a single node (searches reach them as λ sparsify)
SINGLE_NODE_MASKS = {
    "level2_reads_the_input": BlockMask(inputs=[(0,)] * 8 + [(0, 1, 5)] * 4, outputs=range(12)),
    "level3_reads_one_op": BlockMask(inputs=[(0,)] * 4 + [(0, 1)] * 4 + [(6,)] * 4, outputs=range(12)),
    "merge_of_one_op": BlockMask(inputs=[(0,), (0,)] + [()] * 4 + [(1, 2)] + [()] * 5, outputs=(6,)),
}


@pytest.mark.parametrize("kind, mask", [("share", None), ("shuffle", None),
                                        ("share", "level2_reads_the_input"), ("share", "level3_reads_one_op"),
                                        ("shuffle", "merge_of_one_op")])
@pytest.mark.parametrize("hybridized", [False, True])
def test_fast_and_naive_networks_agree(kind, mask, hybridized):
    """The fast net as the search runs it (hybridized, static_alloc) against the imperative naive net,
    full and shrunk (`set_masks`).

    Hybridized matters: a oneDNN reshape of a map that other ops read, in the mixing (the block input of
    a level pruned to it alone, or every node in a per-node variant), gave exact imperative gradients and
    wrong hybridized ones on mxnet 1.9.1 + oneDNN (dsonas.block._columns, bench/README.md). The other
    shrunk masks cover the remaining one-map paths (a level reading one op output, a merge of one op).
    """
    skeleton, spec = SHUFFLE if kind == "shuffle" else (SKELETON, SPEC)
    fast = supernet(True, "fast", skeleton=skeleton, spec=spec)
    naive = supernet(True, "naive", skeleton=skeleton, spec=spec, seed=1)
    if mask:
        for net in (fast, naive):
            net.set_masks([SINGLE_NODE_MASKS[mask]] * skeleton.num_blocks)
    if hybridized:
        fast.hybridize(static_alloc=True)
    naive_params = naive.collect_params()
    for name, p in fast.collect_params().items():
        naive_params[name].set_data(p.data())
    set_random_lambdas(fast)
    set_random_lambdas(naive)
    x, y = batch()
    assert np.isclose(loss_and_grads(fast, x, y), loss_and_grads(naive, x, y), rtol=1e-5)
    for name, p in fast.collect_params().items():
        if p.grad_req != "null":
            np.testing.assert_allclose(p.grad().asnumpy(), naive_params[name].grad().asnumpy(),
                                       rtol=1e-3, atol=1e-4, err_msg=name)


def test_hybridized_equals_imperative():
    net = supernet(False)
    set_random_lambdas(net)
    x, _ = batch()
    expected = net(x).asnumpy()
    net.hybridize(static_alloc=True, static_shape=True)
    np.testing.assert_allclose(net(x).asnumpy(), expected, rtol=1e-5, atol=1e-6)


def prune_some(net):
    """Zero λ so that ops die in all the ways a search can kill them; returns the zeroed λ values."""
    lam = {p.name: p.data().asnumpy() for p in net.lambda_params()}
    for block in range(net.num_blocks):
        names = net.block_lambda_names(block)
        lam[names["in2"]][1, :] = 0       # op slot 5: no input left
        lam[names["in3"]][0, 2] = 0       # one edge of op slot 8
        lam[names["in2"]][:, 4] = 0       # op slot 3 no longer feeds levels 2, 3 ...
        lam[names["in3"]][:, 4] = 0
        lam[names["out"]][3] = 0          # ... nor the output: it dies
        lam[names["out"]][11] = 0         # op slot 11 feeds nothing
    for p in net.lambda_params():
        p.set_data(mx.nd.array(lam[p.name]))


@pytest.mark.parametrize("shared", [True, False])
def test_set_masks_with_zero_lambdas_preserves_outputs(shared):
    net = supernet(shared)
    set_random_lambdas(net)
    prune_some(net)
    net.hybridize(static_alloc=True)
    x, y = batch()
    params_before = dict(net.collect_params().items())
    with autograd.train_mode():
        train_before = net(x).asnumpy()
    eval_before = net(x).asnumpy()

    genotype = Genotype.from_network(net)
    assert len(genotype.masks) == (1 if shared else net.num_blocks)
    net.set_masks(genotype.block_masks())
    mask = net.masks[0]
    assert mask.inputs[5] == () and mask.inputs[3] == () and mask.inputs[11] == ()
    assert mask.inputs[8] == (0, 1, 3, 5, 7, 8) and 3 not in mask.outputs and 11 not in mask.outputs

    with autograd.train_mode():
        np.testing.assert_allclose(net(x).asnumpy(), train_before, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(net(x).asnumpy(), eval_before, rtol=1e-5, atol=1e-5)
    assert all(params_before[name] is p for name, p in net.collect_params().items())

    dead = [p for p in net.weight_params() if "_op5_" in p.name or "_op3_" in p.name]
    assert dead and all(p.grad_req == "null" for p in dead)
    trainer = gluon.Trainer(net.weight_params() + net.lambda_params(), "sgd", {"learning_rate": 0.1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_and_grads(net, x, y)
        trainer.step(BATCH)  # no stale-gradient error from the pruned Parameters


def test_fully_pruned_levels_release_their_lambdas():
    net = supernet(True)
    lam = {p.name: p.data().asnumpy() for p in net.lambda_params()}
    names = net.block_lambda_names(0)
    lam[names["in3"]][:] = 0
    lam[names["out"]][:4] = 0
    for p in net.lambda_params():
        p.set_data(mx.nd.array(lam[p.name]))
    net.set_masks(Genotype.from_network(net).block_masks())
    grad_reqs = {key: net.collect_params()[name].grad_req for key, name in names.items()}
    assert grad_reqs == {"in2": "write", "in3": "null", "out": "write"}
    net.set_masks([BlockMask.full(SPEC)] * net.num_blocks)  # growing back (the ops still exist)
    assert net.collect_params()[names["in3"]].grad_req == "write"


def test_imagenet_skeleton_reaches_56_at_stage_one():
    skeleton = Skeleton("imagenet", 16, (1, 1, 1, 1), 10, 224)
    net = DsoNet(skeleton, SPEC, [BlockMask.full(SPEC)] * 4, searchable=False, shared=True)
    shape = net.stem(mx.sym.var("data")).infer_shape(data=(1, 3, 224, 224))[1][0]
    assert shape == (1, 16, 56, 56)
    out = net(mx.sym.var("data")).infer_shape(data=(1, 3, 224, 224))[1][0]
    assert out == (1, 10)


def test_width_mult_rounds_to_multiples_of_eight():
    assert scale_channels(36, 1.0) == 36
    assert scale_channels(16, 0.5) == 8 and scale_channels(48, 1.3) == 64 and scale_channels(8, 0.1) == 8
    geno = Genotype(SKELETON, SPEC, True, [BlockMask.full(SPEC)])
    net = compile_genotype(geno, width_mult=2.0)
    assert net.classifier.weight.shape == (5, 32)


def test_compiled_genotype_with_aux_dropout_and_drop_path(tmp_path):
    net = supernet(False)
    set_random_lambdas(net)
    prune_some(net)
    path = tmp_path / "genotype.json"
    Genotype.from_network(net).save(path)
    derived = compile_genotype(Genotype.load(path), dropout=0.5, drop_path=0.2, aux=True)
    derived.initialize(mx.init.Xavier())
    assert derived.lambda_params() == [] and not derived.searchable
    assert all(p.grad_req == "write" for n, p in derived.collect_params().items() if n.endswith("gamma"))
    assert "_op5_" not in " ".join(derived.collect_params().keys())
    x, y = batch()
    for hybridize in (False, True):
        if hybridize:
            derived.hybridize()
        with autograd.record():
            logits, aux = derived(x)
        assert logits.shape == aux.shape == (BATCH, 5)
        logits, aux = derived(x)  # the same two outputs at inference
        assert logits.shape == aux.shape == (BATCH, 5)
    derived.set_drop_path(0.0)
    np.testing.assert_allclose(derived(x)[0].asnumpy(), logits.asnumpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="at least 2 stages"):
        one_stage = Genotype(Skeleton("cifar", 8, (2,), 5, 8), SPEC, True, [BlockMask.full(SPEC)])
        compile_genotype(one_stage, aux=True)


def test_build_supernet_from_config_sections():
    space = SimpleNamespace(kind="full", levels=2, ops=["sep_conv_3x3", "max_pool_3x3"], merge="sum",
                            sep_repeats=1)
    skeleton = SimpleNamespace(kind="cifar", filters=8, stages=[1, 1], num_classes=None, bypass=None)
    net = build_supernet(space, skeleton, num_classes=3, input_size=8)
    net.initialize()
    assert net.searchable and not net.shared and net.skeleton.num_classes == 3
    assert all(p.grad_req == "null" for n, p in net.collect_params().items() if n.endswith("gamma"))
    assert net(batch()[0]).shape == (BATCH, 3)
    with pytest.raises(ConfigError, match="space.kind"):
        build_supernet(SimpleNamespace(**{**vars(space), "kind": "shuffle"}), skeleton, 3, 8)
    with pytest.raises(ConfigError, match="skeleton.kind"):
        build_supernet(space, SimpleNamespace(**{**vars(skeleton), "kind": "shuffle_cifar"}), 3, 8)


def test_unsplit_depthwise_for_inference_keeps_outputs_and_drops_operators():
    genotype = Genotype(skeleton=SKELETON, spec=SPEC, shared=True, masks=[BlockMask.full(SPEC)])
    net = compile_genotype(genotype)
    net.initialize(mx.init.Xavier())
    x, _ = batch()
    net.hybridize()
    split_out = net(x).asnumpy()
    split_ops = len(json.loads(net._cached_graph[1].tojson())["nodes"])
    net.set_depthwise_split(False)
    plain_out = net(x).asnumpy()
    plain_ops = len(json.loads(net._cached_graph[1].tojson())["nodes"])
    np.testing.assert_allclose(plain_out, split_out, rtol=1e-4, atol=1e-5)
    assert plain_ops < split_ops  # every sep_conv_5x5 loses its pad, window slices and partial sums


def test_set_trained_computes_only_the_stepped_group_with_the_same_results():
    """W and λ steps with set_trained end with the same trained Parameters as steps that compute every
    gradient, while the other group's gradients are not computed at all. (BN running statistics may
    differ: MXNet updates them in BN's backward, which a λ step skips before the first λ.)"""
    nets = [supernet(True, seed=3), supernet(True, seed=3)]
    for net in nets:
        set_random_lambdas(net)
        net.hybridize(static_alloc=True)
    trained = [name for name, p in nets[1].collect_params().items() if p.grad_req != "null"]
    sgd = {"learning_rate": 0.1}
    trainers = [{"weights": gluon.Trainer(net.weight_params(), "sgd", sgd),
                 "lambdas": gluon.Trainer(net.lambda_params(), "sgd", sgd)} for net in nets]
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for step, group in enumerate(["weights", "lambdas"] * 2 + ["lambdas", "weights"]):
        x, y = batch(seed=step)
        nets[0].set_trained(group)
        for net, trainer in zip(nets, trainers, strict=True):
            with autograd.record():
                loss = loss_fn(net(x), y)
            loss.backward()
            trainer[group].step(BATCH)
        other = nets[0].lambda_params() if group == "weights" else nets[0].weight_params()
        assert all(p.grad_req == "null" for p in other)
        for name in trained:
            np.testing.assert_allclose(nets[0].collect_params()[name].data().asnumpy(),
                                       nets[1].collect_params()[name].data().asnumpy(), rtol=1e-6, atol=1e-7,
                                       err_msg=f"{name} after a {group} step")
    nets[0].set_trained("all")
    assert [p.grad_req for p in nets[0].collect_params().values()] == \
        [p.grad_req for p in nets[1].collect_params().values()]
    with pytest.raises(ValueError, match="group must be one of"):
        nets[0].set_trained("lambda")


def test_set_trained_and_pruning_each_keep_their_parameters_off():
    net = supernet(True)
    before = {name: p.grad_req for name, p in net.collect_params().items()}
    names = net.block_lambda_names(0)
    lam = {p.name: p.data().asnumpy() for p in net.lambda_params()}
    lam[names["in3"]][:] = 0
    for p in net.lambda_params():
        p.set_data(mx.nd.array(lam[p.name]))
    net.set_trained("weights")
    net.set_masks(Genotype.from_network(net).block_masks())  # prunes in3 while the λ are frozen
    net.set_trained("all")
    params = net.collect_params()
    assert params[names["in3"]].grad_req == "null" and params[names["in2"]].grad_req == "write"
    net.set_trained("lambdas")
    net.set_masks([BlockMask.full(SPEC)] * net.num_blocks)  # in3 back in the graph, but λ steps only
    assert params[names["in3"]].grad_req == "write"
    assert all(p.grad_req == "null" for p in net.weight_params())
    net.set_trained("all")
    # back to the start; BN running statistics and the fixed BN scale never got a gradient on the way
    assert {name: p.grad_req for name, p in params.items()} == before
    assert "null" in before.values()
