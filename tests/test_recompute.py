"""Recomputed training steps (dsonas.recompute) equal ordinary ones: loss, gradients, BN statistics."""

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon

from dsonas.errors import ConfigError
from dsonas.genotype import BlockMask, Genotype
from dsonas.loop import Meter, train_step
from dsonas.network import DsoNet, compile_genotype
from dsonas.space import OP_SETS, BlockSpec, Skeleton

SPEC = BlockSpec(levels=3, ops=OP_SETS["dso"])
SKELETON = Skeleton("cifar", 8, (2, 1), 5, 8)
# ShuffleNASNet form: every block a cell inside a ShuffleNet V2 unit (a down unit opens each stage)
SHUFFLE_SPEC = BlockSpec(levels=2, ops=OP_SETS["shuffle"], merge="sum")
SHUFFLE_SKELETON = Skeleton("shuffle_cifar", 8, (1, 2), 5, 8)
BATCH = 4
KINDS = {"share": (True, SKELETON, SPEC), "full": (False, SKELETON, SPEC),
         "shuffle": (True, SHUFFLE_SKELETON, SHUFFLE_SPEC)}


def supernet(kind, recompute, seed=0):
    shared, skeleton, spec = KINDS[kind]
    net = DsoNet(skeleton, spec, [BlockMask.full(spec)] * skeleton.num_blocks, searchable=True, shared=shared,
                 bn_scale=False)
    mx.random.seed(seed)
    net.initialize(mx.init.Xavier(), ctx=[mx.cpu(0), mx.cpu(1)])
    rng = np.random.default_rng(seed)
    for p in net.lambda_params():
        p.set_data(mx.nd.array(rng.uniform(0.5, 1.5, size=p.shape)))
    net.set_recompute(recompute)
    net.hybridize(static_alloc=not recompute)
    return net


def batch(seed=0):
    rng = np.random.default_rng(seed)
    return mx.nd.array(rng.normal(size=(BATCH, 3, 8, 8))), mx.nd.array(rng.integers(0, 5, size=BATCH))


def one_step(net, seed=0):
    """Two device slices through loop.train_step with a learning-rate-0 trainer: loss, grads, BN stats."""
    x, y = batch(seed)
    xs = [x[:2].as_in_context(mx.cpu(0)), x[2:].as_in_context(mx.cpu(1))]
    ys = [y[:2].as_in_context(mx.cpu(0)), y[2:].as_in_context(mx.cpu(1))]
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.0}, kvstore="device")
    meter = Meter()
    train_step(net, gluon.loss.SoftmaxCrossEntropyLoss(), trainer, xs, ys, meter)
    grads = {name: p.grad(mx.cpu(0)).asnumpy() for name, p in net.collect_params().items()
             if p.grad_req != "null"}
    stats = {name: p.data(mx.cpu(1)).asnumpy() for name, p in net.collect_params().items()
             if name.endswith(("running_mean", "running_var"))}
    return meter.read(), grads, stats


def assert_same_step(a, b):
    (loss_a, acc_a), grads_a, stats_a = a
    (loss_b, acc_b), grads_b, stats_b = b
    assert loss_a == pytest.approx(loss_b, rel=1e-5) and acc_a == acc_b
    assert grads_a.keys() == grads_b.keys() and any("lam" in name for name in grads_a)
    for name, g in grads_a.items():
        scale = max(np.abs(grads_b[name]).max(), 1e-3)
        np.testing.assert_allclose(g, grads_b[name], rtol=0, atol=1e-4 * scale, err_msg=name)
    assert stats_a.keys() == stats_b.keys() and stats_a
    for name, value in stats_a.items():
        np.testing.assert_allclose(value, stats_b[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("kind", list(KINDS))
def test_recomputed_step_equals_the_ordinary_step(kind):
    ordinary, recomputed = supernet(kind, False), supernet(kind, True)
    assert all(p.grad_req in ("add", "null") for p in recomputed.collect_params().values())
    reference = one_step(ordinary)
    assert_same_step(one_step(recomputed), reference)
    # gradients are zeroed by each step, not summed across steps (grad_req 'add')
    assert_same_step(one_step(recomputed), one_step(ordinary))


@pytest.mark.parametrize("group", ["weights", "lambdas"])
def test_recomputed_step_of_one_group_equals_the_ordinary_step(group):
    """set_trained: a λ step has nothing to differentiate in the stem (its first segment)."""
    nets = [supernet("share", False), supernet("share", True)]
    for net in nets:
        net.set_trained(group)
    (loss_a, _), grads_a, _ = one_step(nets[1])
    (loss_b, _), grads_b, _ = one_step(nets[0])
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    trained = {p.name for p in (nets[0].lambda_params() if group == "lambdas" else nets[0].weight_params())}
    assert grads_a.keys() == grads_b.keys() and grads_a.keys() <= trained and grads_a
    for name, g in grads_a.items():
        scale = max(np.abs(grads_b[name]).max(), 1e-3)
        np.testing.assert_allclose(g, grads_b[name], rtol=0, atol=1e-4 * scale, err_msg=name)


def test_recompute_after_shrinking_uses_the_new_graphs():
    nets = [supernet("share", False), supernet("share", True)]
    for net in nets:
        one_step(net)  # trace every segment's graph on the full mask first
        lam = {p.name: p.data().asnumpy() for p in net.lambda_params()}
        names = net.block_lambda_names(0)
        lam[names["out"]][[1, 4]] = 0
        lam[names["in3"]][:, 2] = 0
        for p in net.lambda_params():
            p.set_data(mx.nd.array(lam[p.name]))
        net.set_masks(Genotype.from_network(net).block_masks())
    assert nets[1].masks[0] != BlockMask.full(SPEC)
    assert all(p.grad_req in ("add", "null") for p in nets[1].collect_params().values())
    assert_same_step(one_step(nets[1], seed=1), one_step(nets[0], seed=1))


def test_recompute_with_blocks_pruned_to_identity():
    """A full net whose second block keeps no op: that block is skipped as a segment (its output would be
    its own input, which backward through a lone hybridized graph would not reach)."""
    identity = BlockMask(inputs=((),) * SPEC.num_op_slots, outputs=())
    nets = [supernet("full", False), supernet("full", True)]
    for net in nets:
        net.set_masks([net.masks[0], identity, net.masks[2]])
    assert len(nets[1].segments(mx.cpu(0))) == 2 + SKELETON.num_blocks  # stem, 2 blocks, 1 reduction, head
    assert_same_step(one_step(nets[1]), one_step(nets[0]))


@pytest.mark.parametrize("kind", ["share", "full"])
def test_blocks_built_alike_share_one_graph(kind):
    """Stage 1's two blocks run one CachedOp (λ are inputs, so per-block λ do not stop it); a block whose
    mask differs gets its own, and the step still equals the ordinary one."""
    nets = [supernet(kind, False), supernet(kind, True)]
    assert_same_step(one_step(nets[1]), one_step(nets[0]))
    graphs = nets[1].segment_graphs
    assert len(nets[1].segment_layers()) == 5 and graphs.num_graphs == 4  # stem, 2 blocks, reduction, block
    if kind == "full":
        mask = nets[0].masks[1]
        pruned = BlockMask(inputs=mask.inputs, outputs=mask.outputs[1:])
        for net in nets:
            net.set_masks([net.masks[0], pruned, net.masks[2]])
        assert_same_step(one_step(nets[1]), one_step(nets[0]))
        assert graphs.num_graphs == 5


@pytest.mark.parametrize("kind", list(KINDS))
def test_segments_compose_to_the_network(kind):
    """Both forms: the net's own segments and the shared graphs dsonas.recompute runs."""
    net = supernet(kind, True)
    x, _ = batch()
    x = x.as_in_context(mx.cpu(0))
    expected = net(x).asnumpy()
    for segments in (net.segments(mx.cpu(0)), net.segment_graphs.segments(mx.cpu(0))):
        h = x
        for segment in segments:
            h = segment(h)
        np.testing.assert_allclose(h.asnumpy(), expected, rtol=1e-5, atol=1e-6)


def test_recompute_refuses_drop_path():
    genotype = Genotype.from_network(supernet("share", False))
    net = compile_genotype(genotype, drop_path=0.2)
    with pytest.raises(ConfigError, match="drop-path"):
        net.set_recompute(True)
    net = compile_genotype(genotype)
    net.set_recompute(True)
    with pytest.raises(ConfigError, match="drop-path"):
        net.set_drop_path(0.1)
