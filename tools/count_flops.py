"""Params, MACs (FLOPs = 2 x MACs), memory access and optionally latency of genotypes and GluonCV models.

    python tools/count_flops.py --genotype runs/default/genotype.json --width-mult 1.5
    python tools/count_flops.py --genotype configs/genotypes/shufflenet_v2_1.0_imagenet.json \
        --model shufflenet_v2 --latency
    python tools/count_flops.py --model resnet50_v1 --json

Beside params, MACs and MAC, every row carries ShuffleNet V2's G3 and G4 measures: fragments (convolutions,
poolings and dense layers), the most of them side by side (parallel), and the element-wise ops (ReLU, add,
mul, concat, shuffle, split, pad) with their memory access; --json also breaks those down by kind.
Conventions are those of dsonas.cost.
"""

import argparse
import json

from common import run_tool, setup_threads


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--genotype", action="append", default=[], metavar="JSON",
                   help="genotype file written by search (repeatable)")
    p.add_argument("--width-mult", type=float, default=1.0,
                   help="width multiplier for --genotype (default 1)")
    p.add_argument("--channel-divisor", type=int, default=8, metavar="D",
                   help="stage widths round to multiples of D when --width-mult is not 1 (default 8, as "
                        "retrain.channel_divisor); such rows are named GENOTYPE@W/D")
    p.add_argument("--model", action="append", default=[], metavar="NAME",
                   help="GluonCV model-zoo name, e.g. mobilenetv2_1.0 (repeatable; built without weights)")
    p.add_argument("--input-size", type=int, metavar="S",
                   help="square input side (default: the genotype's; 224 for zoo models, 32 for cifar_*)")
    p.add_argument("--batch-size", type=int, default=1, help="batch of the counted/timed input (default 1)")
    p.add_argument("--latency", action="store_true", help="also measure forward latency (median, ms)")
    p.add_argument("--ctx", default="cpu", help="device for --latency: cpu or gpu(0)")
    p.add_argument("--repeats", type=int, default=20, help="timed passes for --latency (median; default 20)")
    p.add_argument("--threads", type=int, help="OpenMP threads (default: OMP_NUM_THREADS or all cores)")
    p.add_argument("--json", action="store_true", help="one JSON object per model instead of a table")
    args = p.parse_args(argv)
    if not args.genotype and not args.model:
        p.error("give at least one --genotype or --model")
    if args.channel_divisor < 1:
        p.error(f"--channel-divisor must be at least 1, got {args.channel_divisor}")
    return args


def main(argv=None):
    args = parse_args(argv)
    setup_threads(args.threads)
    from dsonas import cost  # imports mxnet

    ctx = None
    if args.latency:
        from dsonas.engine import contexts

        ctx = contexts([args.ctx])[0]
    nets = []
    for path in args.genotype:
        net, size = cost.genotype_net(path, args.width_mult, args.channel_divisor)
        label = path if args.width_mult == 1.0 else f"{path}@{args.width_mult:g}/{args.channel_divisor}"
        nets.append((label, net, size))
    for model in args.model:
        nets.append((model, *cost.zoo_net(model)))
    rows = [cost.summarize(name, net, (args.batch_size, 3, args.input_size or size, args.input_size or size),
                           ctx, args.repeats) for name, net, size in nets]
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(cost.format_table(rows))
        print("MACs = multiply-accumulates, FLOPs = 2 x MACs; MAC = memory access cost in elements "
              "(feature maps read + written + weights)")
        print("fragments = convolutions + poolings + dense layers (G3), parallel = most of them side by "
              "side; elem ops / elem MAC = element-wise ops and their memory access (G4, BatchNorm excluded)")


if __name__ == "__main__":
    run_tool(main)
