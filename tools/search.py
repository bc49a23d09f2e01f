"""Search a block with DSO-NAS: pretrain the supernet, search W and λ, derive the genotype.

    python tools/search.py --space share
    python tools/search.py --space full --penalty flops --set search.gamma=0.02
    python tools/search.py --config configs/cifar10_share.yaml --data cifar10 --data-root ~/data/cifar10
    python tools/search.py --space share --resume          # continue runs/<name> where it stopped

Writes runs/<name>/ (config.yaml, log.txt, metrics.jsonl, checkpoints/, genotype.json,
search_summary.json) and prints the genotype.
"""

import argparse

from common import add_common_args, resolve_config, run_tool, setup_threads


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", choices=("share", "full", "shuffle"),
                   help="share: one λ set for every block; full: every block its own (default: space.kind)")
    p.add_argument("--method", choices=("dso",), default="dso", help="search method (default: dso)")
    p.add_argument("--penalty", choices=("none", "flops", "mac", "latency"),
                   help="budget-aware γ (shortcut for --set search.penalty=...)")
    add_common_args(p)
    args = p.parse_args(argv)
    if args.penalty is not None:  # before the user's --set, which wins
        args.set = [f"search.penalty={args.penalty}", *args.set]
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = resolve_config(args)
    setup_threads(cfg.runtime.threads)
    from dsonas.config import config_to_dict
    from dsonas.runs import RunDir

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
    result = engine.run_search(cfg, run, engine.contexts(cfg.runtime.ctx), cfg.runtime.kvstore,
                               resume=args.resume, cluster=cluster)
    if cluster is None or cluster.is_writer:
        print(engine.format_summary(result))
    return 0


if __name__ == "__main__":
    run_tool(main)
