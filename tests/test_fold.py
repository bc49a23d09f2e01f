"""Folding BatchNorm into the convolution before it keeps the outputs, removes exactly the foldable
pairs and leaves everything else (shared conv outputs, BN after a pooling) in place."""

import json

import mxnet as mx
import numpy as np
import pytest
from gluoncv.model_zoo import get_model
from mxnet.gluon import nn
from test_export import genotype, trained_like

from dsonas.fold import fold_batchnorm, folded_block
from dsonas.network import compile_genotype


def graph_nodes(symbol):
    return json.loads(symbol.tojson())["nodes"]


def bn_input_ops(nodes):
    return [nodes[n["inputs"][0][0]]["op"] for n in nodes if n["op"] == "BatchNorm"]


def outputs_match(net, block, x):
    ref = net(x).asnumpy()
    np.testing.assert_allclose(block(x).asnumpy(), ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))


@pytest.mark.parametrize("model", ["dsonas", "shufflenet_v2", "mobilenetv2_1.0"])
def test_folding_keeps_outputs_and_removes_every_conv_bn_pair(model):
    x = mx.nd.array(np.random.RandomState(0).standard_normal((2, 3, 32, 32)))
    net = compile_genotype(genotype()) if model == "dsonas" else get_model(model, pretrained=False)
    net = trained_like(net, x=x)
    before = {p.name: p.data().asnumpy().copy() for p in net.collect_params().values()}
    nodes = graph_nodes(net(mx.sym.var("data")))
    pairs = bn_input_ops(nodes).count("Convolution")

    block, count = folded_block(net)
    folded = graph_nodes(block(mx.sym.var("data")))
    assert count == pairs > 0
    assert "Convolution" not in bn_input_ops(folded)
    assert len(folded) < len(nodes) and len(bn_input_ops(folded)) == len(bn_input_ops(nodes)) - count
    outputs_match(net, block, x)
    block.hybridize(static_alloc=True, static_shape=True)
    outputs_match(net, block, x)
    for p in net.collect_params().values():  # the source net is untouched
        np.testing.assert_array_equal(p.data().asnumpy(), before[p.name])
    out = block(x).asnumpy()
    for p in net.collect_params().values():  # ... and shares no memory with the block
        p.set_data(mx.nd.zeros(p.shape))
    np.testing.assert_array_equal(block(x).asnumpy(), out)


class ConvBN(nn.HybridBlock):
    """conv(bias) -> BN(γ) -> conv -> BN(fixed γ), then a conv whose output is read twice -> BN, and a
    pooling -> BN: two pairs fold, two BN stay."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.c1 = nn.Conv2D(6, 3, padding=1, use_bias=True, in_channels=3)
            self.b1 = nn.BatchNorm(scale=True, epsilon=1e-3, in_channels=6)
            self.c2 = nn.Conv2D(6, 1, use_bias=False, in_channels=6)
            self.b2 = nn.BatchNorm(scale=False, in_channels=6)
            self.c3 = nn.Conv2D(6, 1, use_bias=False, in_channels=6)
            self.b3 = nn.BatchNorm(in_channels=6)
            self.b4 = nn.BatchNorm(in_channels=6)

    def hybrid_forward(self, F, x):
        h = self.b2(self.c2(self.b1(self.c1(x))))
        shared = self.c3(h)
        pooled = F.Pooling(h, kernel=(3, 3), pad=(1, 1), pool_type="avg")
        return self.b3(shared) + shared + self.b4(pooled)


def test_bias_scale_and_unfoldable_bns():
    net = trained_like(ConvBN())
    x = mx.nd.array(np.random.RandomState(1).standard_normal((2, 3, 8, 8)))
    block, count = folded_block(net)
    assert count == 2
    assert sorted(bn_input_ops(graph_nodes(block(mx.sym.var("data"))))) == ["Convolution", "Pooling"]
    outputs_match(net, block, x)


def test_fold_batchnorm_does_not_modify_its_inputs_and_drops_bn_parameters():
    net = trained_like(ConvBN())
    net(mx.nd.zeros((1, 3, 8, 8)))
    symbol = net(mx.sym.var("data"))
    params = {p.name: p.data() for p in net.collect_params().values()}
    text = symbol.tojson()
    folded, new_params, count = fold_batchnorm(symbol, params)
    assert symbol.tojson() == text and set(params) == {p.name for p in net.collect_params().values()}
    assert set(new_params) == set(folded.list_arguments()[1:]) | set(folded.list_auxiliary_states())
    assert not any(name.startswith(("convbn0_batchnorm0_", "convbn0_batchnorm1_")) for name in new_params)
    assert count == 2


def test_a_net_without_parameters_folds_to_itself():
    from dsonas.ops import Identity

    block, count = folded_block(Identity())
    x = mx.nd.ones((1, 2, 3, 3))
    assert count == 0 and (block(x) == x).asnumpy().all()


def test_a_net_with_two_outputs_is_refused():
    net = trained_like(compile_genotype(genotype(), aux=True))
    net(mx.nd.zeros((1, 3, 16, 16)))
    with pytest.raises(ValueError, match="single-output"):
        folded_block(net)
