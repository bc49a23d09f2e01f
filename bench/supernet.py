"""Supernet training step: dsonas's fast block against the naive (published) formulation.

Every variant is the CIFAR supernet of the given shape built by dsonas.network.build_supernet, with the
same initial weights:

* fast: formulation="fast" (one matrix product per level, λ_out folded into the merge weight),
  hybridize(static_alloc=True), steps as dsonas.engine.search runs them: a W step computes only W's
  gradients, a λ step only λ's (DsoNet.set_trained);
* naive: formulation="naive" (every edge a broadcast_mul, sums with add_n, as the published code does),
  hybridize(static_alloc=True): the strongest baseline of that formulation on MXNet 1.9.1, with every
  gradient computed in every step, as the published solver does (one Module, forward/backward/update,
  optimizer flags choosing W or λ);
* naive_trained_only: the naive net with dsonas's steps (only the stepped group's gradients): isolates
  the block formulation from the step;
* naive_plain: the same naive net with a plain hybridize() (no static_alloc: buffers come from the pool
  on every call), the closest Gluon analogue of the published implementation, which ran the symbolic
  executor. The issue's 49 s/step and 15 GB are the published code's own figures, not this variant's;
* fast_recompute: the fast net trained with runtime.recompute (dsonas.recompute: every block's
  activations recomputed in backward, the segments run through CachedOps shared by the blocks of a stage):
  the memory-lean way to run the same search.

`speedup_vs_naive` and `memory_ratio_vs_naive` compare fast against **naive** (static_alloc);
`speedup_vs_naive_plain`, `speedup_vs_naive_trained_only` and their memory ratios against those variants;
the same keys prefixed `fast_recompute_` compare fast_recompute.

A *W step* is one forward/backward on a batch plus an NAG update of the weights; a *λ step* is the same
with an APG-NAG update of the λ (what dsonas.engine.search runs 1:1). Steps of all variants are timed
interleaved in this process (median); peak memory is the resident-set high-water mark of a fresh child
process per variant, minus its resident set just before the network is built, after --memory-steps W
and λ steps (default 3: a graph allocated afresh on every call, as in recompute mode, keeps growing
after the first step while glibc's arenas fill; dsonas.malloc).

FLOPs convention: forward MACs counted by dsonas.cost.count on the fast supernet (convolutions, dense
layers and the mixing dots; BN, pooling and elementwise ops add none), FLOPs = 2 x MACs, and a training
step = 3 x the forward FLOPs (forward, backward to the data, backward to the weights).
peak_fraction = step FLOPs / fast W-step time / the machine's peak (n x n fp32 matrix product, the faster
of mx.nd.dot and oneDNN's FullyConnected).

    OMP_NUM_THREADS=2 .venv/bin/python bench/supernet.py --steps 3 --naive-steps 1   # the paper's shape
    OMP_NUM_THREADS=2 .venv/bin/python bench/supernet.py --steps 3 --naive-steps 1 --variants fast,naive_plain
    OMP_NUM_THREADS=2 .venv/bin/python bench/supernet.py --filters 16 --stages 2,2,2 --steps 3
"""

import argparse

from common import (
    add_supernet_args,
    build_supernet,
    child_result,
    current_rss_mb,
    emit,
    interleaved,
    load_note,
    machine_load,
    matmul_gflops,
    max_rss_mb,
    print_table,
    random_batch,
    run_child,
    run_tool,
    search_trainers,
    setup_threads,
    step_fns,
    supernet_shape_args,
)

# variant -> (block formulation, static_alloc, recompute), and whether its steps compute every gradient
VARIANTS = {"fast": ("fast", True, False), "fast_recompute": ("fast", False, True),
            "naive": ("naive", True, False), "naive_plain": ("naive", False, False),
            "naive_trained_only": ("naive", True, False)}
EVERY_GRADIENT = {"naive", "naive_plain"}
NAIVE_LABELS = {"naive": "naive (static_alloc)", "naive_plain": "naive_plain (plain hybridize)",
                "naive_trained_only": "naive_trained_only (dsonas's steps)"}
NAIVE = tuple(NAIVE_LABELS)
OURS = (("fast", ""), ("fast_recompute", "fast_recompute_"))  # variant, prefix of its headline keys


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    add_supernet_args(p)
    p.add_argument("--variants", default="fast,naive",
                   help="comma list of fast,fast_recompute,naive,naive_plain,naive_trained_only (default "
                        "fast,naive: every "
                        "variant's net lives in this process, and at the paper's shape three nets need "
                        "over 15 GB)")
    p.add_argument("--steps", type=int, default=5,
                   help="timed W and λ steps of fast and fast_recompute (default 5)")
    p.add_argument("--naive-steps", type=int, default=2,
                   help="timed W and λ steps of each naive net (default 2; slow at the paper's shape)")
    p.add_argument("--warmup", type=int, default=1, help="untimed W and λ steps per variant (default 1)")
    p.add_argument("--no-memory", action="store_true", help="skip the child processes that measure memory")
    p.add_argument("--memory-steps", type=int, default=3,
                   help="W and λ steps each memory child runs before its peak is read (default 3)")
    p.add_argument("--peak-n", type=int, default=2048, help="peak GFLOP/s matrix side (default 2048)")
    # internal: measure one variant's RSS in this (child) process
    p.add_argument("--child-memory", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_steps < 1:
        p.error("--memory-steps: expected at least 1")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        p.error(f"--variants: expected a comma list of {', '.join(VARIANTS)}, got {bad or 'nothing'}")
    return args


def child_memory(args):
    """Internal: build one variant in this fresh process, run --memory-steps W and λ steps, report the
    RSS growth."""
    from dsonas import optim  # noqa: F401  (imports mxnet: its own RSS is not the network's)

    x, y = random_batch(args)
    base = current_rss_mb()
    net = build_supernet(args, *VARIANTS[args.child_memory])
    steps = step_fns(net, *search_trainers(args, net), x, y, args.child_memory in EVERY_GRADIENT)
    for _ in range(args.memory_steps):
        for step in steps:
            step()
    peak = max_rss_mb()
    child_result({"variant": args.child_memory, "base_rss_mb": base, "peak_rss_mb": peak,
                  "peak_rss_delta_mb": peak - base})


def measure(args):
    from dsonas import cost

    load = machine_load()
    x, y = random_batch(args)
    # Memory first, one fresh child per variant, while this process holds no network (the published
    # naive implementation needed ~15 GB at the paper's shape: never several big nets plus a child).
    memory = {} if args.no_memory else {
        v: run_child(__file__, ["--child-memory", v, "--memory-steps", args.memory_steps,
                              *supernet_shape_args(args)]) for v in args.variants}
    matmul_before = matmul_gflops(args.peak_n)
    nets, fns, rounds = {}, {}, {}
    for v in args.variants:
        nets[v] = net = build_supernet(args, *VARIANTS[v])
        fns[f"{v}/w"], fns[f"{v}/lam"] = step_fns(net, *search_trainers(args, net), x, y, v in EVERY_GRADIENT)
        n = args.naive_steps if v in NAIVE else args.steps
        rounds[f"{v}/w"] = rounds[f"{v}/lam"] = n
    first = list(nets[args.variants[0]].collect_params().values())
    for v in args.variants[1:]:  # the same initial weights and λ in every variant
        for p_first, p in zip(first, nets[v].collect_params().values(), strict=True):
            p.set_data(p_first.data())
    medians, samples = interleaved(fns, rounds, warmup=args.warmup)
    matmul_after = matmul_gflops(args.peak_n)
    peak_before, peak_after = max(matmul_before.values()), max(matmul_after.values())
    peak = max(peak_before, peak_after)

    macs = cost.count(nets["fast"] if "fast" in nets else build_supernet(args, "fast"), x.shape).macs
    step_flops = 3 * 2 * macs
    result = {
        "config": {"filters": args.filters, "stages": list(args.stages), "batch": args.batch,
                   "space": args.space, "levels": args.levels, "input_size": args.input_size,
                   "steps": args.steps, "naive_steps": args.naive_steps, "warmup": args.warmup,
                   "peak_n": args.peak_n, "memory_steps": args.memory_steps,
                   "load_at_start": load,
                   "omp_num_threads": args.threads_in_force},
        "flops_convention": "step FLOPs = 3 x 2 x forward MACs (dsonas.cost.count of the fast supernet)",
        "forward_macs": macs, "step_gflop": step_flops / 1e9,
        "peak_gflops": peak, "peak_gflops_before": peak_before, "peak_gflops_after": peak_after,
        "matmul_gflops_before": matmul_before, "matmul_gflops_after": matmul_after,
        "variants": {},
    }
    for v in args.variants:
        t_w, t_lam = medians[f"{v}/w"], medians[f"{v}/lam"]
        result["variants"][v] = {
            "ms_per_w_step": 1e3 * t_w, "ms_per_lambda_step": 1e3 * t_lam,
            "images_per_s": args.batch / t_w, "search_images_per_s": 2 * args.batch / (t_w + t_lam),
            "gflops_w_step": step_flops / t_w / 1e9, "samples_w_s": samples[f"{v}/w"],
            "samples_lambda_s": samples[f"{v}/lam"], "every_gradient_every_step": v in EVERY_GRADIENT,
        }
        if v in memory:
            result["variants"][v].update({k: memory[v][k] for k in ("peak_rss_delta_mb", "peak_rss_mb")})
    for v, prefix in OURS:
        ours = result["variants"].get(v)
        for base in NAIVE:
            keys = [f"{prefix}{k}_vs_{base}" for k in ("speedup", "speedup_w_step", "speedup_lambda_step",
                                                        "memory_ratio")]
            result.update(dict.fromkeys(keys))
            naive = result["variants"].get(base)
            if ours is None or naive is None:
                continue
            w, lam = "ms_per_w_step", "ms_per_lambda_step"
            result[keys[0]] = (naive[w] + naive[lam]) / (ours[w] + ours[lam])
            result[keys[1]] = naive[w] / ours[w]
            result[keys[2]] = naive[lam] / ours[lam]
            if not args.no_memory:
                result[keys[3]] = ours["peak_rss_delta_mb"] / naive["peak_rss_delta_mb"]
        result[f"{prefix}peak_fraction"] = (step_flops / (ours["ms_per_w_step"] / 1e3) / (peak * 1e9)
                                            if ours is not None else None)
    return result


def report(r):
    c = r["config"]
    print(load_note(c["load_at_start"]))
    print(f"CIFAR supernet, {c['space']} space, filters {c['filters']}, stages {c['stages']}, "
          f"batch {c['batch']}, {c['input_size']}x{c['input_size']}, OMP_NUM_THREADS={c['omp_num_threads']}")
    print(f"forward {r['forward_macs'] / 1e9:.2f} GMACs; training step {r['step_gflop']:.1f} GFLOP "
          f"({r['flops_convention']})")
    paths = ", ".join(f"{name} {max(r['matmul_gflops_before'][name], r['matmul_gflops_after'][name]):.0f}"
                      for name in r["matmul_gflops_before"])
    print(f"machine peak {r['peak_gflops']:.0f} GFLOP/s (fp32 matrix product, the faster path of: {paths})\n")
    rows = []
    for v, m in r["variants"].items():
        mem = f"{m['peak_rss_delta_mb']:.0f}" if "peak_rss_delta_mb" in m else "-"
        rows.append([v, f"{m['ms_per_w_step']:.0f}", f"{m['ms_per_lambda_step']:.0f}",
                     f"{m['images_per_s']:.1f}", f"{m['gflops_w_step']:.1f}", mem])
    head = ["variant", "W step (ms)", "λ step (ms)", "images/s (W)", "GFLOP/s (W)", "peak RSS +MB"]
    print_table(head, rows)
    print()
    for v, prefix in OURS:
        for base, label in NAIVE_LABELS.items():
            if r[f"{prefix}speedup_vs_{base}"] is not None:
                w, lam = r[f"{prefix}speedup_w_step_vs_{base}"], r[f"{prefix}speedup_lambda_step_vs_{base}"]
                line = (f"{v} vs {label}: {r[f'{prefix}speedup_vs_{base}']:.1f}x faster per W+λ step pair "
                        f"(W {w:.1f}x, λ {lam:.1f}x)")
                if r[f"{prefix}memory_ratio_vs_{base}"] is not None:
                    line += f", {r[f'{prefix}memory_ratio_vs_{base}']:.2f}x its peak memory"
                print(line)
        if r[f"{prefix}peak_fraction"] is not None:
            print(f"{v} W step reaches {100 * r[f'{prefix}peak_fraction']:.1f}% of the measured peak GFLOP/s")


def main(argv=None):
    args = parse_args(argv)
    args.threads_in_force = setup_threads(args.threads)
    if args.child_memory:
        child_memory(args)
        return 0
    emit(measure(args), args.json, report)
    return 0


if __name__ == "__main__":
    run_tool(main)
