import json

import mxnet as mx
import numpy as np
import pytest

from dsonas import cost
from dsonas.config import config_to_dict, load_config
from dsonas.errors import BudgetError, ConfigError
from dsonas.genotype import Genotype, check_mask
from dsonas.network import compile_genotype
from dsonas.random_search import GenotypeCost, random_mask, run_random_search, sample_genotypes, space_of
from dsonas.runs import RunDir

SMALL = ["skeleton.stages=[1, 1, 1]", "skeleton.filters=8", "skeleton.num_classes=10", "data.input_size=16"]


@pytest.fixture(scope="module")
def cfg():
    return load_config(overrides=SMALL)


@pytest.fixture(scope="module")
def space(cfg):
    spec, skeleton, _ = space_of(cfg)
    return spec, skeleton, GenotypeCost(spec, skeleton)


def counted(genotype):
    size = genotype.skeleton.input_size
    return cost.count(compile_genotype(genotype), (1, 3, size, size))


def test_random_masks_are_valid_and_varied(space):
    spec, _, _ = space
    rng = np.random.default_rng(0)
    masks = [random_mask(spec, rng, p_op, p_edge) for p_op in (0.1, 0.5, 1.0) for p_edge in (0.1, 0.9)
             for _ in range(20)]
    for mask in masks:
        check_mask(spec, mask)
        assert not mask.is_identity
    sizes = {len(m.live_slots()) for m in masks}
    assert min(sizes) <= 3 and max(sizes) == spec.num_op_slots  # from a few ops to the whole block
    assert len(set(masks)) > 50


def test_block_sum_cost_is_the_compiled_net_cost(space):
    spec, skeleton, coster = space
    for shared in (True, False):
        for sample in sample_genotypes(spec, skeleton, 3, seed=5, shared=shared, coster=coster):
            report = counted(sample.genotype)
            assert (sample.params, sample.macs) == (report.params, report.macs)


@pytest.mark.parametrize("shared", [True, False])
def test_within_budget_distinct_and_valid(space, shared):
    spec, skeleton, coster = space
    lo, hi = coster.bounds("params")
    target = (lo + hi) / 2
    samples = sample_genotypes(spec, skeleton, 4, seed=1, target_params=target, tolerance=0.05, shared=shared,
                               coster=coster)
    assert len(samples) == 4
    assert len({tuple(s.genotype.masks) for s in samples}) == 4
    for s in samples:
        assert len(s.genotype.masks) == (1 if shared else skeleton.num_blocks)
        assert s.genotype.shared is shared
        assert abs(counted(s.genotype).params - target) <= 0.05 * target
    macs = sample_genotypes(spec, skeleton, 2, seed=1, target_macs=sum(coster.bounds("macs")) / 3,
                            tolerance=0.1, shared=shared, coster=coster)
    for s in macs:
        assert abs(s.macs - sum(coster.bounds("macs")) / 3) <= 0.1 * sum(coster.bounds("macs")) / 3


def test_seeded(space):
    spec, skeleton, coster = space
    target = sum(coster.bounds("macs")) / 2

    def draw(seed):
        samples = sample_genotypes(spec, skeleton, 3, seed=seed, target_macs=target, coster=coster)
        return [s.genotype.to_dict() for s in samples]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_impossible_targets(space):
    spec, skeleton, coster = space
    lo, hi = coster.bounds("params")
    with pytest.raises(BudgetError, match=r"out of reach.*to .*params"):
        sample_genotypes(spec, skeleton, 1, target_params=hi * 2, coster=coster)
    with pytest.raises(BudgetError, match=r"out of reach"):
        sample_genotypes(spec, skeleton, 1, target_params=lo / 2, coster=coster)
    # Reachable range, but no draw lands in a window this narrow in so few tries.
    with pytest.raises(BudgetError, match=r"found \d of 5 .* in 20 draws \(costs seen .* to .*\)"):
        sample_genotypes(spec, skeleton, 5, target_params=(lo + hi) / 2, tolerance=1e-6, max_tries=20,
                         coster=coster)
    with pytest.raises(ConfigError, match="not both"):
        sample_genotypes(spec, skeleton, 1, target_params=1e5, target_macs=1e6, coster=coster)
    with pytest.raises(ConfigError, match=">= 1"):
        sample_genotypes(spec, skeleton, 0, coster=coster)


def test_run_random_search_writes_loadable_genotypes(tmp_path, cfg, space):
    _, _, coster = space
    target = sum(coster.bounds("params")) / 2
    runs = []
    for name in ("a", "b"):
        run = RunDir.create(out=tmp_path, name=name, config_dict=config_to_dict(cfg))
        summary = run_random_search(cfg, run, 3, target_params=target, tolerance=0.1)
        runs.append(run)
    assert summary["target"] == {"metric": "params", "value": target, "tolerance": 0.1}
    assert summary["shared"] is True and summary["seed"] == cfg.seed
    assert json.loads((runs[1].path / "random_summary.json").read_text())["genotypes"] == summary["genotypes"]
    paths = sorted((runs[0].path / "genotypes").iterdir())
    assert [p.name for p in paths] == ["random_000.json", "random_001.json", "random_002.json"]
    for entry, path in zip(summary["genotypes"], paths, strict=True):
        assert path.read_bytes() == (runs[1].path / entry["path"]).read_bytes()  # same seed, same files
        genotype = Genotype.load(path)
        net = compile_genotype(genotype)
        net.initialize()
        assert net(mx.nd.zeros((2, 3, 16, 16))).shape == (2, 10)
        assert counted(genotype).params == entry["params"]
        assert abs(entry["params"] - target) <= 0.1 * target
    full = RunDir.create(out=tmp_path, name="full", config_dict=config_to_dict(cfg))
    summary = run_random_search(cfg, full, 1, shared=False, seed=7)
    assert summary["target"] is None and len(summary["genotypes"][0]["live_ops"]) == 3
