"""Cost model: exact counts on hand-computable nets, published figures for GluonCV models, the width
solver and the latency cache.

MAC (memory access) figures below are in elements: inputs read + outputs written + weights read.
"""

import json
import re

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

from dsonas import cost
from dsonas.errors import BudgetError, ConfigError
from dsonas.genotype import BlockMask, Genotype, derive_mask
from dsonas.network import DsoNet, compile_genotype
from dsonas.space import BlockSpec, Skeleton


def _init(net):
    net.initialize()
    return net


def test_single_conv_exact():
    net = _init(nn.Conv2D(8, 3, padding=1, in_channels=3, use_bias=True))
    r = cost.count(net, (1, 3, 10, 10))
    assert r.params == 8 * 3 * 9 + 8
    assert r.macs == 8 * 10 * 10 * 3 * 9  # bias adds are not multiply-adds
    assert r.flops == 2 * r.macs
    assert r.mac == 3 * 100 + 8 * 100 + 224  # read input, write output, read weights and bias
    assert [lc.op for lc in r.layers] == ["Convolution"]
    assert r.layers[0].out_shape == (1, 8, 10, 10)


def test_depthwise_conv_counts_cin_over_groups():
    net = _init(nn.Conv2D(6, 3, padding=1, groups=6, in_channels=6, use_bias=False))
    r = cost.count(net, (1, 6, 8, 8))
    assert r.params == 6 * 9
    assert r.macs == 6 * 64 * 9
    assert r.mac == 384 + 384 + 54


def test_dense_layer_and_batch():
    net = _init(nn.Dense(10, in_units=20))
    r = cost.count(net, (2, 20))
    assert r.params == 210
    assert r.macs == 2 * 10 * 20
    assert r.mac == 40 + 20 + 210


class TwoBranch(nn.HybridBlock):
    """x -> [1x1 conv | 3x3 conv + relu] -> concat -> BN without scale -> keep 4 channels -> flatten."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.a = nn.Conv2D(4, 1, in_channels=2, use_bias=False)
            self.b = nn.Conv2D(4, 3, padding=1, in_channels=2, use_bias=False)
            self.bn = nn.BatchNorm(scale=False, in_channels=8)

    def hybrid_forward(self, F, x):
        y = F.concat(self.a(x), F.Activation(self.b(x), act_type="relu"), dim=1)
        return F.flatten(F.slice_axis(self.bn(y), axis=1, begin=0, end=4))


@pytest.mark.parametrize("hybridize", [False, True])
def test_two_branch_exact(hybridize):
    net = _init(TwoBranch())
    if hybridize:  # a hybridized net that already ran: its children's forward hooks would not fire
        net.hybridize()
        net(mx.nd.ones((1, 2, 6, 6)))
    r = cost.count(net, (1, 2, 6, 6))
    hw = 36
    # 1x1 conv (8 weights), 3x3 conv (72), BN with fixed gamma: only beta (8) is learnable.
    assert r.params == 8 + 72 + 8
    assert r.macs == 4 * hw * 2 + 4 * hw * 2 * 9
    per_op = {lc.op: lc.mac for lc in r.layers}
    assert per_op["Activation"] == 2 * 4 * hw
    assert per_op["Concat"] == 2 * 8 * hw
    assert per_op["BatchNorm"] == 2 * 8 * hw + 4 * 8  # gamma, beta, running mean and var are read
    assert per_op["slice_axis"] == 2 * 4 * hw  # reads only what it keeps
    assert per_op["Flatten"] == 0  # a view
    conv_mac = (2 * hw + 4 * hw + 8) + (2 * hw + 4 * hw + 72)
    assert r.mac == conv_mac + 288 + 576 + 608 + 288
    assert sum(lc.params for lc in r.layers) == r.params
    assert not r.uncounted_ops


def test_grouped_conv_and_deconv():
    r = cost.count(_init(nn.Conv2D(8, 3, padding=1, groups=2, in_channels=4, use_bias=False)), (1, 4, 5, 5))
    assert (r.params, r.macs) == (8 * 2 * 9, 8 * 25 * 2 * 9)
    # Transposed conv: every input pixel scatters a Cout/groups x k x k kernel.
    r = cost.count(_init(nn.Conv2DTranspose(4, 3, in_channels=2, use_bias=False)), (1, 2, 5, 5))
    assert (r.params, r.macs, r.layers[0].out_shape) == (2 * 4 * 9, 2 * 25 * 4 * 9, (1, 4, 7, 7))


def test_batched_dot_macs():
    a, b = mx.sym.var("data"), mx.sym.var("w", shape=(5, 7))
    r = cost.count(mx.sym.dot(a, b), (3, 5))
    assert (r.macs, r.params) == (3 * 7 * 5, 35)
    r = cost.count(mx.sym.batch_dot(a, a, transpose_b=True), (2, 3, 4))
    assert r.macs == 2 * 3 * 3 * 4


def test_bad_input_shape_is_a_user_error():
    net = _init(nn.Dense(10, in_units=20))
    with pytest.raises(ConfigError, match="input shape"):
        cost.count(net, (2, 21))


def _zoo(name, size):
    from gluoncv.model_zoo import get_model

    return cost.count(get_model(name, pretrained=False), (1, 3, size, size))


@pytest.mark.parametrize("name,size,macs,params", [
    ("mobilenet1.0", 224, 569e6, 4.2e6),        # MobileNet paper Table 8 (counted here: 568.7M, 4.232M)
    ("shufflenet_v2", 224, 146e6, 2.3e6),       # ShuffleNet V2 1.0x, Table 5 (144.9M, 2.279M)
    ("resnet50_v1b", 224, 4.1e9, 25.6e6),       # torchvision-style ResNet-50 (4089M, 25.56M)
    ("cifar_resnet20_v1", 32, 41e6, 0.27e6),    # He et al. CIFAR ResNet-20 (40.8M, 0.2725M)
])
def test_published_figures(name, size, macs, params):
    r = _zoo(name, size)
    assert abs(r.macs - macs) / macs < 0.02
    assert abs(r.params - params) / params < 0.01
    assert not r.uncounted_ops


def test_published_mobilenetv2():
    """MobileNetV2 1.0: 300M MACs, 3.47M params (paper Table 4 / TF-slim).

    The published 3.47M counts conv and dense weights only (BN folded into the convs): GluonCV's
    definition has exactly 3,469,760 of those. Our convention also counts BN's learnable γ, β (34,112
    here), giving 3,503,872 — still within 1% of 3.47M, and the weight-only part matches exactly.
    """
    r = _zoo("mobilenetv2_1.0", 224)
    assert abs(r.macs - 300e6) / 300e6 < 0.02  # 300.8M
    assert abs(r.params - 3.47e6) / 3.47e6 < 0.01
    weights = sum(lc.params for lc in r.layers if lc.op in ("Convolution", "FullyConnected"))
    assert weights == 3_469_760
    assert r.params - weights == 34_112


def test_published_resnet50_v1():
    """ResNet-50 v1: GluonCV's `resnet50_v1` puts the stride-2 on the first 1x1 conv of a bottleneck (the
    original Caffe model, He et al. 2016): 3.86G MACs, matching the paper's "3.8 × 10^9 FLOPs" (which are
    multiply-adds). The often-quoted 4.1G is the stride-on-3x3 variant (torchvision; GluonCV
    `resnet50_v1b`, checked in `test_published_figures`). Same 25.6M params for both.
    """
    r = _zoo("resnet50_v1", 224)
    assert abs(r.macs - 3.8e9) / 3.8e9 < 0.02  # 3858M
    assert abs(r.params - 25.6e6) / 25.6e6 < 0.01  # 25.58M


class WideNet(nn.HybridBlock):
    """A width-parameterised toy: two 3x3 convs and a classifier."""

    def __init__(self, width, **kwargs):
        super().__init__(**kwargs)
        c = max(1, int(round(16 * width)))
        with self.name_scope():
            self.body = nn.HybridSequential()
            self.body.add(nn.Conv2D(c, 3, padding=1, use_bias=False), nn.BatchNorm(), nn.Activation("relu"),
                          nn.Conv2D(2 * c, 3, padding=1, strides=2, use_bias=False), nn.BatchNorm(),
                          nn.GlobalAvgPool2D(), nn.Dense(10))

    def hybrid_forward(self, F, x):
        return self.body(x)


def test_solve_width_mult_hits_macs_target():
    shape = (1, 3, 32, 32)
    target = 1.01 * cost.count(WideNet(1.3), shape).macs  # reachable: a step of the channel count lies near
    w = cost.solve_width_mult(WideNet, target, metric="macs", input_shape=shape)
    got = cost.count(WideNet(w), shape).macs
    assert abs(got - target) / target <= 0.02


def test_solve_width_mult_between_channel_steps():
    """16*w rounded: 22 channels give 2.84M MACs, 23 give 3.07M; 2.95M is 4% from both."""
    reach = r"\(width multipliers 0\.1\.\.4\.0 give 0\.07377M MACs\.\.20\.65M MACs\)"
    with pytest.raises(BudgetError, match=rf"nearest is 2\.839M MACs at width [\d.]+ {reach}"):
        cost.solve_width_mult(WideNet, 2.95e6, metric="macs", input_shape=(1, 3, 32, 32))


def test_solve_width_mult_params_and_impossible_target():
    w = cost.solve_width_mult(WideNet, 20e3, metric="params", input_shape=(1, 3, 32, 32))
    assert abs(cost.count(WideNet(w), (1, 3, 32, 32)).params - 20e3) / 20e3 <= 0.02
    with pytest.raises(BudgetError, match=r"out of reach.*give"):
        cost.solve_width_mult(WideNet, 1e12, input_shape=(1, 3, 32, 32))


def test_measure_latency_times_the_bn_folded_net(monkeypatch):
    from dsonas import fold

    timed, real = [], fold.folded_block

    def folding(net):
        block, count = real(net)
        timed.append(count)
        return block, count

    monkeypatch.setattr(fold, "folded_block", folding)
    net = nn.HybridSequential()
    net.add(nn.Conv2D(4, 3, padding=1, use_bias=False), nn.BatchNorm(), nn.Activation("relu"))
    ms = cost.measure_latency(net, (1, 3, 8, 8), repeats=3, warmup=1)
    assert 0 < ms < 1000 and timed == [1]


def test_latency_table_times_ops_as_deployed(tmp_path, monkeypatch):
    from dsonas.ops import DepthwiseConv

    splits = []

    def record(block, *args, **kwargs):
        block.apply(lambda b: splits.append(b.split) if isinstance(b, DepthwiseConv) else None)
        return 1.0

    monkeypatch.setattr(cost, "measure_latency", record)
    table = cost.LatencyTable(tmp_path / "lat.json", repeats=1, warmup=1)
    assert table.op_latency("sep_conv_5x5", 8, 8) == 1.0
    assert splits == [False]  # one plain 5x5 depthwise convolution, not the training split


# ------------------------------------------------------------------------------ block-level costs
SPEC = BlockSpec(levels=3, ops=("sep_conv_3x3", "max_pool_3x3"), merge="concat")
SKELETON = Skeleton("cifar", 8, (1, 2), 10, 16)


def _random_mask(spec, rng, zero_frac=0.4):
    lams = {k: rng.uniform(0.5, 1, size=shape) * (rng.uniform(size=shape) > zero_frac)
            for k, shape in spec.lambda_shapes().items()}
    return derive_mask(spec, lams)


def test_op_costs_hand_computed():
    c, hw = 8, 36
    costs = cost.op_costs(SPEC, c, 6)
    assert costs["macs"].shape == (SPEC.num_op_slots,)
    sep = {"macs": c * hw * 9 + c * c * hw,
           "params": c * 9 + c * c + c,  # depthwise, pointwise, BN beta (BN scale fixed during search)
           "mac": (2 * c * hw + c * 9) + (2 * c * hw + c * c) + (2 * c * hw + 4 * c) + 2 * c * hw}
    pool = {"macs": 0, "params": c, "mac": 2 * c * hw + (2 * c * hw + 4 * c) + 2 * c * hw}
    for m in cost.METRICS:
        assert list(costs[m]) == [sep[m], pool[m]] * SPEC.levels


def test_slot_costs_add_up_to_exact_block_macs():
    """MACs of a derived block = Σ over live slots of op + edge·inputs + out (sums add no MACs)."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        mask = _random_mask(SPEC, rng)
        split = cost.slot_costs(SPEC, 8, 6, "macs")
        n_in = np.array([len(nodes) for nodes in mask.inputs], dtype=float)
        is_out = np.isin(np.arange(SPEC.num_op_slots), mask.outputs).astype(float)
        additive = split.slot_costs(n_in, is_out)[list(mask.live_slots())].sum()
        assert additive == cost.block_cost(SPEC, mask, 8, 6)["macs"]
    assert cost.block_fixed_cost(SPEC, 8, 6, 3)["macs"] == 3 * 8 * 8 * 36  # 1x1 conv over 3 maps


def test_network_block_costs_match_the_counted_net():
    rng = np.random.default_rng(1)
    masks = [_random_mask(SPEC, rng) for _ in range(SKELETON.num_blocks - 1)] + [_identity(SPEC)]
    net = DsoNet(SKELETON, SPEC, masks, searchable=False, shared=False, bn_scale=False)
    assert cost.block_geometry(net) == [(8, 16), (16, 8), (16, 8)]  # identity block included
    per_block = cost.network_block_costs(net)
    whole = cost.count(net, (1, 3, 16, 16))
    for b in range(SKELETON.num_blocks):
        inside = whole.within(f"{net.prefix}cell{b}_")
        for m in cost.METRICS:
            assert per_block[m][b] == inside[m], (b, m)
    assert per_block["macs"][-1] == 0
    # A searchable supernet (and a bare skeleton) give the same geometry, so the same costs for new masks.
    supernet = DsoNet(SKELETON, SPEC, [BlockMask.full(SPEC)] * 3, searchable=True, shared=True,
                      bn_scale=False)
    for other in (cost.network_block_costs(supernet, masks=masks),
                  cost.network_block_costs(SKELETON, SPEC, masks)):
        assert all(np.array_equal(other[m], per_block[m]) for m in cost.METRICS)
    assert len(cost.network_slot_costs(supernet, "mac")) == 3


def _identity(spec):
    return BlockMask(inputs=((),) * spec.num_op_slots, outputs=())


# 16 filters, one block per stage: in multiples of 8 a width step is half of stage 1, so cost(width) is a
# coarse step function (7 of the 12 targets below fall between its steps).
SMALL = Genotype(skeleton=Skeleton("cifar", 16, (1, 1, 1), 10, 16), spec=SPEC, shared=True,
                 masks=[BlockMask.full(SPEC)])
SMALL_INPUT = (1, 3, 16, 16)
DIVISORS = (8, 4, 2, 1)


def _small_net(w, divisor):
    return compile_genotype(SMALL, w, channel_divisor=divisor)


def _small_macs(w, divisor):
    return cost.count(_small_net(w, divisor), SMALL_INPUT).macs


def test_solve_width_lands_every_target_of_the_range_falling_back_to_finer_divisors():
    """12 MACs targets spread over [narrowest, widest] in multiples of 8 all land within 2%."""
    used = set()
    for target in np.geomspace(_small_macs(0.1, 8), _small_macs(4.0, 8), 12):
        sol = cost.solve_width(_small_net, target, DIVISORS, input_shape=SMALL_INPUT)
        assert sol.cost == _small_macs(sol.width_mult, sol.channel_divisor)
        assert abs(sol.cost - target) <= 0.02 * target, (target, sol)
        used.add(sol.channel_divisor)
    assert 8 in used and used - {8}  # the first divisor whenever it lands, finer ones where it cannot
    # Below the narrowest net in multiples of 8 (every stage 8 channels) only a finer divisor reaches.
    below = cost.solve_width(_small_net, 0.7 * _small_macs(0.1, 8), DIVISORS, input_shape=SMALL_INPUT)
    assert below.channel_divisor < 8


def test_solve_width_refuses_a_target_out_of_range_naming_the_range():
    lo, hi = _small_macs(0.1, 1), _small_macs(4.0, 8)  # the finest divisor reaches lowest
    span = re.escape(f"width multipliers 0.1..4.0 give {lo / 1e6:.4g}M MACs..{hi / 1e6:.4g}M MACs")
    for target in (0.5 * lo, 2 * hi):
        with pytest.raises(BudgetError, match=f"out of reach: {span}; choose a target in that range"):
            cost.solve_width(_small_net, target, DIVISORS, input_shape=SMALL_INPUT)


def test_latency_table_cache_roundtrip(tmp_path, monkeypatch):
    path = tmp_path / "lat.json"
    table = cost.LatencyTable(path, repeats=2, warmup=1)
    row = table.op_costs(SPEC, 4, 8)
    assert row.shape == (SPEC.num_op_slots,) and (row > 0).all()
    assert np.array_equal(row[:2], row[2:4])  # same op, same shape at every level
    assert table.measured == 2
    saved = json.loads(path.read_text())
    assert saved["version"] == cost.LatencyTable.VERSION and len(saved["devices"][table.device]) == 2

    monkeypatch.setattr(cost, "measure_latency", lambda *a, **k: pytest.fail("re-measured a cached op"))
    again = cost.LatencyTable(path)
    assert np.array_equal(again.op_costs(SPEC, 4, 8), row) and again.measured == 0


def test_latency_cache_corrupt_file(tmp_path):
    path = tmp_path / "lat.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="delete it"):
        cost.LatencyTable(path)


# ---------------------------------------------------------------------------------- count_flops tool
def _run_tool(monkeypatch, capsys, *argv):
    import count_flops
    from common import run_tool

    monkeypatch.setattr("sys.argv", ["count_flops.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        run_tool(count_flops.main)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_count_flops_json_side_by_side(tmp_path, monkeypatch, capsys):
    path = tmp_path / "genotype.json"
    Genotype(skeleton=SKELETON, spec=SPEC, shared=True, masks=[BlockMask.full(SPEC)]).save(path)
    code, out, _ = _run_tool(monkeypatch, capsys, "--genotype", str(path), "--model", "cifar_resnet20_v1",
                             "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["name"] for r in rows] == [str(path), "cifar_resnet20_v1"]
    assert rows[0]["input_shape"] == [1, 3, 16, 16] and rows[1]["input_shape"] == [1, 3, 32, 32]
    assert rows[1]["macs"] == 40_813_184 and rows[1]["params"] == 272_474
    assert set(rows[0]) == {"name", "input_shape", "params", "macs", "mac", "fragments", "max_parallel",
                            "elementwise_ops", "elementwise_mac", "elementwise"}  # latency only when measured

    code, out, _ = _run_tool(monkeypatch, capsys, "--genotype", str(path), "--latency", "--repeats", "3",
                             "--json")
    assert code == 0 and json.loads(out)["latency_ms"] > 0

    code, out, _ = _run_tool(monkeypatch, capsys, "--genotype", str(path), "--width-mult", "2", "--latency",
                             "--repeats", "3")
    head = out.splitlines()[0]
    assert code == 0 and "FLOPs=2xMACs" in head and "latency (ms)" in head and "@2/8" in out

    code, out, _ = _run_tool(monkeypatch, capsys, "--genotype", str(path), "--width-mult", "0.75",
                             "--channel-divisor", "2", "--json")
    net = compile_genotype(Genotype.load(path), 0.75, channel_divisor=2)
    assert code == 0 and json.loads(out)["macs"] == cost.count(net, (1, 3, 16, 16)).macs


@pytest.mark.parametrize("argv,message", [
    (["--model", "no_such_net"], "unknown GluonCV model"),
    (["--genotype", "MISSING"], "genotype file not found"),
])
def test_count_flops_errors_are_one_line(monkeypatch, capsys, argv, message):
    code, out, err = _run_tool(monkeypatch, capsys, *argv)
    assert code == 2 and not out
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_count_flops_malformed_genotype(tmp_path, monkeypatch, capsys):
    path = tmp_path / "bad.json"
    path.write_text('{"version": 1, "skeleton": {}}')
    code, _, err = _run_tool(monkeypatch, capsys, "--genotype", str(path))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
