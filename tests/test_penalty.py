"""Adaptive γ (dsonas.penalty) on hand-made per-op costs and masks."""

from dataclasses import dataclass

import numpy as np
import pytest

from dsonas.errors import ConfigError
from dsonas.penalty import BlockCosts, make_penalty

GAMMA = 0.01


@dataclass(frozen=True)
class Mask:
    """Stand-in for genotype.BlockMask: the three members the penalty reads."""

    inputs: tuple
    outputs: tuple

    def live_slots(self):
        return tuple(o for o, nodes in enumerate(self.inputs) if nodes and o in self.outputs)


def lambdas(levels, n_ops):
    """λ dict in the BlockSpec.lambda_shapes() layout: in{l} (N, 1+(l-1)N), out (M*N,)."""
    lam = {f"in{level}": np.ones((n_ops, 1 + (level - 1) * n_ops)) for level in range(2, levels + 1)}
    lam["out"] = np.ones(levels * n_ops)
    return lam


def full_mask(levels, n_ops):
    inputs = tuple(tuple(range(1 + (o // n_ops) * n_ops)) for o in range(levels * n_ops))
    return Mask(inputs, tuple(range(levels * n_ops)))


def test_none_is_uniform_and_shaped_like_lambda():
    lam = lambdas(4, 4)
    pen = make_penalty("none", GAMMA)
    gammas = pen.gammas([full_mask(4, 4)] * 3, [lam] * 3)
    assert len(gammas) == 3
    for g in gammas:
        shapes = {k: v.shape for k, v in g.items()}
        assert shapes == {"in2": (4, 5), "in3": (4, 9), "in4": (4, 13), "out": (16,)}
        assert all(np.all(v == np.float32(GAMMA)) for v in g.values())


def test_flops_ratio_halves_when_half_the_flops_are_pruned():
    # 2 levels x 2 ops; slots 0,1 on level 1, slots 2,3 on level 2. Op MACs 30, 10, 30, 10 (total 80);
    # slots 0 and 3 (30 + 10 = half the FLOPs) are pruned.
    costs = BlockCosts(op=np.array([30.0, 10.0, 30.0, 10.0]))
    pruned = Mask(inputs=((), (0,), (0, 2), ()), outputs=(1, 2))
    pen = make_penalty("flops", GAMMA, [costs, costs])
    full_g, pruned_g = pen.gammas([full_mask(2, 2), pruned], [lambdas(2, 2)] * 2)
    assert all(np.allclose(v, GAMMA) for v in full_g.values())
    assert all(np.allclose(v, GAMMA / 2) for v in pruned_g.values())


def test_flops_counts_edge_and_merge_costs_of_live_parts_only():
    # Each live output adds 20 MACs to the 1x1 merge; each live input edge 1. Full block:
    # ops 80 + edges (1+1+3+3 = 8) + merge 4*20 = 168. Live under `pruned`: slot 1 (10 + 1 + 20) and
    # slot 2 (30 + 2 + 20) = 83.
    costs = BlockCosts(op=np.array([30.0, 10.0, 30.0, 10.0]), edge=np.ones(4), out=np.full(4, 20.0))
    pruned = Mask(inputs=((), (0,), (0, 2), ()), outputs=(1, 2))
    (g,) = make_penalty("flops", GAMMA, [costs]).gammas([pruned], [lambdas(2, 2)])
    np.testing.assert_allclose(g["in2"], np.full((2, 3), GAMMA * 83 / 168), rtol=1e-6)


def test_flops_all_pruned_block_gets_zero_gamma():
    costs = BlockCosts(op=np.array([30.0, 10.0, 30.0, 10.0]), out=np.full(4, 20.0))
    empty = Mask(inputs=((),) * 4, outputs=())
    (g,) = make_penalty("flops", GAMMA, [costs]).gammas([empty], [lambdas(2, 2)])
    assert all(np.all(v == 0.0) for v in g.values())


def test_mac_gives_the_largest_op_in_the_network_the_full_gamma():
    # Block 1 holds the network's largest op (slot 2, MAC 40); block 0's ops are all smaller.
    small = BlockCosts(op=np.array([4.0, 8.0, 10.0, 2.0]))
    large = BlockCosts(op=np.array([5.0, 20.0, 40.0, 10.0]))
    pen = make_penalty("mac", GAMMA, [small, large])
    g0, g1 = pen.gammas([full_mask(2, 2)] * 2, [lambdas(2, 2)] * 2)
    np.testing.assert_allclose(g1["out"], GAMMA * np.array([5, 20, 40, 10]) / 40, rtol=1e-6)
    np.testing.assert_allclose(g0["out"], GAMMA * np.array([4, 8, 10, 2]) / 40, rtol=1e-6)
    assert g1["out"].max() == np.float32(GAMMA)
    # Edges into level-2 op n share that op's γ: row 0 is slot 2, row 1 is slot 3.
    np.testing.assert_allclose(g1["in2"], np.repeat([[GAMMA], [GAMMA / 4]], 3, axis=1), rtol=1e-6)


def test_mac_of_an_op_falls_as_its_inputs_are_pruned():
    # Summing k inputs reads k maps: edge cost 5 per live input. MAC_max = slot 2 fully connected = 40+15.
    costs = BlockCosts(op=np.array([10.0, 10.0, 40.0, 10.0]), edge=np.full(4, 5.0))
    lam = lambdas(2, 2)
    (full,) = make_penalty("mac", GAMMA, [costs]).gammas([full_mask(2, 2)], [lam])
    one_input = Mask(inputs=((0,), (0,), (1,), (0, 1, 2)), outputs=(0, 1, 2, 3))
    (pruned,) = make_penalty("mac", GAMMA, [costs]).gammas([one_input], [lam])
    assert full["out"][2] == np.float32(GAMMA)
    np.testing.assert_allclose(pruned["out"][2], GAMMA * 45 / 55, rtol=1e-6)
    np.testing.assert_allclose(pruned["in2"][0], GAMMA * 45 / 55, rtol=1e-6)


def test_latency_has_the_same_form_with_measured_times():
    times_ms = [np.array([0.5, 0.7, 0.2, 0.1]), np.array([0.3, 1.4, 0.2, 0.1])]
    g0, g1 = make_penalty("latency", GAMMA, times_ms).gammas([full_mask(2, 2)] * 2, [lambdas(2, 2)] * 2)
    np.testing.assert_allclose(g0["out"], GAMMA * times_ms[0] / 1.4, rtol=1e-6)
    np.testing.assert_allclose(g1["out"], GAMMA * times_ms[1] / 1.4, rtol=1e-6)


def test_share_averages_over_blocks_full_keeps_them_apart():
    costs = [BlockCosts(op=np.array([30.0, 10.0, 30.0, 10.0])), BlockCosts(op=np.full(4, 10.0))]
    mask = Mask(inputs=((0,), (0,), (0, 1), ()), outputs=(0, 1, 2))  # slot 3 pruned: 10 of 80, 10 of 40
    lam = lambdas(2, 2)
    full = make_penalty("flops", GAMMA, costs).gammas([mask] * 2, [lam] * 2)
    np.testing.assert_allclose(full[0]["out"], GAMMA * 70 / 80)
    np.testing.assert_allclose(full[1]["out"], GAMMA * 30 / 40)
    shared = make_penalty("flops", GAMMA, costs, shared=True).gammas([mask] * 2, [lam] * 2)
    assert len(shared) == 2 and shared[0] is shared[1]
    np.testing.assert_allclose(shared[0]["in2"], np.full((2, 3), GAMMA * (70 / 80 + 30 / 40) / 2), rtol=1e-6)
    assert {k: v.shape for k, v in shared[0].items()} == {k: v.shape for k, v in lam.items()}


def test_bad_kind_gamma_and_missing_costs():
    with pytest.raises(ConfigError, match="search.penalty"):
        make_penalty("params", GAMMA)
    with pytest.raises(ConfigError, match="search.gamma"):
        make_penalty("none", -1.0)
    with pytest.raises(ValueError):
        make_penalty("mac", GAMMA)
    pen = make_penalty("flops", GAMMA, [np.ones(4)])
    with pytest.raises(ValueError):
        pen.gammas([full_mask(2, 2)] * 2, [lambdas(2, 2)] * 2)
