"""Inference speed of a derived dsonas net against GluonCV's mobile models, at 32x32 and 224x224.

Models: the derived net (a --genotype file, or by default a share genotype derived from random λ at
--sparsity on the ImageNet skeleton, width solved so that its MACs at 224x224 match ShuffleNetV2 1.0's),
and GluonCV's ShuffleNetV2 1.0 (`shufflenet_v2`), MobileNetV2 1.0 and MobileNet 1.0, all with random
weights (speed does not depend on them). Every model runs the same network at both input sizes, as the
GluonCV models do. Figures: latency at batch 1 and 8 (ms per call) and throughput at batch 64
(images/s), each model in three forms timed interleaved per (size, batch):

* static: hybridize(static_alloc=True, static_shape=True);
* folded: dsonas.fold.folded_block (BatchNorm folded into the convolution before it, on the graph: the
  form `tools/export_symbol.py` writes), hybridized the same way;
* mkldnn: dsonas.export.optimize_mkldnn(x, static_alloc=True, static_shape=True): the folded graph
  through oneDNN's graph pass (conv+ReLU and conv+sum fusion), the form `export_symbol.py --fuse-bn`
  writes. mxnet 1.9.1 knows no backend named 'ONEDNN' (it would silently run unfused).
The folded and mkldnn outputs are checked against the static form's (max abs difference relative to the
output's scale). A form whose outputs cannot be read back (oneDNN's fused graph sometimes fails so,
MXNet 1.9.1) is reported as failed for that batch, and the other forms are timed.

The headline ratios use each model's fastest form. MACs are dsonas.cost.count's per image (FLOPs = 2 x MACs).

    OMP_NUM_THREADS=2 .venv/bin/python bench/inference.py
    OMP_NUM_THREADS=2 .venv/bin/python bench/inference.py --sizes 32 --repeats 5 --models shufflenet_v2
"""

import argparse

from common import (
    emit,
    interleaved,
    load_note,
    machine_load,
    print_table,
    random_mask,
    run_tool,
    setup_threads,
)

ZOO = ("shufflenet_v2", "mobilenetv2_1.0", "mobilenet1.0")
DERIVED = "dsonas"
BATCHES = (1, 8, 64)
FORMS = ("static", "folded", "mkldnn")
# Built in this order: oneDNN's fused graph built after a static_alloc Gluon net of the same model has
# run gave unreadable outputs ("can't generate TBlob for MKLDNN data", MXNet 1.9.1; derived nets at batch
# 8 and 64); built first, every form of every model ran.
PREPARE_ORDER = ("mkldnn", "folded", "static")
TOLERANCE = 1e-3  # relative to max |output|: fusing BN into convolutions reorders float sums


def int_list(text):
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--genotype", metavar="JSON", help="derived net of this genotype (default: random λ)")
    p.add_argument("--sparsity", type=float, default=0.8,
                   help="λ sparsity of the default random genotype (default 0.8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the default random genotype (default 0)")
    p.add_argument("--width-mult", type=float,
                   help="width of the derived net (default: match ShuffleNetV2 1.0's MACs at 224x224)")
    p.add_argument("--models", default=",".join(ZOO), help=f"GluonCV models (default {','.join(ZOO)})")
    p.add_argument("--sizes", type=int_list, default=[32, 224], help="input sides (default 32,224)")
    p.add_argument("--repeats", type=int, default=20,
                   help="timed calls per model at batch 1 (default 20; fewer at larger batches)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS (default: the environment's, else all cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object with every figure")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    return args


def default_genotype(args):
    """A share genotype on the ImageNet skeleton (paper: 2,2,13,6 blocks), mask from random λ."""
    import numpy as np

    from dsonas.genotype import Genotype
    from dsonas.space import OP_SETS, BlockSpec, Skeleton

    spec = BlockSpec(levels=4, ops=OP_SETS["dso"], merge="concat")
    skeleton = Skeleton(kind="imagenet", filters=48, stages=(2, 2, 13, 6), num_classes=1000, input_size=224)
    mask, _ = random_mask(spec, args.sparsity, np.random.RandomState(args.seed))
    return Genotype(skeleton=skeleton, spec=spec, shared=True, masks=[mask])


def builders(args):
    """{model name: build() -> uninitialised net}, and the derived net's genotype and width."""
    from gluoncv.model_zoo import get_model

    from dsonas import cost
    from dsonas.genotype import Genotype
    from dsonas.network import deploy_net

    genotype = Genotype.load(args.genotype) if args.genotype else default_genotype(args)
    width = args.width_mult
    if width is None:
        target = cost.count(get_model("shufflenet_v2", pretrained=False), (1, 3, 224, 224)).macs
        width = cost.solve_width_mult(lambda w: deploy_net(genotype, w), target, "macs",
                                      (1, 3, 224, 224), tol=0.1)
    out = {DERIVED: lambda: deploy_net(genotype, width)}
    for name in args.models:
        out[name] = lambda name=name: get_model(name, pretrained=False)
    return out, genotype, width


def instance(build, reference):
    """A fresh, initialised net from `build`, with `reference`'s parameter values if given (same order)."""
    import mxnet as mx

    net = build()
    net.initialize(mx.init.Xavier())
    if reference is not None:
        for p_ref, p in zip(reference.collect_params().values(), net.collect_params().values(), strict=True):
            p.set_data(p_ref.data())
    return net


def prepare(build, reference, x, form):
    """A net in `form` on input shape x.shape, called once (graph built, buffers allocated)."""
    from dsonas.export import optimize_mkldnn
    from dsonas.fold import folded_block

    net = instance(build, reference)
    if form != "static":
        net(x)  # finishes GluonCV's deferred initialisation: folding reads every Parameter
    if form == "folded":
        net, _ = folded_block(net)
    if form == "mkldnn":
        net, _ = optimize_mkldnn(net, x, static_alloc=True, static_shape=True)
    else:
        net.hybridize(static_alloc=True, static_shape=True)
    net(x).wait_to_read()
    return net


def read(net, x):
    """net(x) as a numpy array; None when MXNet cannot read it back (oneDNN's fused graph sometimes
    returns "can't generate TBlob for MKLDNN data", MXNet 1.9.1): that form is reported as failed."""
    import mxnet as mx

    try:
        return net(x).asnumpy()
    except mx.base.MXNetError:
        return None


def call_fn(net, x):
    def run():
        net(x).wait_to_read()
    return run


def measure(args):
    import mxnet as mx

    from dsonas import cost

    load = machine_load()
    build, genotype, width = builders(args)
    mx.random.seed(0)
    refs = {name: instance(b, None) for name, b in build.items()}  # the weights every form shares
    for net in refs.values():
        net(mx.nd.zeros((1, 3, 32, 32)))  # finish GluonCV's deferred initialisation
    rows = {}
    for size in args.sizes:
        for name in build:
            r = cost.count(refs[name], (1, 3, size, size))
            rows[(name, size)] = {"model": name, "size": size, "macs": r.macs, "params": r.params}
        for batch in BATCHES:
            x = mx.nd.random.normal(shape=(batch, 3, size, size))
            fns = {}
            for name, b in build.items():
                nets = {form: prepare(b, refs[name], x, form) for form in PREPARE_ORDER}
                outs = {form: read(net, x) for form, net in nets.items()}
                row = rows[(name, size)]
                if outs["static"] is None:
                    raise RuntimeError(f"{name}: the static-hybridized net's output cannot be read back")
                scale = max(float(abs(outs["static"]).max()), 1e-12)
                for form in FORMS[1:]:
                    if outs[form] is None:
                        row.setdefault("failed", []).append(f"{form} b{batch}")
                        continue
                    diff = float(abs(outs[form] - outs["static"]).max()) / scale
                    row[f"{form}_max_rel_diff"] = max(row.get(f"{form}_max_rel_diff", 0.0), diff)
                for form, net in nets.items():
                    if outs[form] is not None:
                        fns[(name, form)] = call_fn(net, x)
            heavy = batch * size * size / (8 * 224 * 224)  # fewer calls where one call is long
            repeats = max(3, int(args.repeats / max(1.0, heavy)))
            medians, _ = interleaved(fns, repeats, warmup=1)
            for (name, form), t in medians.items():
                row = rows[(name, size)]
                if batch == 64:
                    row[f"{form}_b64_images_per_s"] = batch / t
                else:
                    row[f"{form}_b{batch}_ms"] = 1e3 * t
    for row in rows.values():
        for batch in BATCHES:
            if batch == 64:
                key, pick = "b64_images_per_s", max
            else:
                key, pick = f"b{batch}_ms", min
            row[key] = pick(row[k] for k in (f"{form}_{key}" for form in FORMS) if k in row)
        row["outputs_match"] = all(row.get(f"{form}_max_rel_diff", 0.0) <= TOLERANCE for form in FORMS[1:])
    result = {
        "config": {"genotype": args.genotype or f"random λ, sparsity {args.sparsity}, seed {args.seed}",
                   "derived_width_mult": width, "derived_skeleton": genotype.skeleton.to_dict(),
                   "sizes": args.sizes, "batches": list(BATCHES), "repeats": args.repeats,
                   "load_at_start": load,
                   "omp_num_threads": args.threads_in_force},
        "rows": list(rows.values()),
        "vs_shufflenet_v2": {},
    }
    if "shufflenet_v2" in build:
        for size in args.sizes:
            d, s = rows[(DERIVED, size)], rows[("shufflenet_v2", size)]
            result["vs_shufflenet_v2"][str(size)] = {
                "macs_ratio": d["macs"] / s["macs"],
                "b1_latency_ratio": d["b1_ms"] / s["b1_ms"], "b8_latency_ratio": d["b8_ms"] / s["b8_ms"],
                "b64_throughput_ratio": d["b64_images_per_s"] / s["b64_images_per_s"]}
    return result


def per_form(row, key, fmt):
    """One table cell: the figure `key` of every form, in FORMS order."""
    return " / ".join(format(row[k], fmt) if (k := f"{form}_{key}") in row else "failed" for form in FORMS)


def report(r):
    c = r["config"]
    print(load_note(c["load_at_start"]))
    print(f"derived net: {c['genotype']}, {c['derived_skeleton']['kind']} skeleton "
          f"{c['derived_skeleton']['stages']}, width x{c['derived_width_mult']:.3f}; "
          f"OMP_NUM_THREADS={c['omp_num_threads']}")
    print("latency = ms per call, throughput = images/s; each cell: static-hybridized / BN-folded / "
          "MKLDNN-optimized\n")
    rows = []
    for row in r["rows"]:
        worst = max(row.get(f"{form}_max_rel_diff", 0.0) for form in FORMS[1:])
        rows.append([row["model"], f"{row['size']}", f"{row['macs'] / 1e6:.1f}", f"{row['params'] / 1e6:.2f}",
                     per_form(row, "b1_ms", ".2f"), per_form(row, "b8_ms", ".2f"),
                     per_form(row, "b64_images_per_s", ".0f"),
                     "yes" if row["outputs_match"] else f"NO ({worst:.1e})"])
    print_table(["model", "input", "MACs (M)", "params (M)", "b1 latency", "b8 latency", "b64 img/s",
                 "outputs match"], rows)
    for row in r["rows"]:
        if row.get("failed"):
            failed = ", ".join(row["failed"])
            print(f"failed: {row['model']} at {row['size']}: {failed} (outputs could not be read back: "
                  "oneDNN's fused graph, MXNet 1.9.1); the best of the other forms is used")
    print()
    for size, v in r["vs_shufflenet_v2"].items():
        print(f"{size}x{size}: derived / ShuffleNetV2 1.0 (best form each): MACs {v['macs_ratio']:.2f}x, "
              f"latency b1 {v['b1_latency_ratio']:.2f}x, b8 {v['b8_latency_ratio']:.2f}x, "
              f"throughput b64 {v['b64_throughput_ratio']:.2f}x  (latency < 1 = derived is faster)")


def main(argv=None):
    args = parse_args(argv)
    args.threads_in_force = setup_threads(args.threads)
    emit(measure(args), args.json, report)
    return 0


if __name__ == "__main__":
    run_tool(main)
