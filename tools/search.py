"""Search a block with DSO-NAS: pretrain the supernet, search W and λ, derive the genotype.

    python tools/search.py --space share
    python tools/search.py --space full --penalty flops --set search.gamma=0.02
    python tools/search.py --space shuffle                  # loads configs/shuffle_default.yaml
    python tools/search.py --config configs/cifar10_share.yaml --data cifar10 --data-root ~/data/cifar10
    python tools/search.py --space share --resume          # continue runs/<name> where it stopped
    python tools/search.py --method random --num 3 --target-params 200k   # the random baseline

Writes runs/<name>/ (config.yaml, log.txt, metrics.jsonl, checkpoints/, genotype.json,
search_summary.json, report/) and prints the genotype. `--method random` writes
runs/<name>/genotypes/random_*.json (ordinary genotype files of the same space, seeded) and
random_summary.json instead.
"""

import argparse

from common import add_common_args, amount, resolve_config, run_tool, setup_threads


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", choices=("share", "full", "shuffle"),
                   help="share: one λ set for every block; full: every block its own; shuffle: a cell in "
                        "ShuffleNet V2 units (default: space.kind)")
    p.add_argument("--method", choices=("dso", "random"), default="dso",
                   help="dso: the DSO-NAS pipeline; random: sample genotypes of the same space (baseline)")
    p.add_argument("--penalty", choices=("none", "flops", "mac", "latency"),
                   help="budget-aware γ (shortcut for --set search.penalty=...)")
    g = p.add_argument_group("random baseline (--method random)")
    g.add_argument("--num", type=int, default=3, metavar="N", help="genotypes to sample (default 3)")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--target-params", type=amount, metavar="N", help="keep genotypes with ~N params")
    budget.add_argument("--target-macs", type=amount, metavar="N",
                        help="keep genotypes with ~N MACs (FLOPs = 2 x MACs), e.g. 30M")
    g.add_argument("--tolerance", type=float, default=0.1, metavar="F",
                   help="relative budget tolerance (default 0.1 = ±10%%)")
    add_common_args(p)
    args = p.parse_args(argv)
    if args.num < 1:
        p.error("--num must be at least 1")
    if not 0 < args.tolerance < 1:
        p.error("--tolerance must be a fraction between 0 and 1")
    if args.method == "random" and args.resume:
        p.error("--resume is for --method dso (sampling random genotypes takes seconds)")
    if args.method == "dso" and (args.target_params or args.target_macs):
        p.error("--target-params/--target-macs are for --method random (the search budget is "
                "search.penalty and search.gamma)")
    if args.penalty is not None:  # before the user's --set, which wins
        args.set = [f"search.penalty={args.penalty}", *args.set]
    return args


def run_random(args, cfg, run):
    from dsonas.random_search import run_random_search

    summary = run_random_search(cfg, run, args.num, target_params=args.target_params,
                                target_macs=args.target_macs, tolerance=args.tolerance)
    for entry in summary["genotypes"]:
        print(f"{run.path / entry['path']}: {entry['params'] / 1e3:.1f}k params, {entry['macs'] / 1e6:.2f}M "
              f"MACs, live ops {entry['live_ops'][0] if summary['shared'] else entry['live_ops']}")
    print(f"retrain one: python tools/retrain.py --genotype {run.path / summary['genotypes'][0]['path']}")


def main(argv=None):
    args = parse_args(argv)
    cfg = resolve_config(args)
    setup_threads(cfg.runtime.threads)
    from dsonas.config import config_to_dict
    from dsonas.runs import RunDir
    from dsonas.space import check_space_kind

    check_space_kind(cfg.space.kind, cfg.skeleton.kind)  # before a run folder exists
    if args.method == "random":
        run = RunDir.create(args.out, cfg.name, config_to_dict(cfg), resume=False, force=args.force)
        run_random(args, cfg, run)
        return 0
    cluster = None
    if cfg.runtime.kvstore.startswith("dist"):  # joining the cluster (imports mxnet) tells the rank
        from dsonas import distributed
        cluster = distributed.connect(cfg.runtime.kvstore)
    if cluster is None or cluster.is_writer:  # only rank 0 writes the run folder
        # Before importing mxnet: a refused run folder is reported at once.
        run = RunDir.create(args.out, cfg.name, config_to_dict(cfg), resume=args.resume, force=args.force)
    else:
        run = distributed.ReaderRun(f"{args.out}/{cfg.name}", cluster.rank)
    from dsonas import engine  # imports mxnet
    from dsonas.report import build_report

    result = engine.run_search(cfg, run, engine.contexts(cfg.runtime.ctx), cfg.runtime.kvstore,
                               resume=args.resume, cluster=cluster)
    if cluster is None or cluster.is_writer:
        print(engine.format_summary(result))
        files = build_report(run)
        print(f"report: {files['report.md']}")
    return 0


if __name__ == "__main__":
    run_tool(main)
