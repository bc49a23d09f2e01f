"""Search epoch time as sparsity grows: does a shrunk supernet cost what its live FLOPs say?

For each sparsity level a copy of the fast CIFAR supernet (same initial weights) gets a random but valid
mask: λ entries are zeroed in a seeded random order until the mask dsonas.genotype.derive_mask derives
from them leaves at least that fraction of all λ entries dead (derive_mask also drops ops left without
input or output, so the actual figure can overshoot). The dead λ are zeroed and frozen, and the network
is shrunk with DsoNet.set_masks, as the search does at the end of an epoch. An *epoch* here is a fixed
number of iterations alternating W and λ steps 1:1 on a fixed batch. The levels' epochs are timed
interleaved in this process (median of --rounds); live FLOPs are dsonas.cost.count's forward MACs of
each shrunk supernet (FLOPs = 2 x MACs; ratios are the same).

Headline at each sparsity s > 0: (epoch time at s / epoch time at 0) / (live FLOPs at s / live FLOPs at
0): 1.0 means time falls exactly with FLOPs; the target is at most 1.2.

    OMP_NUM_THREADS=2 .venv/bin/python bench/shrink.py                     # the paper's shape
    OMP_NUM_THREADS=2 .venv/bin/python bench/shrink.py --filters 16 --stages 2,2,2 --iters 4 --rounds 2
"""

import argparse

from common import (
    add_supernet_args,
    build_supernet,
    emit,
    interleaved,
    load_note,
    machine_load,
    print_table,
    random_batch,
    random_mask,
    run_tool,
    search_trainers,
    setup_threads,
    step_fns,
)


def float_list(text):
    return [float(v) for v in text.split(",") if v.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    add_supernet_args(p)
    p.add_argument("--sparsity", type=float_list, default=[0.0, 0.5, 0.8],
                   help="λ sparsity levels to force (default 0,0.5,0.8; 0 = the full supernet)")
    p.add_argument("--iters", type=int, default=10, help="iterations per epoch, W:λ 1:1 (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="timed epochs per level (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks (default 0)")
    args = p.parse_args(argv)
    if not args.sparsity or any(not 0.0 <= s < 1.0 for s in args.sparsity):
        p.error("--sparsity: expected a comma list of fractions in [0, 1)")
    if 0.0 not in args.sparsity:
        args.sparsity = [0.0, *args.sparsity]  # the reference every ratio is taken against
    return args


def alive_entries(spec, mask):
    """{λ key: bool array}, True where the entry is an edge of `mask`."""
    import numpy as np

    alive = {}
    for key, shape in spec.lambda_shapes().items():
        arr = np.zeros(shape, dtype=bool)
        if key == "out":
            arr[list(mask.outputs)] = True
        else:
            for row, slot in enumerate(spec.level_slots(int(key[2:]))):
                arr[row, list(mask.inputs[slot])] = True
        alive[key] = arr
    return alive


def shrink(net, masks, lam_trainer):
    """Zero and freeze the λ outside `masks`, then rebuild the graph on them (what the search does)."""
    import mxnet as mx
    import numpy as np

    from dsonas.loop import trainer_optimizer

    keep = {}
    for b, mask in enumerate(masks):
        alive = alive_entries(net.spec, mask)
        for key, name in net.block_lambda_names(b).items():
            keep[name] = keep[name] | alive[key] if name in keep else alive[key]
    opt = trainer_optimizer(lam_trainer)
    for index, param in enumerate(net.lambda_params()):
        opt.set_frozen(index, mx.nd.array(~keep[param.name]))
        param.set_data(param.data() * mx.nd.array(keep[param.name].astype(np.float32)))
    net.set_masks(masks)


def measure(args):
    import numpy as np

    from dsonas import cost

    load = machine_load()
    x, y = random_batch(args)
    levels, epochs = {}, {}
    reference = None
    for s in args.sparsity:
        net = build_supernet(args, "fast")
        if reference is None:
            reference = net
        else:  # identical starting weights at every level
            for p_ref, p in zip(reference.collect_params().values(), net.collect_params().values(),
                                strict=True):
                p.set_data(p_ref.data())
        w_trainer, lam_trainer = search_trainers(args, net)
        rng = np.random.RandomState(args.seed)
        if net.shared:
            mask, dead = random_mask(net.spec, s, rng)
            masks, deads = [mask] * net.num_blocks, [dead]
        else:
            pairs = [random_mask(net.spec, s, rng) for _ in range(net.num_blocks)]
            masks, deads = [m for m, _ in pairs], [d for _, d in pairs]
        if s > 0:
            shrink(net, masks, lam_trainer)
        steps = list(step_fns(net, w_trainer, lam_trainer, x, y))

        def epoch(steps=steps):
            for i in range(args.iters):
                steps[i % 2]()
        name = f"{s:g}"
        epochs[name] = epoch
        levels[name] = {"target_sparsity": s, "lambda_sparsity": float(np.mean(deads)),
                        "live_ops": sum(len(m.live_slots()) for m in masks),
                        "forward_macs": cost.count(net, x.shape).macs}
    medians, samples = interleaved(epochs, args.rounds, warmup=1)
    base = levels["0"]
    for name, lv in levels.items():
        lv["epoch_s"] = medians[name]
        lv["epoch_samples_s"] = samples[name]
        lv["live_flops_fraction"] = lv["forward_macs"] / base["forward_macs"]
        lv["time_fraction"] = lv["epoch_s"] / base["epoch_s"]
        lv["time_over_flops"] = lv["time_fraction"] / lv["live_flops_fraction"]
    return {
        "config": {"filters": args.filters, "stages": list(args.stages), "batch": args.batch,
                   "space": args.space, "levels": args.levels, "input_size": args.input_size,
                   "iters": args.iters, "rounds": args.rounds, "seed": args.seed,
                   "load_at_start": load,
                   "omp_num_threads": args.threads_in_force},
        "levels": levels,
        "time_over_flops": {name: lv["time_over_flops"] for name, lv in levels.items() if name != "0"},
    }


def report(r):
    c = r["config"]
    print(load_note(c["load_at_start"]))
    print(f"search epoch = {c['iters']} iterations (W:λ 1:1), CIFAR supernet {c['space']}, filters "
          f"{c['filters']}, stages {c['stages']}, batch {c['batch']}, "
          f"OMP_NUM_THREADS={c['omp_num_threads']}\n")
    rows = []
    for name, lv in r["levels"].items():
        rows.append([name, f"{lv['lambda_sparsity']:.2f}", lv["live_ops"], f"{lv['forward_macs'] / 1e9:.3f}",
                     f"{lv['live_flops_fraction']:.3f}", f"{lv['epoch_s']:.2f}", f"{lv['time_fraction']:.3f}",
                     f"{lv['time_over_flops']:.2f}"])
    print_table(["target", "λ sparsity", "live ops", "fwd GMACs", "live FLOPs", "epoch (s)", "time",
                 "time/FLOPs"], rows)
    print()
    for name, ratio in r["time_over_flops"].items():
        print(f"at sparsity {name}: epoch time share / live FLOPs share = {ratio:.2f} (target <= 1.2)")


def main(argv=None):
    args = parse_args(argv)
    args.threads_in_force = setup_threads(args.threads)
    emit(measure(args), args.json, report)
    return 0


if __name__ == "__main__":
    run_tool(main)
