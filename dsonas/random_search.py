"""Random architectures from the search space: the paper's random-share / random-full baselines (Table 1).

A NAS result only means something next to random architectures of the same space and about the same
cost. `sample_genotypes` draws block masks of the same skeleton, op set and merge as a search would, and
keeps those whose parameters (or MACs) fall within a relative tolerance of a target; `run_random_search`
writes them into a run folder as ordinary genotype files, ready for `tools/retrain.py`.

How a mask is drawn (every draw is valid by construction, no repair step needed):

* op slots are visited in level order; each is alive with probability ``p_op`` and then reads a random
  non-empty subset of the *live* candidate inputs (each kept with probability ``p_edge``, at least one);
* the outputs are every live op no later op reads (so every live op reaches the block output) plus each
  other live op with probability 1/2; a mask with no live op is drawn again (a random block is a block).

``p_op`` and ``p_edge`` are drawn afresh for every genotype (``shared=False`` uses them for all of its
blocks), so the sampled costs spread from a single op per block to the fully connected block instead of
piling up around the mean; a target anywhere in that range is reached after a few hundred draws.

Costs are those `dsonas.cost.count` gives the compiled genotype at width 1 for one image: the skeleton
without blocks (counted once), plus per block the cost of its live ops and of its merge (counted once per
channel/resolution and output count, then cached), so a draw costs microseconds; the kept genotypes are
counted again on the whole compiled net for the summary.
"""

import time
from dataclasses import dataclass

import numpy as np

from dsonas.errors import BudgetError, ConfigError
from dsonas.genotype import BlockMask, Genotype
from dsonas.space import BlockSpec, Skeleton

SUMMARY = "random_summary.json"
GENOTYPE_DIR = "genotypes"
P_OP = (0.1, 1.0)    # range of the per-genotype probability that an op slot is alive
P_EDGE = (0.1, 0.9)  # range of the per-genotype probability that a live candidate input is kept
P_EXTRA_OUT = 0.5    # probability that an op read by a later op also feeds the merge


@dataclass
class RandomSample:
    """One kept genotype and its cost (params, MACs at batch 1, width 1)."""

    genotype: Genotype
    params: int
    macs: int


def random_mask(spec, rng, p_op, p_edge):
    """A random valid, non-identity BlockMask of `spec` (see the module doc for the distribution)."""
    while True:
        inputs = []
        for slot in range(spec.num_op_slots):
            if rng.random() >= p_op:
                inputs.append(())
                continue
            live = [k for k in spec.candidate_inputs(slot) if k == 0 or inputs[k - 1]]
            keep = [k for k in live if rng.random() < p_edge]
            inputs.append(tuple(keep) if keep else (live[int(rng.integers(len(live)))],))
        read = {k - 1 for nodes in inputs for k in nodes if k > 0}
        live_slots = [o for o, nodes in enumerate(inputs) if nodes]
        if live_slots:
            outputs = [o for o in live_slots if o not in read or rng.random() < P_EXTRA_OUT]
            return BlockMask(inputs=tuple(inputs), outputs=tuple(outputs))


class GenotypeCost:
    """Params and MACs of compiled genotypes of one skeleton and spec, from per-block parts (exact).

    The compiled net = the skeleton (stem, reductions, classifier) + one derived block per mask, and
    params and MACs add up over layers, so the total is the skeleton with identity blocks plus each block's
    live ops and merge; the sums feeding an op cost neither. Op costs come from `cost.op_costs` and the
    merge from `cost.block_fixed_cost`, both with learnable BatchNorm scale as `compile_genotype` builds.
    """

    METRICS = ("params", "macs")

    def __init__(self, spec, skeleton):
        from dsonas import cost
        from dsonas.network import compile_genotype

        self._cost = cost
        self.spec, self.skeleton = spec, skeleton
        identity = BlockMask(inputs=((),) * spec.num_op_slots, outputs=())
        net = compile_genotype(Genotype(skeleton=skeleton, spec=spec, shared=True, masks=[identity]))
        shape = (1, 3, skeleton.input_size, skeleton.input_size)
        report = cost.count(net, shape)
        self.base = {"params": report.params, "macs": report.macs}
        self.geometry = cost.block_geometry(net, shape)
        self._ops = {g: cost.op_costs(spec, *g, bn_scale=True) for g in set(self.geometry)}
        self._merge = {}

    def _merge_cost(self, geometry, n_outputs):
        key = (geometry, n_outputs)
        if key not in self._merge:
            self._merge[key] = self._cost.block_fixed_cost(self.spec, *geometry, n_outputs, bn_scale=True)
        return self._merge[key]

    def block(self, mask, geometry):
        """{metric: cost} of one derived block at (channels, resolution) `geometry`."""
        if mask.is_identity:
            return dict.fromkeys(self.METRICS, 0)
        live = list(mask.live_slots())
        merge = self._merge_cost(geometry, len(mask.outputs))
        return {m: int(round(self._ops[geometry][m][live].sum() + merge[m])) for m in self.METRICS}

    def total(self, masks):
        """{metric: cost} of the compiled net with `masks` (one per block of the skeleton)."""
        out = dict(self.base)
        for mask, geometry in zip(masks, self.geometry, strict=True):
            for m, value in self.block(mask, geometry).items():
                out[m] += value
        return out

    def bounds(self, metric):
        """(cheapest, dearest) reachable cost: one cheapest op per block vs the fully connected block."""
        n_slots = self.spec.num_op_slots
        single = [BlockMask(inputs=tuple((0,) if o == s else () for o in range(n_slots)), outputs=(s,))
                  for s in range(self.spec.n_ops)]
        cheapest = [min(single, key=lambda m, g=g: self.block(m, g)[metric]) for g in self.geometry]
        full = [BlockMask.full(self.spec)] * len(self.geometry)
        return self.total(cheapest)[metric], self.total(full)[metric]


def _target(target_params, target_macs):
    """(metric, value) of the budget, or (None, None) when every draw is kept."""
    if target_params is not None and target_macs is not None:
        raise ConfigError("give a params target or a MACs target, not both")
    metric, value = ("params", target_params) if target_params is not None else ("macs", target_macs)
    if value is None:
        return None, None
    if not value > 0:
        raise ConfigError(f"target {metric} must be > 0, got {value!r}")
    return metric, value


def _human(n):
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{unit}"
    return f"{n:.0f}"


def sample_genotypes(spec, skeleton, n, seed=0, target_params=None, target_macs=None, tolerance=0.1,
                     shared=True, max_tries=5000, coster=None):
    """`n` distinct random genotypes of `spec` on `skeleton`, within `tolerance` of the target.

    target_params / target_macs (at most one; MACs at batch 1, FLOPs = 2 x MACs): keep a genotype when
    |cost - target| <= tolerance * target; neither = keep every distinct draw. shared: one mask for all
    blocks (random-share) or one per block (random-full). The same arguments always give the same
    genotypes, in the same order. Returns a list of RandomSample.

    A target outside the reachable range fails at once; one inside it that max_tries draws do not meet
    `n` times fails after them; both raise BudgetError with the range of costs seen.
    """
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"number of random genotypes must be an integer >= 1, got {n!r}")
    if not tolerance >= 0:
        raise ConfigError(f"tolerance must be >= 0 (a fraction of the target, e.g. 0.1), got {tolerance!r}")
    metric, target = _target(target_params, target_macs)
    coster = coster or GenotypeCost(spec, skeleton)
    lo_ok, hi_ok = (target * (1 - tolerance), target * (1 + tolerance)) if metric else (None, None)
    if metric:
        lo, hi = coster.bounds(metric)
        if hi_ok < lo or lo_ok > hi:
            raise BudgetError(f"target {_human(target)} {metric} ± {tolerance:.0%} is out of reach: random "
                              f"genotypes of this space and skeleton cost {_human(lo)} to {_human(hi)} "
                              f"{metric}; pick a target in that range or change the skeleton")
    rng = np.random.default_rng(seed)
    n_masks = 1 if shared else skeleton.num_blocks
    kept, seen_masks, seen = [], set(), []
    for _ in range(max_tries):
        p_op, p_edge = rng.uniform(*P_OP), rng.uniform(*P_EDGE)
        masks = tuple(random_mask(spec, rng, p_op, p_edge) for _ in range(n_masks))
        if masks in seen_masks:
            continue
        seen_masks.add(masks)
        costs = coster.total(list(masks) * skeleton.num_blocks if shared else masks)
        if metric:
            seen.append(costs[metric])
            if not lo_ok <= costs[metric] <= hi_ok:
                continue
        kept.append(RandomSample(Genotype(skeleton=skeleton, spec=spec, shared=shared, masks=list(masks)),
                                 params=costs["params"], macs=costs["macs"]))
        if len(kept) == n:
            return kept
    seen_text = f"costs seen {_human(min(seen))} to {_human(max(seen))} {metric}" if seen else "no new draws"
    window = f"within {tolerance:.0%} of {_human(target)} {metric}" if metric else "distinct"
    raise BudgetError(f"found {len(kept)} of {n} random genotypes {window} in {max_tries} draws "
                      f"({seen_text}); raise the tolerance or max tries, or ask for fewer genotypes")


def space_of(cfg, num_classes=None):
    """(BlockSpec, Skeleton, shared) of a search config; num_classes None = from the config or its data."""
    if cfg.space.kind not in ("share", "full"):
        raise ConfigError(f"space.kind: random genotypes of {cfg.space.kind!r} are not implemented; "
                          f"use share or full")
    if num_classes is None and cfg.skeleton.num_classes is None:
        from dsonas.data import make_datasets

        num_classes = make_datasets(cfg.data).num_classes
    spec = BlockSpec.from_config(cfg.space)
    skeleton = Skeleton.from_config(cfg.skeleton, num_classes, cfg.data.input_size)
    return spec, skeleton, cfg.space.kind == "share"


def run_random_search(cfg, run_dir, n, target_params=None, target_macs=None, tolerance=0.1, seed=None,
                      shared=None, max_tries=5000, num_classes=None):
    """Random baseline of `cfg`'s space written into `run_dir` (a dsonas.runs.RunDir); returns the summary.

    cfg: a search Config (space, skeleton, data.input_size, seed are read). n: genotypes wanted.
    target_params / target_macs: at most one budget (MACs at batch 1; FLOPs = 2 x MACs), kept within
    ±tolerance (a fraction). seed: None = cfg.seed. shared: None = from space.kind (share -> one mask for
    every block, full -> one per block). num_classes: None = cfg.skeleton.num_classes, else the data's.

    Writes <run>/genotypes/random_000.json ... (ordinary genotype files, for tools/retrain.py) and
    <run>/random_summary.json: {"method": "random", "seed", "shared", "target": {"metric", "value",
    "tolerance"} or null, "seconds", "genotypes": [{"path", "params", "macs", "mac", "live_ops"}]} with
    params/MACs/MAC counted by dsonas.cost on each compiled genotype. Raises BudgetError (nothing
    written) when the budget cannot be met.
    """
    from dsonas import cost
    from dsonas.network import deploy_net

    began = time.perf_counter()
    spec, skeleton, space_shared = space_of(cfg, num_classes)
    shared = space_shared if shared is None else shared
    seed = cfg.seed if seed is None else seed
    metric, target = _target(target_params, target_macs)
    samples = sample_genotypes(spec, skeleton, n, seed, target_params, target_macs, tolerance, shared,
                               max_tries)
    shape = (1, 3, skeleton.input_size, skeleton.input_size)
    entries = []
    for i, sample in enumerate(samples):
        path = run_dir.path / GENOTYPE_DIR / f"random_{i:03d}.json"
        sample.genotype.save(path)
        report = cost.count(deploy_net(sample.genotype), shape)
        entries.append({"path": str(path.relative_to(run_dir.path)), "params": report.params,
                        "macs": report.macs, "mac": report.mac,
                        "live_ops": [len(m.live_slots()) for m in sample.genotype.masks]})
        run_dir.log(f"random genotype {i}: {_human(report.params)} params, {_human(report.macs)} MACs -> "
                    f"{path}")
    summary = {"method": "random", "seed": seed, "shared": shared,
               "target": {"metric": metric, "value": target, "tolerance": tolerance} if metric else None,
               "seconds": round(time.perf_counter() - began, 3), "genotypes": entries}
    run_dir.save_json(SUMMARY, summary)
    return summary
