"""Retrain a searched genotype from scratch with the config's retrain recipe, or evaluate trained weights.

    python tools/retrain.py --genotype runs/default/genotype.json --width-mult 1.0
    python tools/retrain.py --genotype runs/default/genotype.json --target-flops 20M
    python tools/retrain.py --genotype runs/default/genotype.json --eval-only \
        --params runs/default-retrain/best.params

The run folder is runs/<name>-retrain unless --name is given (the search run keeps its own folder). Stage
widths round to multiples of retrain.channel_divisor (--set retrain.channel_divisor=4); a budget target
falls back to finer divisors when that one's width steps miss it, and retrain.json records the pair.
"""

import argparse

from common import add_common_args, amount, resolve_config, run_tool, setup_threads


def shown(value, budget):
    """A budget amount as --target-* takes it: milliseconds for latency, millions otherwise."""
    return f"{value:.4g} ms" if budget == "latency" else f"{value / 1e6:.4g}M"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--genotype", required=True, metavar="JSON", help="genotype.json written by search")
    width = p.add_mutually_exclusive_group()
    width.add_argument("--width-mult", type=float, metavar="W",
                       help="global width multiplier (default: retrain.width_mult, or the one recorded "
                            "beside --params, with its channel divisor, for --eval-only)")
    width.add_argument("--target-flops", type=amount, metavar="N",
                       help="solve the width for N FLOPs (2 x MACs), e.g. 20M")
    width.add_argument("--target-params", type=amount, metavar="N", help="solve the width for N parameters")
    width.add_argument("--target-latency", type=amount, metavar="MS",
                       help="solve the width for a forward latency of MS milliseconds (batch 1, first --ctx)")
    p.add_argument("--eval-only", action="store_true", help="only evaluate --params on the test set")
    p.add_argument("--params", metavar="FILE", help="trained weights (best.params) for --eval-only")
    add_common_args(p)
    args = p.parse_args(argv)
    if args.eval_only != (args.params is not None):
        p.error("--eval-only and --params go together")
    if args.eval_only and args.width_mult is None and any(
            v is not None for v in (args.target_flops, args.target_params, args.target_latency)):
        p.error("--eval-only takes --width-mult, not a budget target")
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = resolve_config(args)
    setup_threads(cfg.runtime.threads)
    from dsonas import retrain as rt  # imports mxnet
    from dsonas.config import config_to_dict
    from dsonas.engine import contexts
    from dsonas.genotype import Genotype
    from dsonas.runs import RunDir

    genotype = Genotype.load(args.genotype)
    ctx_list = contexts(cfg.runtime.ctx)
    if args.eval_only:
        width, divisor = rt.params_width(args.params, args.width_mult, cfg.retrain)
        res = rt.evaluate_params(cfg, genotype, args.params, width, ctx_list, divisor)
        print(f"test accuracy {res['test_acc']:.4f} (loss {res['test_loss']:.4f}) of {args.params}")
        print(f"net: {res['params'] / 1e6:.4f}M params, {res['macs'] / 1e6:.3f}M MACs at "
              f"{rt.width_text(width, divisor)}")
        return 0

    width, divisor = args.width_mult, None
    for budget in rt.BUDGETS:
        target = getattr(args, f"target_{budget}")
        if target is not None:
            sol = rt.width_for_budget(genotype, budget, target, cfg.retrain.channel_divisor, ctx_list[0])
            width, divisor = sol.width_mult, sol.channel_divisor
            print(f"width multiplier {width:.4f}, channel divisor {divisor}: {shown(sol.cost, budget)} meets "
                  f"--target-{budget} {shown(target, budget)}")
    name = args.name or f"{cfg.name}-retrain"
    run = RunDir.create(args.out, name, config_to_dict(cfg), resume=args.resume, force=args.force)
    res = rt.retrain(cfg, genotype, run, ctx_list, width_mult=width, channel_divisor=divisor,
                     resume=args.resume)
    print(f"test accuracy: best {res.best_acc:.4f} (epoch {res.best_epoch}), last {res.last_acc:.4f}")
    print(f"net: {res.params / 1e6:.4f}M params, {res.macs / 1e6:.3f}M MACs "
          f"({2 * res.macs / 1e6:.3f}M FLOPs) at {rt.width_text(res.width_mult, res.channel_divisor)}")
    print(f"best params: {res.best_params}")
    print(f"export: python tools/export_symbol.py --genotype {args.genotype} --params {res.best_params} "
          f"--out {run.path / 'export' / 'model'}")
    return 0


if __name__ == "__main__":
    run_tool(main)
