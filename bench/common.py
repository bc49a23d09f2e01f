"""What the benchmark scripts share: thread set-up, interleaved timing, peak GFLOP/s, child-process RSS.

Scripts run as `python bench/<script>.py`, so this folder is on sys.path and they `from common import ...`.
Like tools/common.py this module must not import mxnet at import time: OpenMP reads OMP_NUM_THREADS once,
when libmxnet loads, so a script parses its arguments, calls `setup_threads`, and only then imports mxnet.

Timing rule: variants are compared in the same process, interleaved round by round (A B A B ...), and
summarised by the median, because the machine may be shared and its speed drifts over seconds.
"""

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Benchmarks also work from a plain checkout (no `pip install -e .`): the package sits next to bench/.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _tools_common():
    """tools/common.py, loaded by path: both folders name their helper module `common`."""
    spec = importlib.util.spec_from_file_location("dsonas_tools_common", REPO_ROOT / "tools" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



def run_tool(main):
    """tools/common.run_tool: a DsonasError becomes one line "error: <msg>" and exit code 2."""
    _tools_common().run_tool(main)


def setup_threads(threads=None):
    """OMP_NUM_THREADS before mxnet loads (see tools/common.setup_threads); returns the count in force."""
    return _tools_common().setup_threads(threads)


def interleaved(fns, rounds, warmup=1):
    """{name: median seconds per call} of the callables `fns` ({name: fn}), called round-robin.

    Each fn must block until its work is done (e.g. end with mx.nd.waitall()). `rounds` may be an int or
    a {name: int} (e.g. fewer rounds for a slow variant); a variant drops out once it has its rounds.
    Also returns every sample, for the JSON output: (medians, samples).
    """
    want = rounds if isinstance(rounds, dict) else dict.fromkeys(fns, rounds)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    while any(len(samples[n]) < want[n] for n in fns):
        for name, fn in fns.items():
            if len(samples[name]) < want[name]:
                t = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t)
    return {n: statistics.median(s) for n, s in samples.items() if s}, samples


# The vector extensions that decide which oneDNN kernels run, widest first.
ISA_FLAGS = ("amx_tile", "avx512_bf16", "avx512f", "avx2")


def cpu_identity(cpuinfo="/proc/cpuinfo"):
    """{cpu_model, isa}: the same session's machine may be another CPU the next day (an Intel part with
    AVX-512 and an AMD EPYC with AVX2 only have both served here, at 190-234 vs ~70 GFLOP/s), so every
    figure names the CPU it was measured on. isa lists the ISA_FLAGS the CPU has."""
    model, flags = "unknown", set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"cpu_model": model, "isa": [flag for flag in ISA_FLAGS if flag in flags]}


def machine_load():
    """{cpus, load_1m, cpu_model, isa}: figures from a busy shared machine are not comparable with a quiet
    one's, nor figures from different CPUs."""
    return {"cpus": len(os.sched_getaffinity(0)), "load_1m": os.getloadavg()[0], **cpu_identity()}


def load_note(load):
    """One line for the printed report; a warning when other work was competing for the cores."""
    isa = ", ".join(load["isa"]) or "no AVX2"
    line = (f"{load['cpu_model']} ({isa}); "
            f"load average {load['load_1m']:.1f} on {load['cpus']} cores at the start")
    if load["load_1m"] > 0.5:
        line += ("  (WARNING: the machine was busy; with OMP_NUM_THREADS > free cores OpenMP barriers stall "
                 "and times can be many times slower: rerun on a quiet machine or with OMP_NUM_THREADS=1)")
    return line


def matmul_gflops(n=2048, repeats=5):
    """fp32 n x n matrix-product throughput (GFLOP/s, median of `repeats`) of MXNet's two GEMM paths:
    `dot` (the OpenBLAS bundled with the mxnet wheel) and `FullyConnected` (oneDNN, the library the
    convolutions run on).

    Why both: the bundled OpenBLAS picks its kernels by CPU model, and on an AVX-512 Intel CPU it did not
    recognise it reached 25-43 GFLOP/s while oneDNN reached 170-200 on the same machine (bench/README.md).
    """
    import mxnet as mx

    a = mx.nd.random.uniform(shape=(n, n))
    b = mx.nd.random.uniform(shape=(n, n))
    paths = {"dot": lambda: mx.nd.dot(a, b).wait_to_read(),
             "fully_connected": lambda: mx.nd.FullyConnected(a, b, num_hidden=n, no_bias=True).wait_to_read()}
    medians, _ = interleaved(paths, repeats)
    return {name: 2.0 * n ** 3 / seconds / 1e9 for name, seconds in medians.items()}


def _status_mb(field):
    """A memory field of /proc/self/status (kB) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise OSError(f"no {field} in /proc/self/status")


def max_rss_mb():
    """This process's resident-set high-water mark (VmHWM).

    Not getrusage's ru_maxrss: Linux carries that across fork+exec, so a child started by a big parent
    reports the parent's size.
    """
    return _status_mb("VmHWM")


def current_rss_mb():
    """This process's resident set now (VmRSS)."""
    return _status_mb("VmRSS")


CHILD_TAG = "BENCH_CHILD_RESULT "


def child_result(obj):
    """Print a child process's result on one tagged line (what `run_child` parses)."""
    print(CHILD_TAG + json.dumps(obj), flush=True)


def run_child(script, args, timeout=None):
    """Run `python script args...` in a fresh process and return the object it passed to child_result."""
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_TAG):
            return json.loads(line[len(CHILD_TAG):])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
    raise RuntimeError(f"child {Path(script).name} {' '.join(map(str, args))} failed "
                       f"(exit {proc.returncode}):\n{tail}")


def print_table(head, rows):
    """A plain aligned text table (first column left-aligned, the rest right-aligned)."""
    cells = [list(map(str, head))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    for k, r in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def emit(result, as_json, report):
    """--json: the whole `result` as one JSON object on stdout; otherwise call `report(result)`."""
    if as_json:
        print(json.dumps(result, indent=1, sort_keys=True))
    else:
        report(result)


# ------------------------------------------------------------------ the CIFAR supernet, as the engine runs it


def int_list(text):
    return [int(v) for v in text.split(",") if v.strip()]


def add_supernet_args(p):
    """Shape options of the CIFAR supernet, plus --threads and --json (shared by supernet.py, shrink.py)."""
    p.add_argument("--filters", type=int, default=48, help="stage-1 channels (default 48, the paper's)")
    p.add_argument("--stages", type=int_list, default=[8, 8, 8], help="blocks per stage (default 8,8,8)")
    p.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--space", choices=("share", "full"), default="share", help="λ shared or per block")
    p.add_argument("--levels", type=int, default=4, help="levels M of the block (default 4)")
    p.add_argument("--input-size", type=int, default=32, help="square input side (default 32)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS (default: the environment's, else all cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object with every figure")


def supernet_shape_args(args):
    """The options of `add_supernet_args` that fix the network and batch, as a command line."""
    return ["--filters", args.filters, "--stages", ",".join(map(str, args.stages)), "--batch", args.batch,
            "--space", args.space, "--levels", args.levels, "--input-size", args.input_size]


def supernet_config(args):
    from dsonas.config import load_config

    return load_config(overrides=[f"space.kind={args.space}", f"space.levels={args.levels}",
                                  "skeleton.kind=cifar", f"skeleton.filters={args.filters}",
                                  f"skeleton.stages={list(args.stages)}"])


def build_supernet(args, formulation="fast", static_alloc=True, recompute=False):
    """The supernet of `args`, seeded and initialised like dsonas.engine.prepare, hybridized.

    static_alloc (default) and never static_shape: with static_shape=True as well, mxnet 1.9.1 + MKLDNN
    computes wrong gradients for this graph (bench/README.md), at no speed gain. static_alloc=False is a
    plain `hybridize()`: buffers are allocated from the pool on every call, the closest Gluon analogue of
    how the published implementation ran (a symbolic executor without persistent static buffers), and
    what recompute needs (`DsoNet.set_recompute`).
    """
    import mxnet as mx

    from dsonas.network import build_supernet as build

    cfg = supernet_config(args)
    mx.random.seed(0)
    net = build(cfg.space, cfg.skeleton, num_classes=10, input_size=args.input_size, formulation=formulation)
    net.initialize(mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2))
    net.set_recompute(recompute)
    net.hybridize(static_alloc=static_alloc)
    return net


def search_trainers(args, net):
    """(W trainer, λ trainer) with the search stage's optimizers and default hyper-parameters."""
    from dsonas import optim  # noqa: F401  (registers the "apgnag" optimizer)
    from dsonas.loop import make_trainer

    c = supernet_config(args).search
    w_trainer = make_trainer(net.weight_params(), "nag", {"learning_rate": c.lr, "momentum": c.momentum,
                                                          "wd": c.wd})
    lam_trainer = make_trainer(net.lambda_params(), "apgnag",
                               {"learning_rate": c.lambda_lr, "momentum": c.lambda_momentum,
                                "gamma": c.gamma}, update_on_kvstore=False)
    return w_trainer, lam_trainer


def random_batch(args, classes=10):
    """A fixed random (x, y) batch of the benchmark's shape (data loading is not what is measured)."""
    import mxnet as mx

    mx.random.seed(1)
    x = mx.nd.random.normal(shape=(args.batch, 3, args.input_size, args.input_size))
    y = mx.nd.random.randint(0, classes, shape=(args.batch,)).astype("float32")
    return x, y


def train_step_fn(net, trainer, x, y, trained):
    """A callable running one training step as the search loop does, blocking until done.

    trained: the Parameter group whose gradients the step computes (DsoNet.set_trained): "weights" or
    "lambdas" as dsonas.engine.search does, or "all" as the published implementation does (one executor
    computing every gradient every step; the optimizer decides what is updated).
    """
    import mxnet as mx
    from mxnet import gluon

    from dsonas.loop import Meter, train_step

    loss_fn, meter = gluon.loss.SoftmaxCrossEntropyLoss(), Meter()

    def run():
        net.set_trained(trained)
        train_step(net, loss_fn, trainer, [x], [y], meter)
        mx.nd.waitall()
    return run


def step_fns(net, w_trainer, lam_trainer, x, y, every_gradient=False):
    """(W step, λ step) callables of `train_step_fn`; every_gradient: both compute every gradient."""
    groups = ("all", "all") if every_gradient else ("weights", "lambdas")
    return tuple(train_step_fn(net, trainer, x, y, group)
                 for trainer, group in zip((w_trainer, lam_trainer), groups, strict=True))


# ---------------------------------------------------------------------------------------- random masks


def lambda_entries(spec):
    """Every λ entry of one block as (key, index) pairs, in lambda_shapes() order."""
    import numpy as np

    return [(key, idx) for key, shape in spec.lambda_shapes().items() for idx in np.ndindex(*shape)]


def dead_fraction(spec, mask):
    """Fraction of a block's λ entries that are not edges of `mask` (level-1 ops carry no input λ)."""
    live = len(mask.outputs) + sum(len(mask.inputs[o]) for o in range(spec.num_op_slots)
                                   if spec.level_of(o) > 1)
    return 1.0 - live / spec.num_lambdas()


def random_mask(spec, target, rng):
    """(mask, its λ dead fraction): zero λ entries in a random order until derive_mask's mask is that sparse.

    Zeroing more entries only removes edges, so the dead fraction grows with the count: bisect on it.
    """
    import numpy as np

    from dsonas.genotype import BlockMask, derive_mask

    if target <= 0:
        return BlockMask.full(spec), 0.0
    entries = lambda_entries(spec)
    order = rng.permutation(len(entries))

    def mask_with(count):
        lams = {key: np.ones(shape) for key, shape in spec.lambda_shapes().items()}
        for i in order[:count]:
            key, idx = entries[i]
            lams[key][idx] = 0.0
        return derive_mask(spec, lams)

    lo, hi = 0, len(entries)
    while lo < hi:
        mid = (lo + hi) // 2
        if dead_fraction(spec, mask_with(mid)) >= target:
            hi = mid
        else:
            lo = mid + 1
    mask = mask_with(lo)
    return mask, dead_fraction(spec, mask)
