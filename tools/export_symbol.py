"""Export retrained weights as a deployable MXNet symbol + params (and ONNX), reload-checked and scored.

    python tools/export_symbol.py --genotype runs/default/genotype.json \\
        --params runs/default-retrain/best.params --out runs/default-retrain/export/model [--onnx]

Writes PREFIX-symbol.json, PREFIX-0000.params, PREFIX.json (params, MACs, input shape, normalization)
and with --onnx PREFIX.onnx; then prints the test accuracy of the model reloaded from those files on the
configured test set (--config/--set/--data as for the other tools).
"""

import argparse

from common import add_common_args, resolve_config, run_tool, setup_threads


def parse_args(argv=None):
    # "resolve": this tool's --out is the export prefix, not the parent of run folders.
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], conflict_handler="resolve")
    add_common_args(p)
    p.add_argument("--genotype", required=True, metavar="JSON", help="genotype.json written by search")
    p.add_argument("--params", required=True, metavar="FILE", help="trained weights (best.params of retrain)")
    p.add_argument("--out", required=True, metavar="PREFIX",
                   help="write PREFIX-symbol.json, PREFIX-0000.params, PREFIX.json")
    p.add_argument("--width-mult", type=float, metavar="W",
                   help="width multiplier of --params, its channels in multiples of retrain.channel_divisor "
                        "(default: the pair retrain recorded beside them, else the config's)")
    p.add_argument("--input-size", type=int, metavar="S", help="square input side (default: the genotype's)")
    p.add_argument("--onnx", action="store_true",
                   help="also write PREFIX.onnx (needs: pip install 'onnx<1.16')")
    p.add_argument("--fuse-bn", action="store_true",
                   help="write oneDNN's fused graph (Conv+BN+ReLU+sum in one node; it then loads only in "
                        "MKLDNN-enabled MXNet CPU builds; not with --onnx). Without it, BatchNorm after a "
                        "convolution is folded into it, for every backend")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = resolve_config(args)
    setup_threads(cfg.runtime.threads)
    import os

    from dsonas import export as ex  # imports mxnet
    from dsonas import retrain as rt
    from dsonas.engine import contexts
    from dsonas.genotype import Genotype
    from dsonas.network import deploy_net

    if args.onnx:
        ex.onnx_available()  # fail before any work
    genotype = Genotype.load(args.genotype)
    width, divisor = rt.params_width(args.params, args.width_mult, cfg.retrain)
    ctx = contexts(cfg.runtime.ctx)[:1]
    net = deploy_net(genotype, width, divisor)
    rt.load_params(net, args.params, ctx)
    loader, bundle = rt.eval_data(cfg, genotype)
    size = args.input_size or genotype.skeleton.input_size
    meta = {"genotype": os.path.abspath(args.genotype), "source_params": os.path.abspath(args.params),
            "width_mult": width, "channel_divisor": divisor,
            "preprocess": "RGB NCHW, scaled to [0, 1], minus mean, divided by std", "mean": list(bundle.mean),
            "std": list(bundle.std), "class_names": list(bundle.class_names)}
    res = ex.export(net, args.out, (2, 3, size, size), meta=meta, onnx=args.onnx, fuse_bn=args.fuse_bn,
                    ctx=ctx[0])
    reloaded = ex.load_exported(res.symbol_file, res.params_file, ctx[0])
    loss, acc = rt.evaluate_net(reloaded, loader, ctx)
    ex.add_meta(res.meta_file, test_acc=acc, test_data=cfg.data.source)
    for path in (res.symbol_file, res.params_file, res.onnx_file, res.meta_file):
        if path:
            print(f"wrote {path} ({os.path.getsize(path) / 1024:.1f} KiB)")
    print(f"net: {res.params / 1e6:.4f}M params, {res.macs / 1e6:.3f}M MACs per {size}x{size} image "
          f"at {rt.width_text(width, divisor)}")
    print(f"reloaded model test accuracy {acc:.4f} (loss {loss:.4f}) on the {cfg.data.source} test set")
    return 0


if __name__ == "__main__":
    run_tool(main)
