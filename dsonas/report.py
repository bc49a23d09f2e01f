"""Search reports and run comparisons: what a run folder shows a reader without its log.

`build_report(run)` writes <run>/report/: PNG plots (matplotlib's Agg canvas, no display, no system
binary) and report.md tying them to the genotype's cost and the run's ablation settings (paper Table 3:
split training, pre-training epochs, W:λ ratio, penalty). Every plot is drawn from what the run folder
holds and is skipped, with a line in report.md saying which metrics key is missing, when the run did not
record its data:

    lambda.png        λ per epoch (metrics key "lambdas"), else the final λ of genotype.json
    sparsity.png      λ sparsity and live FLOPs per epoch ("sparsity", "derived_macs"; per block if
                      "block_macs" is recorded)
    block_flops.png   FLOPs of every block of the derived net next to the fully connected block (Fig. 5a)
    accuracy.png      accuracy and loss per epoch on the W part, the λ part, train and test, as recorded
    genotype.png      the derived block(s) as a DAG: ops placed by level, kept edges labelled with their λ

`compare_rows(paths)` reads search, retrain and random-baseline run folders into one row per result
(one per genotype of a random run) and `format_table` prints them as text, CSV or JSON.

FLOPs = 2 x MACs (dsonas.cost); costs are for one image at the run's input size.
"""

import csv
import io
import json
import math
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from dsonas.errors import RunFolderError
from dsonas.genotype import BlockMask, Genotype
from dsonas.io import new_folder
from dsonas.runs import RunDir

REPORT_DIR = "report"
DPI = 100
FIGSIZE = (8.0, 5.0)        # inches: every plot is 800 x 500 pixels ...
DAG_PANEL = (5.0, 4.0)      # ... except the DAG of a full-space genotype: one 500 x 400 panel per block,
DAG_COLUMNS = 3             # DAG_COLUMNS panels per row
EDGE_CLEARANCE = 0.25       # DAG edges stop this far (data units) from the nodes they join
MAX_EDGE_LABELS = 40        # a DAG with more λ-carrying edges shows λ as line width only
SEARCH_STAGES = ("pretrain", "search")
OP_LABELS = {"sep_conv_3x3": "sep 3x3", "sep_conv_5x5": "sep 5x5", "avg_pool_3x3": "avg 3x3",
             "max_pool_3x3": "max 3x3", "identity": "identity", "conv_1x1": "conv 1x1"}
ACCURACY_KEYS = (("w_acc", "w_loss", "W part (train)"), ("lam_acc", "lam_loss", "λ part"),
                 ("train_acc", "train_loss", "train"), ("test_acc", "test_loss", "test"))


# ------------------------------------------------------------------------------------------- run folders


@dataclass
class RunInfo:
    """Everything a report or a comparison reads from one run folder (absent files -> None / [])."""

    path: Path
    kind: str                      # "search", "retrain" or "random"
    config: dict
    metrics: list
    genotype: Genotype = None
    search_summary: dict = None
    retrain_summary: dict = None
    random_summary: dict = None

    @property
    def name(self):
        return self.path.name

    def setting(self, dotted, default=None):
        """A config value by dotted key ("search.split"), `default` if the run's config lacks it."""
        node = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def stage_records(self, stages):
        return [r for r in self.metrics if r.get("stage") in stages]


def _read_json(path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{path} is damaged ({e}); delete it or run the stage that writes it again"
                             ) from None


def read_run(path):
    """RunInfo of a run folder written by tools/search.py, tools/retrain.py or the random baseline."""
    path = Path(path)
    config_path = path / "config.yaml"
    if not path.is_dir():
        raise RunFolderError(f"run folder {path} not found; pass a folder written by a dsonas tool")
    if not config_path.is_file():
        raise RunFolderError(f"{path} is not a dsonas run folder (no config.yaml); pass a folder written by "
                             f"tools/search.py or tools/retrain.py")
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raise RunFolderError(f"{config_path} is not valid YAML; fix the file (the run's resolved config)"
                             ) from None
    if not isinstance(config, dict):
        raise RunFolderError(f"{config_path} does not hold a config mapping; fix the file (it is the run's "
                             f"resolved config)")
    random_summary = _read_json(path / "random_summary.json")
    retrain_summary = _read_json(path / "retrain.json")
    genotype_path = path / "genotype.json"
    return RunInfo(path=path, kind="random" if random_summary else "retrain" if retrain_summary else "search",
                   config=config, metrics=RunDir(path).read_metrics(),
                   genotype=Genotype.load(genotype_path) if genotype_path.is_file() else None,
                   search_summary=_read_json(path / "search_summary.json"), retrain_summary=retrain_summary,
                   random_summary=random_summary)


def ablation(info):
    """The paper's Table 3 switches (and the penalty) as recorded in the run's config.yaml."""
    ratio = info.setting("search.ratio")
    return {"space": info.setting("space.kind"), "split": info.setting("search.split"),
            "pretrain_epochs": info.setting("pretrain.epochs"),
            "ratio": ":".join(map(str, ratio)) if isinstance(ratio, list) else ratio,
            "penalty": info.setting("search.penalty"), "gamma": info.setting("search.gamma")}


def genotype_costs(genotype, width_mult=1.0):
    """{"params", "macs", "mac"} of the genotype's deployed net for one image at its input size."""
    from dsonas import cost
    from dsonas.network import deploy_net

    size = genotype.skeleton.input_size
    report = cost.count(deploy_net(genotype, width_mult), (1, 3, size, size))
    return {"params": report.params, "macs": report.macs, "mac": report.mac}


def block_flops(genotype):
    """(derived, fully connected): FLOPs (2 x MACs) of every block, as arrays (num_blocks,)."""
    from dsonas import cost
    from dsonas.network import compile_genotype

    net = compile_genotype(genotype)
    derived = cost.network_block_costs(net, bn_scale=True)["macs"]
    full = cost.network_block_costs(net, masks=[BlockMask.full(genotype.spec)] * genotype.num_blocks,
                                    bn_scale=True)["macs"]
    return 2 * derived, 2 * full


# ------------------------------------------------------------------------------------------------ plots


def _figure(figsize=FIGSIZE):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _epoch_axis(records):
    """x positions (1..T over pretrain and search epochs) and where the search stage starts (or None)."""
    x = np.arange(1, len(records) + 1)
    starts = [i for i, r in enumerate(records) if r.get("stage") == "search"]
    return x, (starts[0] + 0.5 if starts and starts[0] > 0 else None)


def _mark_search(ax, start):
    if start is not None:
        ax.axvline(start, color="0.5", linestyle=":", linewidth=1)
        ax.text(start, 1.0, " search", transform=ax.get_xaxis_transform(), va="top", fontsize=7, color="0.4")


def _series(records, key):
    return np.array([np.nan if r.get(key) is None else float(r[key]) for r in records], dtype=float)


def plot_lambdas(info, records):
    """λ per epoch by λ array (one line per entry; grey = pruned by the end), else the final λ."""
    tracked = [r for r in records if r.get("lambdas")]
    if tracked:
        keys = list(tracked[-1]["lambdas"][0])
        traj = {k: np.array([np.concatenate([np.ravel(s[k]) for s in r["lambdas"]]) for r in tracked])
                for k in keys}
        x = np.array([i + 1 for i, r in enumerate(records) if r.get("lambdas")])
        title = "λ per epoch (grey: pruned by the end)"
    elif info.genotype is not None and info.genotype.lambdas:
        keys = list(info.genotype.spec.lambda_keys())
        traj = {k: np.concatenate([np.ravel(lam[k]) for lam in info.genotype.lambdas])[None] for k in keys}
        x = None
        title = "final λ of genotype.json, sorted (per-epoch λ not recorded)"
    else:
        return None
    fig = _figure()
    axes = np.atleast_1d(fig.subplots(1, len(keys), sharey=True))
    for ax, key in zip(axes, keys, strict=True):
        values = traj[key]
        alive = values[-1] != 0
        if x is None:
            order = np.argsort(-values[0])
            ax.bar(np.arange(values.shape[1]), values[0][order], color=np.where(alive[order], "C0", "0.7"),
                   width=1.0)
            ax.set_xlabel("entry (sorted)")
        else:
            for j in range(values.shape[1]):
                ax.plot(x, values[:, j], color="C0" if alive[j] else "0.7", linewidth=0.8,
                        alpha=0.9 if alive[j] else 0.5, zorder=2 if alive[j] else 1)
            ax.set_xlabel("epoch")
        ax.set_title(f"{key}: {int(alive.sum())}/{alive.size} kept", fontsize=9)
    axes[0].set_ylabel("λ")
    fig.suptitle(title, fontsize=10)
    return fig


def plot_sparsity(records):
    """Sparsity and live FLOPs (of the derived net, or per block when recorded) per epoch."""
    if not records or not any("sparsity" in r or "derived_macs" in r for r in records):
        return None
    x, start = _epoch_axis(records)
    fig = _figure()
    ax_s, ax_f = fig.subplots(1, 2)
    ax_s.plot(x, _series(records, "sparsity"), marker="o", color="C3")
    ax_s.set(xlabel="epoch", ylabel="fraction of λ exactly 0", title="λ sparsity", ylim=(-0.02, 1.02))
    per_block = [r.get("block_macs") for r in records]
    if all(per_block):
        flops = 2 * np.array(per_block, dtype=float).T / 1e6
        ax_f.stackplot(x, flops, labels=[f"block {b}" for b in range(len(flops))], alpha=0.85)
        if len(flops) <= 12:
            ax_f.legend(fontsize=6, loc="upper right", ncol=2)
        ax_f.set_title("live FLOPs per block (stacked)")
    else:
        ax_f.plot(x, 2 * _series(records, "derived_macs") / 1e6, marker="o", color="C0")
        ax_f.set_title("live FLOPs of the derived net")
    ax_f.set(xlabel="epoch", ylabel="MFLOPs (= 2 x MMACs)")
    ax_f.set_ylim(bottom=0)
    for ax in (ax_s, ax_f):
        _mark_search(ax, start)
    return fig


def plot_block_flops(genotype):
    """Fig. 5a: FLOPs of each block of the derived net, against the fully connected block."""
    derived, full = block_flops(genotype)
    fig = _figure()
    ax = fig.subplots()
    x = np.arange(len(derived))
    ax.bar(x, full / 1e6, color="0.85", label="fully connected block")
    ax.bar(x, derived / 1e6, color="C0", label="derived block")
    for b, (d, f) in enumerate(zip(derived, full, strict=True)):
        ax.text(b, d / 1e6, f"{d / f:.0%}" if f else "", ha="center", va="bottom", fontsize=7)
    edge = 0
    for count in genotype.skeleton.stages[:-1]:
        edge += count
        ax.axvline(edge - 0.5, color="0.4", linestyle=":", linewidth=1)
    ax.set_xticks(x)
    ax.set(xlabel="block (dotted lines: reduction between stages)", ylabel="MFLOPs (= 2 x MMACs)",
           title="FLOPs per block of the derived net")
    ax.legend(fontsize=8)
    return fig


def plot_accuracy(records):
    """Accuracy and loss per epoch of every split the run recorded."""
    present = [(a, lo, label) for a, lo, label in ACCURACY_KEYS if any(r.get(a) is not None for r in records)]
    if not present:
        return None
    x, start = _epoch_axis(records)
    fig = _figure()
    ax_a, ax_l = fig.subplots(1, 2)
    for acc_key, loss_key, label in present:
        ax_a.plot(x, _series(records, acc_key), marker="o", markersize=3, label=label)
        ax_l.plot(x, _series(records, loss_key), marker="o", markersize=3, label=label)
    ax_a.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax_l.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    for ax in (ax_a, ax_l):
        ax.legend(fontsize=8)
        _mark_search(ax, start)
    return fig


def dag_figsize(genotype):
    """Figure size (inches) of `plot_genotype`: FIGSIZE for one mask, a DAG_PANEL grid for several."""
    n = len(genotype.masks)
    if n == 1:
        return FIGSIZE
    cols = min(n, DAG_COLUMNS)
    rows = math.ceil(n / cols)
    return (DAG_PANEL[0] * cols, DAG_PANEL[1] * rows)


def _slot_position(spec, slot):
    level = spec.level_of(slot)
    row = slot - (level - 1) * spec.n_ops
    return float(level), (spec.n_ops - 1) / 2 - row


def _bezier(p0, ctrl, p2, t):
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * ctrl + t ** 2 * p2


def _edge(ax, p0, p2, bend, **style):
    """A quadratic Bezier arrow from p0 to p2 bowed sideways by `bend` (data units, + = left of travel),
    stopping EDGE_CLEARANCE short of both ends so the head shows outside the node boxes. Drawn in data
    coordinates, so the returned point a third of the way along (where its label goes) is on the curve."""
    from matplotlib.patches import FancyArrowPatch
    from matplotlib.path import Path as MplPath

    p0, p2 = np.asarray(p0, dtype=float), np.asarray(p2, dtype=float)
    d = p2 - p0
    length = float(np.hypot(*d))
    ctrl = (p0 + p2) / 2 + bend * np.array([-d[1], d[0]]) / length
    ta, tb = EDGE_CLEARANCE / length, 1 - EDGE_CLEARANCE / length
    # The piece of the curve between ta and tb is again a quadratic Bezier; its control point is the
    # blossom of the original control points at (ta, tb).
    q1 = (1 - ta) * (1 - tb) * p0 + ((1 - ta) * tb + ta * (1 - tb)) * ctrl + ta * tb * p2
    path = MplPath([_bezier(p0, ctrl, p2, ta), q1, _bezier(p0, ctrl, p2, tb)],
                   [MplPath.MOVETO, MplPath.CURVE3, MplPath.CURVE3])
    ax.add_patch(FancyArrowPatch(path=path, arrowstyle="-|>", mutation_scale=8, **style))
    return _bezier(p0, ctrl, p2, 1 / 3)


def _draw_block(ax, spec, mask, lambdas, title):
    """One block: input, every op slot (dashed grey when pruned), the merge; kept edges with their λ.

    Edges skipping levels bow away from the middle row so they pass beside, not through, the ops between.
    The dashed arc over everything is the residual connection. Line width grows with |λ|; the values
    are written on the edges too unless there are more than MAX_EDGE_LABELS of them."""
    top = (spec.n_ops - 1) / 2
    pos = {0: (0.0, 0.0), "out": (spec.levels + 1.0, 0.0)}
    for slot in range(spec.num_op_slots):
        pos[slot + 1] = _slot_position(spec, slot)
    edges = [(k, o + 1, lambdas[f"in{spec.level_of(o)}"][o % spec.n_ops, k]
              if lambdas is not None and spec.level_of(o) > 1 else None)
             for o in mask.live_slots() for k in mask.inputs[o]]
    edges += [(o + 1, "out", lambdas["out"][o] if lambdas is not None else None) for o in mask.outputs]
    values = [abs(v) for _, _, v in edges if v is not None]
    biggest = max(values, default=0.0) or 1.0
    labelled = len(values) <= MAX_EDGE_LABELS
    for src, dst, value in edges:
        (x0, y0), (x1, y1) = pos[src], pos[dst]
        outward = 1.0 if y0 + y1 >= 0 else -1.0
        bend = 0.0 if x1 - x0 <= 1 else 0.2 * (x1 - x0 - 1) * outward
        width = 0.8 if value is None else 0.4 + 1.6 * abs(value) / biggest
        x, y = _edge(ax, (x0, y0), (x1, y1), bend, color="0.35", linewidth=width, zorder=1)
        if value is not None and labelled:
            ax.text(x, y, f"{value:.2f}", fontsize=6, ha="center", va="center", zorder=3,
                    bbox={"boxstyle": "round,pad=0.1", "facecolor": "white", "edgecolor": "none"})
    if not mask.is_identity:  # a horizontal edge bowed by b peaks at b/2: clear the top row
        _edge(ax, pos[0], pos["out"], 2 * (top + 0.5), color="0.6", linestyle="--", linewidth=0.7, zorder=0)
    live = set(mask.live_slots())
    for slot in range(spec.num_op_slots):
        x, y = pos[slot + 1]
        op = spec.op_name(slot)
        if slot in live:
            color = f"C{spec.ops.index(op) % 10}"
            ax.text(x, y, f"{OP_LABELS.get(op, op)}\nop{slot}", ha="center", va="center", fontsize=7,
                    zorder=4, bbox={"boxstyle": "round,pad=0.3", "facecolor": color, "alpha": 0.35,
                                    "edgecolor": color})
        else:
            ax.text(x, y, OP_LABELS.get(op, op), ha="center", va="center", fontsize=6, color="0.65", zorder=4,
                    bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "edgecolor": "0.8",
                          "linestyle": "--"})
    merge = "concat\n+ 1x1" if spec.merge == "concat" else "sum"
    for node, text in ((0, "input"), ("out", f"{merge}\n+ input")):
        ax.text(*pos[node], text, ha="center", va="center", fontsize=7, zorder=4,
                bbox={"boxstyle": "round,pad=0.3", "facecolor": "0.9", "edgecolor": "0.3"})
    ax.set_xlim(-0.6, spec.levels + 1.6)
    ax.set_ylim(-top - 0.7, top + 0.9)
    ax.set_xticks(range(spec.levels + 2), ["in"] + [f"L{level}" for level in range(1, spec.levels + 1)]
                  + ["out"], fontsize=7)
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(title + (" (identity)" if mask.is_identity else "")
                 + ("" if labelled else f" ({len(values)} edges: λ shown as line width)"), fontsize=9)


def plot_genotype(genotype):
    """The derived block(s) as DAGs, laid out by level; edge labels are the final λ when recorded."""
    fig = _figure(dag_figsize(genotype))
    n = len(genotype.masks)
    cols = min(n, DAG_COLUMNS)
    axes = np.atleast_1d(fig.subplots(math.ceil(n / cols), cols)).ravel()
    for i, (ax, mask) in enumerate(zip(axes, genotype.masks, strict=False)):
        lambdas = genotype.lambdas[i] if genotype.lambdas else None
        title = "every block (share)" if genotype.shared else f"block {i}"
        _draw_block(ax, genotype.spec, mask, lambdas, title)
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig


# ------------------------------------------------------------------------------------------------ report


def _human(n):
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{unit}"
    return f"{n:.4g}"


def _onoff(value):
    return {True: "on", False: "off"}.get(value, value)


def _fmt(value, digits=4):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _epoch_seconds(records):
    times = [r["epoch_time"] for r in records if isinstance(r.get("epoch_time"), int | float)]
    return float(sum(times)) if times else None


def _markdown(info, records, costs, images, missing):
    a = ablation(info)
    lines = [f"# Report: {info.name} ({info.kind} run)", ""]
    ops = info.setting("space.ops") or []
    lines += ["## Settings", "",
              f"* space: {a['space']}, {info.setting('space.levels')} levels x {len(ops)} ops "
              f"({', '.join(ops)}), merge {info.setting('space.merge')}",
              f"* skeleton: {info.setting('skeleton.kind')} stages {info.setting('skeleton.stages')}, "
              f"{info.setting('skeleton.filters')} filters; data {info.setting('data.source')} at "
              f"{info.setting('data.input_size')} px"]
    if info.kind == "search":
        lines.append(f"* ablation (paper Table 3): split training **{_onoff(a['split'])}**, pre-training "
                     f"**{a['pretrain_epochs']}** epochs, W:λ ratio **{a['ratio']}**, penalty "
                     f"**{a['penalty']}** (γ = {a['gamma']})")
    lines.append("")
    if info.genotype is not None:
        g = info.genotype
        live = [len(m.live_slots()) for m in g.masks]
        lines += ["## Derived genotype", "",
                  f"* params **{_human(costs['params'])}** ({costs['params']:,}), MACs "
                  f"**{_human(costs['macs'])}** ({costs['macs']:,}) "
                  f"(FLOPs = 2 x MACs = {_human(2 * costs['macs'])}), memory access (MAC) "
                  f"**{_human(costs['mac'])}** elements, for one {g.skeleton.input_size} px image at width 1",
                  f"* live ops: {', '.join(map(str, live))} of {g.spec.num_op_slots} per "
                  f"{'shared block' if g.shared else 'block'}", "", "```", g.summary(), "```", ""]
    if records:
        stages = Counter(r.get("stage") for r in records)
        seconds = _epoch_seconds(records)
        last = [f"{label} accuracy {_fmt(records[-1][acc])}" for acc, _, label in ACCURACY_KEYS
                if records[-1].get(acc) is not None]
        if records[-1].get("sparsity") is not None:
            last.append(f"λ sparsity {_fmt(records[-1]['sparsity'], 3)}")
        lines += ["## Training", "",
                  "* epochs: " + ", ".join(f"{stage} {n}" for stage, n in stages.items())
                  + (f" ({seconds:.0f} s)" if seconds is not None else ""),
                  "* last epoch: " + (", ".join(last) or "no accuracy recorded")]
        if info.search_summary and "supernet_test_acc" in info.search_summary:
            lines.append(f"* supernet test accuracy after search: "
                         f"{_fmt(info.search_summary['supernet_test_acc'])}")
        lines.append("")
    lines += ["## Plots", ""]
    for name, caption in images:
        lines += [f"### {caption}", "", f"![{caption}]({name})", ""]
    if missing:
        lines += ["## Not shown", ""] + [f"* {m}" for m in missing] + [""]
    return "\n".join(lines)


def build_report(run_dir):
    """(Re)write <run>/report/ (PNGs + report.md) from a run folder; returns {file name: path}.

    run_dir: a path or a dsonas.runs.RunDir. The new report is assembled in a temporary folder next to
    the old one and swapped in whole, so a failure leaves the previous report as it was.
    """
    info = read_run(getattr(run_dir, "path", run_dir))
    records = info.stage_records(SEARCH_STAGES) or info.metrics
    files, images, missing = {}, [], []

    def add(name, caption, fig):
        if fig is not None:
            files[name] = _png(fig)
            images.append((name, caption))

    g = info.genotype
    tracked = any(r.get("lambdas") for r in records)
    add("lambda.png", "λ trajectories" if tracked else "Final λ", plot_lambdas(info, records))
    if not tracked:
        shown = ("the final λ of genotype.json are shown instead" if g is not None and g.lambdas
                 else "genotype.json holds no λ either")
        missing.append(f"λ trajectories: metrics.jsonl records no per-epoch λ (key `lambdas`); {shown}")
    add("sparsity.png", "Sparsity and live FLOPs per epoch", plot_sparsity(records))
    if "sparsity.png" not in files:
        missing.append("sparsity / live FLOPs: metrics.jsonl has no `sparsity` or `derived_macs`")
    elif not all(r.get("block_macs") for r in records):
        missing.append("live FLOPs per block per epoch: metrics.jsonl has no `block_macs`; the total is "
                       "shown")
    add("accuracy.png", "Accuracy and loss per epoch", plot_accuracy(records))
    if "accuracy.png" not in files:
        missing.append("accuracy: metrics.jsonl has no accuracy keys")
    costs = None
    if g is not None:
        costs = genotype_costs(g)
        add("block_flops.png", "FLOPs per block (paper Fig. 5a)", plot_block_flops(g))
        add("genotype.png", "Derived block" + ("" if g.shared else "s") + " (edge labels: final λ)",
            plot_genotype(g))
    else:
        missing.append("genotype, FLOPs per block: the run folder has no genotype.json")
    files["report.md"] = _markdown(info, records, costs, images, missing).encode("utf-8")
    return _swap_in(info.path, files)


def _swap_in(run_path, files):
    """Write `files` into a fresh temp folder, then replace <run>/report with it."""
    tmp = Path(new_folder(run_path, ".report-"))
    target = run_path / REPORT_DIR
    old = None
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=".report-old-", dir=run_path))
            os.replace(target, old / REPORT_DIR)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            os.replace(old / REPORT_DIR, target)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return {name: target / name for name in files}


# ----------------------------------------------------------------------------------------------- compare

ABLATION_COLUMNS = ("split", "pretrain_epochs", "ratio", "penalty")
COLUMNS = ("name", "kind", "source", "space", "params", "macs", "best_acc", "last_acc", "supernet_acc",
           "search_s", "train_s", *ABLATION_COLUMNS)
HEADERS = {"name": "run", "kind": "kind", "source": "from", "space": "space", "params": "params",
           "macs": "MACs", "best_acc": "best acc", "last_acc": "last acc", "supernet_acc": "supernet acc",
           "search_s": "search s", "train_s": "train s", "split": "split", "pretrain_epochs": "pretrain",
           "ratio": "W:λ", "penalty": "penalty"}


def _genotype_key(genotype):
    """Identity of an architecture (λ values and file paths aside), to link a retrain to its source."""
    d = genotype.to_dict()
    d.pop("lambdas", None)
    return json.dumps(d, sort_keys=True)


def _search_row(info):
    s = info.search_summary or {}
    costs = ({"params": s["derived_params"], "macs": s["derived_macs"]} if "derived_params" in s
             else genotype_costs(info.genotype) if info.genotype is not None else {})
    return {"name": info.name, "kind": "search", "params": costs.get("params"), "macs": costs.get("macs"),
            "supernet_acc": s.get("supernet_test_acc"),
            "search_s": _epoch_seconds(info.stage_records(SEARCH_STAGES)), **ablation(info)}


def _random_rows(info):
    s = info.random_summary
    return [{"name": f"{info.name}/{Path(entry['path']).stem}", "kind": "random",
             "space": "share" if s.get("shared") else "full", "params": entry.get("params"),
             "macs": entry.get("macs"), "search_s": s.get("seconds")} for entry in s.get("genotypes", [])]


def _retrain_row(info, origins):
    s = info.retrain_summary
    records = info.stage_records(("retrain",))
    accs = [r["test_acc"] for r in records if isinstance(r.get("test_acc"), int | float)]
    if not accs and s.get("epochs_done"):  # metrics.jsonl lost: retrain.json still has the figures
        accs = [s["best_acc"], s["last_acc"]]
    row = {"name": info.name, "kind": "retrain", "params": s.get("params"), "macs": s.get("macs"),
           "best_acc": max(accs) if accs else None, "last_acc": accs[-1] if accs else None,
           "train_s": _epoch_seconds(records)}
    if info.genotype is not None:
        row["space"] = "share" if info.genotype.shared else "full"
        origin = origins.get(_genotype_key(info.genotype))
        if origin is not None:  # the search (or random) row this genotype came from supplies its settings
            row.update({k: origin.get(k) for k in ("search_s", *ABLATION_COLUMNS)})
            row["source"] = origin["name"]
    return row


def compare_rows(paths):
    """One row per result of the run folders `paths` (dicts keyed by COLUMNS, None = not recorded).

    search: the derived genotype's cost, supernet test accuracy, pretrain + search time and the ablation
    settings of its config. random: one row per genotype file. retrain: test accuracy (best and last
    epoch), cost at its width multiplier and training time; when the search or random run that produced
    its genotype is among `paths`, that run is its `source` and supplies search time and settings.
    """
    infos = [read_run(p) for p in paths]
    built, origins = {}, {}
    for i, info in enumerate(infos):
        if info.kind == "search":
            built[i] = [_search_row(info)]
            if info.genotype is not None:
                origins.setdefault(_genotype_key(info.genotype), built[i][0])
        elif info.kind == "random":
            built[i] = _random_rows(info)
            for row, entry in zip(built[i], info.random_summary.get("genotypes", []), strict=True):
                path = info.path / entry["path"]
                if path.is_file():
                    origins.setdefault(_genotype_key(Genotype.load(path)), row)
    rows = []
    for i, info in enumerate(infos):
        rows += built[i] if i in built else [_retrain_row(info, origins)]
    return [{c: row.get(c) for c in COLUMNS} for row in rows]


def _cell(column, value):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return _onoff(value)
    if column in ("params", "macs"):
        return _human(value)
    if column.endswith("_acc"):
        return f"{value:.4f}"
    if column.endswith("_s"):
        return f"{value:.0f}"
    return str(value)


def format_table(rows, fmt="text"):
    """Rows of `compare_rows` as an aligned text table, CSV (raw numbers) or JSON."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: "" if row[c] is None else row[c] for c in COLUMNS} for row in rows)
        return buf.getvalue().rstrip("\n")
    table = [[HEADERS[c] for c in COLUMNS]] + [[_cell(c, row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if i < 4 else cell.rjust(w) for i, (cell, w) in
                       enumerate(zip(r, widths, strict=True))).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
