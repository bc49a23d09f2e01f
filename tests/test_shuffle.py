"""Shuffle skeletons: ShuffleNet V2 units around masked blocks, ShuffleNASNet cells as masks, ShuffleNet V2
as a genotype (same counts as GluonCV's), DSO search in the shuffle space, the mobile ops, G3/G4 counts."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

from dsonas import cost, engine
from dsonas.block import MaskedBlock
from dsonas.config import SHUFFLE_CONFIG, load_config
from dsonas.errors import ConfigError
from dsonas.genotype import BlockMask, Genotype, check_mask, derive_mask
from dsonas.network import DsoNet, build_supernet, compile_genotype
from dsonas.ops import OPS
from dsonas.shuffle import (
    FactorizedReduce,
    ShuffleUnit,
    channel_shuffle,
    shufflenet_v2_genotype,
    unit_strides,
)
from dsonas.space import BYPASSES, DEFAULT_BYPASS, OP_SETS, BlockSpec, Skeleton, check_space_kind

REPO = Path(__file__).resolve().parent.parent
GENOTYPES = REPO / "configs" / "genotypes"
# A ShuffleNASNet-form cell over the six ops, 3 levels (slots 0-5 level 1, 6-11 level 2, 12-17 level 3):
# conv_1x1 <- in; identity <- conv_1x1; sep_conv_3x3 <- in; output = sum(identity, sep_conv_3x3).
SHUFFLE = BlockSpec(levels=3, ops=OP_SETS["shuffle"], merge="sum", sep_repeats=2)
CELL = BlockMask(inputs=tuple({5: (0,), 10: (6,), 12: (0,)}.get(o, ()) for o in range(18)), outputs=(10, 12))
SKELETON = Skeleton("shuffle_cifar", 8, (1, 2, 1), 5, 8)


def rand(*shape, seed=0):
    return mx.nd.array(np.random.default_rng(seed).normal(size=shape))


def test_channel_shuffle_is_the_interleaving_and_its_inverse_restores():
    x = mx.nd.arange(2 * 6 * 2 * 3).reshape((2, 6, 2, 3))
    y = channel_shuffle(mx.nd, x, 6).asnumpy()
    assert y.shape == x.shape
    np.testing.assert_array_equal(y, x.asnumpy()[:, [0, 3, 1, 4, 2, 5]])  # halves interleaved
    np.testing.assert_array_equal(channel_shuffle(mx.nd, mx.nd.array(y), 6, 3).asnumpy(), x.asnumpy())
    three = channel_shuffle(mx.nd, x, 6, groups=3).asnumpy()
    np.testing.assert_array_equal(three, x.asnumpy()[:, [0, 2, 4, 1, 3, 5]])
    # Symbolically (what a hybridized net traces): only reshape codes 0 / -1, a swap, reshape_like.
    sym = channel_shuffle(mx.sym, mx.sym.var("x"), 6)
    ops = {n["op"]: n.get("attrs", {}) for n in __import__("json").loads(sym.tojson())["nodes"]}
    assert set(ops) == {"null", "Reshape", "SwapAxis", "reshape_like"}
    assert ops["Reshape"]["shape"] == "(0, 2, 3, -1)"


def unit(stride=1, in_channels=8, out_channels=8, mask=CELL, bypass="factorized", seed=0):
    cell = MaskedBlock(SHUFFLE, out_channels // 2, mask, searchable=False, bn_scale=True, residual=False,
                       prefix="cell_")
    u = ShuffleUnit(in_channels, out_channels, stride, cell, True, bypass, prefix="unit_")
    mx.random.seed(seed)
    u.initialize(mx.init.Xavier())
    return u


def test_the_bypassed_half_passes_through_untouched():
    u = unit()
    x = rand(2, 8, 5, 5)
    x.attach_grad()
    proj = rand(2, 4, 5, 5, seed=1)
    with autograd.record():  # training mode throughout (BN on batch statistics)
        y = channel_shuffle(mx.nd, u(x), 8, 4)  # inverse shuffle: [cell output | bypassed half]
        loss = (y[:, 4:] * proj).sum()
        cell_alone = u.cell(x[:, :4])
    loss.backward()
    np.testing.assert_array_equal(y[:, 4:].asnumpy(), x[:, 4:].asnumpy())
    np.testing.assert_array_equal(x.grad[:, 4:].asnumpy(), proj.asnumpy())  # identity Jacobian
    assert not x.grad[:, :4].asnumpy().any()  # the cell's half does not reach the bypassed outputs
    np.testing.assert_allclose(y[:, :4].asnumpy(), cell_alone.asnumpy(), rtol=1e-6)


def test_shufflenasnet_cell_has_no_residual():
    """Output = sum of the merged ops; the identity op carries conv_1x1's output (no '+ input')."""
    u = unit()
    x = rand(2, 4, 5, 5)
    cell = u.cell
    ops = cell._ops
    expected = ops[5](x) + ops[12](x)  # identity(conv_1x1(x)) + sep_conv_3x3(x)
    np.testing.assert_allclose(cell(x).asnumpy(), expected.asnumpy(), rtol=1e-5, atol=1e-6)
    assert SHUFFLE.op_name(5) == "conv_1x1" and SHUFFLE.op_name(10) == "identity"


@pytest.mark.parametrize("bypass", BYPASSES)
def test_downsampling_unit_doubles_channels_and_halves_resolution(bypass):
    u = unit(stride=2, in_channels=6, out_channels=12, mask=BlockMask.full(SHUFFLE), bypass=bypass)
    for size, out in ((8, 4), (7, 4)):
        assert u(rand(2, 6, size, size)).shape == (2, 12, out, out)


def test_factorized_reduction_shapes_params_and_pixel_grids():
    fr = FactorizedReduce(6, 10, bn_scale=True)
    fr.initialize()
    for size, out in ((8, 4), (7, 4), (1, 1)):
        assert fr(rand(2, 6, size, size)).shape == (2, 10, out, out)
    r = cost.count(fr, (1, 6, 8, 8))
    assert r.params == 6 * 5 + 6 * 5 + 2 * 10  # two 1x1 convs of 5 filters each, BN gamma and beta
    assert [lc.out_shape for lc in r.layers if lc.op == "Convolution"] == [(1, 5, 4, 4), (1, 5, 4, 4)]
    # Weights that copy channel 0: the first conv samples the even grid, the second the odd one.
    for conv in (fr.conv_even, fr.conv_odd):
        w = np.zeros(conv.weight.shape, dtype=np.float32)
        w[:, 0] = 1
        conv.weight.set_data(mx.nd.array(w))
    x = rand(1, 6, 7, 7)
    y = fr(x).asnumpy()  # BN in inference mode with mean 0, var 1: identity up to eps
    x0 = np.pad(x.asnumpy()[0, 0], ((0, 1), (0, 1)))
    np.testing.assert_allclose(y[0, 0], x0[0::2, 0::2][:4, :4], rtol=1e-4)
    np.testing.assert_allclose(y[0, 5], x0[1::2, 1::2][:4, :4], rtol=1e-4)


def test_shufflenasnet_genotype_compiles_and_hybridizes():
    genotype = Genotype(SKELETON, SHUFFLE, True, [CELL])
    net = compile_genotype(genotype)
    net.initialize(mx.init.Xavier())
    x = rand(3, 3, 8, 8)
    ref = net(x).asnumpy()
    assert ref.shape == (3, 5)
    net.hybridize(static_alloc=True)
    np.testing.assert_allclose(net(x).asnumpy(), ref, rtol=1e-5, atol=1e-6)
    # one sep_conv_3x3 (applied twice) and one conv_1x1 per cell, no merge conv, no residual add
    r = cost.count(net, (1, 3, 8, 8))
    per_block = cost.network_block_costs(net, bn_scale=True)
    for b in range(SKELETON.num_blocks):
        inside = r.within(f"{net.prefix}cell{b}_")
        assert all(per_block[m][b] == inside[m] for m in cost.METRICS), b
    assert r.elementwise["add"]["ops"] == SKELETON.num_blocks  # each cell's sum of two ops; no residual add
    # BN after a sum of several ops by default (ShuffleNASNets' option; it keeps the scale from compounding)
    assert [u.cell_bn is not None for u in units(net)] == [True] * SKELETON.num_blocks
    assert all(u.cell_bn is None for u in units(compile_genotype(genotype, cell_bn=False)))
    one_output = BlockMask(inputs=CELL.inputs[:12] + ((),) * 6, outputs=(10,))
    assert units(compile_genotype(Genotype(SKELETON, SHUFFLE, True, [one_output])))[0].cell_bn is None


def units(net):
    found = []
    net.apply(lambda b: found.append(b) if isinstance(b, ShuffleUnit) else None)
    return found


def test_skeleton_layout_and_validation():
    assert unit_strides("shuffle_cifar", (4, 5, 5)) == [1] * 4 + [2] + [1] * 4 + [2] + [1] * 4
    assert unit_strides("shuffle_imagenet", (2, 1)) == [2, 1, 2]
    with pytest.raises(ConfigError, match="skeleton.filters"):
        Skeleton("shuffle_cifar", 9, (1,), 10, 32)
    with pytest.raises(ConfigError, match="bypass"):
        compile_genotype(shufflenet_v2_genotype("shuffle_cifar", 8, (1, 1), 10, 8), bypass="nope")
    with pytest.raises(ConfigError, match="shuffle skeletons"):
        DsoNet(Skeleton("cifar", 8, (1,), 10, 8), SHUFFLE, [CELL], searchable=False, shared=True,
               cell_bn=True)


def test_max_inputs_per_op_one_gives_one_input_per_op():
    rng = np.random.default_rng(0)
    for trial in range(20):
        lams = {k: rng.uniform(0, 1, size=s) * (rng.uniform(size=s) > 0.3)
                for k, s in SHUFFLE.lambda_shapes().items()}
        mask = derive_mask(SHUFFLE, lams, max_inputs_per_op=1)
        check_mask(SHUFFLE, mask)
        assert mask.live_slots() and all(len(mask.inputs[o]) == 1 for o in mask.live_slots()), trial
        # Every node alive before output pruning (all outputs kept): the kept input must be the largest λ.
        forward = derive_mask(SHUFFLE, {**lams, "out": np.ones(SHUFFLE.num_op_slots)}, max_inputs_per_op=1)
        for o in mask.live_slots():
            level = SHUFFLE.level_of(o)
            if level > 1:
                row = lams[f"in{level}"][o - (level - 1) * SHUFFLE.n_ops]
                alive = [k for k in SHUFFLE.candidate_inputs(o)
                         if row[k] and (k == 0 or forward.inputs[k - 1])]
                assert row[mask.inputs[o][0]] == max(row[k] for k in alive)


# ------------------------------------------------------------------------------------------ ShuffleNet V2
def test_shipped_shufflenet_v2_genotypes_are_the_builder_output():
    imagenet = Genotype.load(GENOTYPES / "shufflenet_v2_1.0_imagenet.json")
    assert imagenet.to_dict() == shufflenet_v2_genotype().to_dict()
    cifar = Genotype.load(GENOTYPES / "shufflenet_v2_1.0_cifar.json")
    assert cifar.to_dict() == shufflenet_v2_genotype("shuffle_cifar", 116, (4, 8, 4), 10, 32).to_dict()


def test_shufflenet_v2_genotype_matches_gluoncv():
    """Within 3% of GluonCV's shufflenet_v2 (1.0x) and of the published 146M MACs / 2.3M params."""
    from gluoncv.model_zoo import get_model

    ours = cost.count(compile_genotype(Genotype.load(GENOTYPES / "shufflenet_v2_1.0_imagenet.json")),
                      (1, 3, 224, 224))
    ref = cost.count(get_model("shufflenet_v2", pretrained=False), (1, 3, 224, 224))
    for metric in ("params", "macs"):
        assert abs(getattr(ours, metric) - getattr(ref, metric)) <= 0.03 * getattr(ref, metric)
    assert abs(ours.macs - 146e6) <= 0.03 * 146e6 and abs(ours.params - 2.3e6) <= 0.03 * 2.3e6
    # The same layers in fact: counts, memory access and the G3/G4 figures agree exactly.
    assert (ours.params, ours.macs, ours.mac) == (ref.params, ref.macs, ref.mac) == (2_278_604, 144_907_992,
                                                                                  18_180_104)
    assert (ours.fragments, ours.max_parallel, ours.elementwise) == (ref.fragments, ref.max_parallel,
                                                                     ref.elementwise)


def test_fragments_and_elementwise_counts_by_hand():
    conv = BlockMask(inputs=tuple({5: (0,)}.get(o, ()) for o in range(18)), outputs=(5,))
    r = cost.count(unit(mask=conv), (1, 8, 4, 4))
    # split (2 slices) -> conv_1x1 (conv, BN, ReLU) -> concat -> shuffle (reshape, swap, reshape_like)
    assert r.fragments == 1 and r.max_parallel == 1
    assert r.elementwise == {"split": {"ops": 2, "mac": 2 * 4 * 16 * 2}, "activation": {"ops": 1, "mac": 128},
                             "concat": {"ops": 1, "mac": 256}, "shuffle": {"ops": 1, "mac": 256}}
    assert r.elementwise_ops == 5 and r.elementwise_mac == 256 + 128 + 256 + 256
    down = cost.count(unit(stride=2, mask=conv), (1, 8, 4, 4))
    # entry 1x1 + depthwise, factorized bypass' two convs side by side with the entry's 1x1, cell 1x1
    assert down.fragments == 5 and down.max_parallel == 3
    assert down.elementwise["pad"]["ops"] == 1 and "add" not in down.elementwise


# ------------------------------------------------------------------------------------------ search space
def shuffle_supernet(formulation="fast"):
    space = SimpleNamespace(kind="shuffle", levels=3, ops="shuffle", merge="sum", sep_repeats=2)
    skeleton = SimpleNamespace(kind="shuffle_cifar", filters=8, stages=[1, 1, 1], num_classes=None,
                               bypass=None)
    net = build_supernet(space, skeleton, num_classes=4, input_size=8, formulation=formulation)
    mx.random.seed(0)
    net.initialize(mx.init.Xavier())
    return net


def grads(net, x):
    proj = rand(x.shape[0], 4, seed=5)
    with autograd.record():
        loss = (net(x) * proj).sum()
    loss.backward()
    return loss.asscalar(), {p.name: p.grad().asnumpy().copy() for p in net.lambda_params()}


def test_shuffle_supernet_every_lambda_gets_a_gradient_and_hybridizes():
    net = shuffle_supernet()
    assert net.shared and len(net.lambda_params()) == len(SHUFFLE.lambda_keys())
    assert cost.block_geometry(net) == [(4, 8), (8, 4), (16, 2)]  # each cell sees half of its unit
    x = rand(4, 3, 8, 8)
    loss, lam = grads(net, x)
    for name, g in lam.items():
        assert np.all(g != 0), name  # every entry, not just some
    net.hybridize(static_alloc=True)
    loss_h, lam_h = grads(net, x)
    assert abs(loss_h - loss) <= 1e-4 * abs(loss)
    for name in lam:
        np.testing.assert_allclose(lam_h[name], lam[name], rtol=1e-3, atol=1e-5)


def test_shuffle_supernet_derives_shufflenasnet_cells():
    net = shuffle_supernet()
    rng = np.random.default_rng(3)
    for p in net.lambda_params():
        p.set_data(mx.nd.array(rng.uniform(0.1, 1, size=p.shape) * (rng.uniform(size=p.shape) > 0.4)))
    genotype = Genotype.from_network(net, max_inputs_per_op=1)
    (mask,) = genotype.masks
    assert all(len(mask.inputs[o]) == 1 for o in mask.live_slots())
    derived = compile_genotype(genotype, aux=True, drop_path=0.2)
    derived.initialize()
    logits, aux = derived(rand(2, 3, 8, 8))
    assert logits.shape == aux.shape == (2, 4)
    # Shrinking the supernet in place (what search does every epoch) works inside the units too.
    net.set_masks([mask] * net.num_blocks)
    assert net.masks == [mask] * 3 and net(rand(2, 3, 8, 8)).shape == (2, 4)
    dead = [o for o in range(SHUFFLE.num_op_slots)
            if not mask.inputs[o] and SHUFFLE.op_name(o) in ("sep_conv_3x3", "sep_conv_5x5", "conv_1x1")]
    assert dead and all(p.grad_req == "null" for o in dead
                        for p in net.collect_params(f".*cell0_op{o}_.*weight").values())


def test_search_configs():
    cfg = load_config(REPO / "configs" / "shuffle_default.yaml")
    assert (cfg.space.kind, cfg.skeleton.kind, cfg.space.merge) == ("shuffle", "shuffle_cifar", "sum")
    assert cfg.search.max_inputs_per_op == 1 and tuple(cfg.space.ops) == OP_SETS["shuffle"]
    with pytest.raises(ConfigError, match="space.kind"):
        build_supernet(SimpleNamespace(**{**vars(cfg.space), "kind": "shuffle"}),
                       SimpleNamespace(**{**vars(cfg.skeleton), "kind": "cifar"}), 10, 32)
    check_space_kind("shuffle", "shuffle_imagenet")
    check_space_kind("full", "cifar")
    with pytest.raises(ConfigError, match="skeleton.kind"):
        check_space_kind("share", "shuffle_cifar")
    mobile = load_config(REPO / "configs" / "mobile_full.yaml")
    assert mobile.space.kind == "full" and tuple(mobile.space.ops) == OP_SETS["mobile"]


# ------------------------------------------------------------------------------------------ mobile ops
@pytest.mark.parametrize("kernel, expand", [(3, 3), (3, 6), (5, 3), (5, 6)])
def test_mbconv_keeps_shape_and_counts(kernel, expand):
    c, wide = 4, 4 * expand
    op = OPS[f"mbconv_k{kernel}_e{expand}"](c, True, 1)
    op.initialize()
    assert op(rand(2, c, 6, 6)).shape == (2, c, 6, 6)
    r = cost.count(op, (1, c, 6, 6))
    assert r.params == c * wide + 2 * wide + wide * kernel ** 2 + 2 * wide + wide * c + 2 * c
    assert r.macs == 36 * (c * wide + wide * kernel ** 2 + wide * c)  # 5x5: 25 MACs, though run as 2 5x3
    assert [lc.op for lc in r.layers][-1] == "BatchNorm"  # linear bottleneck: no ReLU after the projection
    assert r.fragments == (3 if kernel == 3 else 4)  # fragments as run: the 5x5 depthwise is two kernels


def test_mobile_full_supernet_runs():
    space = SimpleNamespace(kind="full", levels=2, ops="mobile", merge="sum", sep_repeats=1)
    skeleton = SimpleNamespace(kind="cifar", filters=8, stages=[1, 1], num_classes=None, bypass=None)
    net = build_supernet(space, skeleton, num_classes=3, input_size=8)
    net.initialize()
    assert not net.shared and net(rand(2, 3, 8, 8)).shape == (2, 3)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed")
def test_shuffle_net_exports_to_onnx(tmp_path):
    from dsonas import export as ex

    net = compile_genotype(shufflenet_v2_genotype("shuffle_imagenet", 8, (1, 2), 10, 32))
    net.initialize(mx.init.Xavier())
    res = ex.export(net, tmp_path / "m", (2, 3, 32, 32), onnx=True, log=lambda m: None)
    assert res.max_abs_diff <= 1e-5 and res.onnx_max_abs_diff <= 1e-4



def param_names(net, part=""):
    return sorted(name for name in net.collect_params() if part in name)


def test_genotype_records_the_bypass_and_compiles_it(tmp_path):
    assert set(DEFAULT_BYPASS.values()) <= set(BYPASSES)
    default = Genotype(SKELETON, SHUFFLE, True, [CELL])  # stages (1, 2, 1): two downsampling units
    path = tmp_path / "genotype.json"
    Genotype(**{**vars(default), "bypass": "sep_conv_3x3_x2"}).save(path)
    back = Genotype.load(path)
    assert back.bypass == "sep_conv_3x3_x2"
    separable = param_names(compile_genotype(back))
    # two stacked separable convs (4 convs, 4 BNs) instead of the factorized reduction's 2 convs and 1 BN
    assert len(separable) == len(param_names(compile_genotype(default))) + 2 * (2 + 3 * 4)
    assert param_names(compile_genotype(back, bypass="factorized")) == param_names(compile_genotype(default))


def test_search_writes_the_supernets_bypass_into_the_genotype():
    supernet = shuffle_supernet()
    assert engine.genotype_of(SimpleNamespace(net=supernet, spec=SHUFFLE), supernet.masks).bypass == \
        DEFAULT_BYPASS["shuffle_cifar"]
    net = DsoNet(SKELETON, SHUFFLE, [BlockMask.full(SHUFFLE)] * 4, searchable=True, shared=True,
                 bn_scale=False, bypass="reduction", cell_bn=True)
    net.initialize()
    for genotype in (Genotype.from_network(net),
                     engine.genotype_of(SimpleNamespace(net=net, spec=SHUFFLE), net.masks)):
        assert (genotype.bypass, genotype.cell_bn) == ("reduction", True)
        assert param_names(compile_genotype(genotype), "_bypass_") == param_names(net, "_bypass_")


def test_skeleton_bypass_from_the_config_reaches_the_supernet_and_its_genotype():
    cfg = load_config(SHUFFLE_CONFIG, ["skeleton.bypass=sep_conv_3x3_x2", "skeleton.stages=[1,1]"])
    net = build_supernet(cfg.space, cfg.skeleton, 10, cfg.data.input_size)
    net.initialize()
    assert net.bypass == "sep_conv_3x3_x2"
    assert Genotype.from_network(net).bypass == "sep_conv_3x3_x2"
    with pytest.raises(ConfigError, match="skeleton.bypass"):
        load_config(None, ["skeleton.bypass=factorized"])  # the default cifar skeleton has no bypass
    with pytest.raises(ConfigError, match="skeleton.bypass"):
        load_config(SHUFFLE_CONFIG, ["skeleton.bypass=shortcut"])


def test_summary_of_a_shuffle_cell_has_no_residual():
    text = Genotype(SKELETON, SHUFFLE, True, [CELL]).summary()
    assert "  out = sum(op10, op12)\n" in text + "\n" and "+ in" not in text

