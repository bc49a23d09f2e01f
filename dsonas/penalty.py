"""Budget-aware L1 strengths: the γ that APG-NAG applies to every λ (DSO-NAS §3.4, Eq. 9-10).

A penalty maps the current masks (which ops are still alive) to one γ per λ, shaped like the λ arrays
(`BlockSpec.lambda_shapes()` layout: "in{l}"[n, k] is an edge into op n of level l, "out"[o] feeds op
slot o into the merge). The engine recomputes it every `search.penalty_every` iterations and hands it to
`APGNAG.set_gamma`.

* `none`: every λ gets γ (plain Eq. 5).
* `flops` (Eq. 9, *Adaptive FLOPs*): every λ of block b gets γ·FLOPs_b(t)/FLOPs_b(full), the FLOPs of the
  ops still alive over those of the fully connected block. A block that has already lost most of its
  FLOPs is penalised less, which keeps the blocks after a reduction from hoarding the budget and the
  others from being emptied.
* `mac` (Eq. 10, *Adaptive MAC*): the λ of op slot o (its input edges and its output) get
  γ·MAC_o(t)/MAC_max, MAC_max being the largest per-op MAC of the fully connected network (a constant,
  as in Eq. 10), so the most memory-hungry op gets the full γ and cheap ops are spared. MAC_o(t) shrinks
  as o loses input edges or its output; a dead op keeps the γ of its bare op cost, so any λ left on it
  still decays.
* `latency`: the same form as `mac` with measured per-op latencies (ShuffleNet V2: "use the direct metric").

Costs are real per-op figures at each block's channels and resolution (from `dsonas.cost`), never a count
of units. A block's prunable cost is split per op slot (`BlockCosts`): the op itself, what each live input
edge adds, and what feeding the merge adds (with the concat+1×1 merge the 1×1 conv has C inputs per live
output, so every live output adds C·C·H·W MACs: as much as a separable conv's pointwise part). The residual
add and anything else that no mask can remove are left out on purpose: counting them would keep γ_b of
an emptied block above zero, the opposite of what Eq. 9 is for.

*share* space: one λ set serves every block, so the per-block γ (which differ with each block's channels and
resolution) are averaged over blocks and the same γ dict is returned for every block.
"""

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

KINDS = ("none", "flops", "mac", "latency")

# Which per-op cost metric each kind consumes (names as in dsonas.cost; FLOPs = 2·MACs, same ratio).
COST_METRIC = {"flops": "macs", "mac": "mac", "latency": "latency"}


@dataclass(frozen=True)
class BlockCosts:
    """The prunable cost of one block in one metric, split over its op slots (arrays of shape (S,)).

    op[o]:   running op slot o at the block's channels and resolution.
    edge[o]: added by each live input edge of slot o (e.g. reading one more map into its input sum).
    out[o]:  added when slot o feeds the merge (its share of the concat+1×1 conv; 0 for a sum merge).
    """

    op: np.ndarray
    edge: np.ndarray | None = None
    out: np.ndarray | None = None

    def slot_costs(self, n_inputs, is_output):
        """Per-slot cost given each slot's number of input edges and whether it feeds the merge."""
        cost = np.asarray(self.op, dtype=np.float64).copy()
        if self.edge is not None:
            cost += np.asarray(self.edge, dtype=np.float64) * n_inputs
        if self.out is not None:
            cost += np.asarray(self.out, dtype=np.float64) * is_output
        return cost


@dataclass(frozen=True)
class _Layout:
    """Levels, ops per level and candidate inputs per slot, read off a block's λ dict."""

    n_ops: int
    candidates: np.ndarray  # (S,) number of candidate input nodes of each slot (1 on level 1)

    @classmethod
    def of(cls, lambdas):
        levels = 1 + sum(1 for key in lambdas if key.startswith("in"))
        n_slots = int(np.shape(lambdas["out"])[0])
        n_ops = n_slots // levels
        candidates = np.ones(n_slots)
        for level in range(2, levels + 1):
            candidates[(level - 1) * n_ops: level * n_ops] = np.shape(lambdas[f"in{level}"])[1]
        return cls(n_ops, candidates)

    def spread(self, slot_gamma, lambdas):
        """Per-λ γ from per-slot γ: an edge into slot o and the output of slot o both get slot_gamma[o]."""
        out = {}
        for key, lam in lambdas.items():
            shape = np.shape(lam)
            if key == "out":
                out[key] = slot_gamma.astype(np.float32)
            else:
                level = int(key[2:])
                rows = slot_gamma[(level - 1) * self.n_ops: level * self.n_ops]
                out[key] = np.repeat(rows[:, None], shape[1], axis=1).astype(np.float32)
        return out


def _mask_usage(mask, n_slots):
    n_inputs = np.array([len(nodes) for nodes in mask.inputs], dtype=np.float64)
    is_output = np.zeros(n_slots)
    is_output[list(mask.outputs)] = 1.0
    return n_inputs, is_output


class Penalty:
    """γ per λ for one penalty kind; see the module docstring. Build with `make_penalty`."""

    def __init__(self, kind, gamma, costs=None, shared=False):
        self.kind = kind
        self.gamma = float(gamma)
        self.costs = None if costs is None else [c if isinstance(c, BlockCosts) else BlockCosts(np.asarray(c))
                                                 for c in costs]
        self.shared = shared

    def gammas(self, masks, lambdas):
        """list (per block) of dict key -> np.ndarray γ, shaped like `lambdas` (one λ dict per block).

        `masks` are the blocks' current BlockMasks (derived from λ); only `flops`, `mac` and `latency`
        read them.
        """
        if len(masks) != len(lambdas):
            raise ValueError(f"{len(masks)} masks for {len(lambdas)} blocks of λ")
        layouts = [_Layout.of(lam) for lam in lambdas]
        slot_gammas = self._slot_gammas(masks, layouts)
        per_block = [layout.spread(g, lam)
                     for layout, g, lam in zip(layouts, slot_gammas, lambdas, strict=True)]
        if not self.shared:
            return per_block
        mean = {key: np.mean([g[key] for g in per_block], axis=0).astype(np.float32) for key in per_block[0]}
        return [mean] * len(per_block)

    def _slot_gammas(self, masks, layouts):
        if self.kind == "none":
            return [np.full(layout.candidates.size, self.gamma) for layout in layouts]
        if len(self.costs) != len(masks):
            raise ValueError(f"penalty {self.kind!r} needs one BlockCosts per block: "
                             f"got {len(self.costs)} for {len(masks)} blocks")
        full = [c.slot_costs(layout.candidates, np.ones(layout.candidates.size))
                for c, layout in zip(self.costs, layouts, strict=True)]
        now = [c.slot_costs(*_mask_usage(mask, layout.candidates.size))
               for c, mask, layout in zip(self.costs, masks, layouts, strict=True)]
        if self.kind == "flops":
            out = []
            for cost_now, cost_full, mask in zip(now, full, masks, strict=True):
                if cost_full.sum() <= 0:
                    raise ValueError("flops penalty: a block's full cost is 0; the per-op costs are missing")
                live = sorted(mask.live_slots())
                ratio = cost_now[live].sum() / cost_full.sum()
                out.append(np.full(cost_full.size, ratio * self.gamma))
            return out
        peak = max(c.max() for c in full)  # mac / latency: Eq. 10's MAC_max over the full network
        if peak <= 0:
            raise ValueError(f"{self.kind} penalty: every per-op cost is 0; the cost table is missing")
        return [cost_now / peak * self.gamma for cost_now in now]


def make_penalty(kind, gamma, costs=None, shared=False):
    """Penalty of `kind` (none|flops|mac|latency) with base strength `gamma`.

    costs: one `BlockCosts` per block in the metric `COST_METRIC[kind]` (a plain (S,) array is taken as
    the per-op costs alone); not needed for `none`. shared: the λ set is shared by every block (share
    space), so the per-block γ are averaged.
    """
    if kind not in KINDS:
        raise ConfigError(f"search.penalty: unknown penalty {kind!r}; use one of {', '.join(KINDS)}")
    if not gamma >= 0:
        raise ConfigError(f"search.gamma: must be >= 0, got {gamma!r}")
    if kind != "none" and costs is None:
        raise ValueError(f"penalty {kind!r} needs per-op costs (metric {COST_METRIC[kind]!r}) "
                         "for every block")
    return Penalty(kind, gamma, costs, shared)
