"""What every tool shares: thread set-up, common options, config resolution, error handling.

Tools run as `python tools/<tool>.py`, so this folder is on sys.path and they `from common import ...`.
This module must not import mxnet: OpenMP reads OMP_NUM_THREADS once, when libmxnet loads, so a tool
resolves its config, calls `setup_threads`, and only then imports the modules that pull in mxnet:

    def main(argv=None):
        parser = argparse.ArgumentParser(description=...)
        add_common_args(parser)
        args = parser.parse_args(argv)
        cfg = resolve_config(args)
        setup_threads(cfg.runtime.threads)
        from dsonas import engine  # imports mxnet
        ...

    if __name__ == "__main__":
        run_tool(main)
"""

import argparse
import logging
import os
import sys
from pathlib import Path

from tqdm import tqdm

# Tools also work from a plain checkout (no `pip install -e .`): the package sits next to tools/.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from dsonas.config import SHUFFLE_CONFIG, load_config  # noqa: E402  (needs the path above)
from dsonas.errors import ConfigError, DsonasError  # noqa: E402
from dsonas.malloc import single_arena  # noqa: E402
from dsonas.openmp import serial_main_thread  # noqa: E402

SUPPORTED_PYTHON = (3, 11)
_SUFFIXES = {"k": 1e3, "M": 1e6, "G": 1e9}


def amount(text):
    """argparse type for budgets: '300M', '1.5G', '450k' or a plain positive number -> float."""
    scale = _SUFFIXES.get(text[-1:], 1.0)
    try:
        value = float(text[:-1] if text[-1:] in _SUFFIXES else text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 300M, 1.5G or 450k, got {text!r}"
                                         ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value * scale


def setup_threads(threads=None):
    """Give OpenMP (and so MXNet) a thread count before mxnet is imported; returns the count in force.

    MXNet halves omp_get_num_procs() when OMP_NUM_THREADS is unset (1 thread on a 2-core machine, 1.5-1.9x
    slower). Order: an explicit `threads` (runtime.threads), else the user's OMP_NUM_THREADS, else every
    core this process may use. The tool's own thread gets a serial OpenMP team (dsonas.openmp): MXNet's
    engine threads do the work. glibc gets one malloc arena for every thread (dsonas.malloc), before
    those threads exist.
    """
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    elif not os.environ.get("OMP_NUM_THREADS"):
        os.environ["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)))
    serial_main_thread()
    single_arena()
    if "mxnet" in sys.modules:
        logging.getLogger("dsonas").warning(
            "mxnet was imported before setup_threads(); OMP_NUM_THREADS=%s and the single malloc arena "
            "may not take effect (engine threads that already allocated keep their own arenas)",
            os.environ["OMP_NUM_THREADS"])
    return int(os.environ["OMP_NUM_THREADS"])


def check_python():
    """MXNet 1.9.1 needs numpy < 1.24, which has no wheels for Python > 3.11: fail early and say so."""
    if sys.version_info[:2] != SUPPORTED_PYTHON:
        raise DsonasError(f"dsonas needs Python 3.11 (found {sys.version.split()[0]}): mxnet 1.9.1 needs "
                          f"numpy < 1.24, which has no wheels for newer Pythons; create the venv with "
                          f"python3.11")


class TqdmLogHandler(logging.Handler):
    """Log lines printed through tqdm.write, so they do not tear the progress bars apart."""

    def emit(self, record):
        tqdm.write(self.format(record), file=sys.stderr)


def run_tool(main):
    """Run a tool's main(): a DsonasError becomes one line "error: <msg>" and exit code 2, Ctrl-C exit 130."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[TqdmLogHandler()])
    try:
        check_python()
        code = main()
    except DsonasError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def add_common_args(parser):
    """Options shared by every tool; `resolve_config` turns them into a Config."""
    g = parser.add_argument_group("config and run folder")
    g.add_argument("--config", metavar="YAML", help="config file (default: configs/default.yaml, or "
                                                    "configs/shuffle_default.yaml with --space shuffle)")
    g.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="set",
                   help="override one config key, e.g. --set search.gamma=0.001 (repeatable)")
    g.add_argument("--out", default="runs", metavar="DIR", help="parent of the run folders (default: runs)")
    g.add_argument("--name", help="run folder name (default: the config's name)")
    g.add_argument("--resume", action="store_true", help="continue runs/<name> from its checkpoint")
    g.add_argument("--force", action="store_true", help="delete an existing runs/<name> and start over")
    g = parser.add_argument_group("devices and data")
    g.add_argument("--ctx", metavar="LIST", help="devices, comma separated: cpu or gpu(0),gpu(1)")
    g.add_argument("--gpus", metavar="IDS", help="GPU ids, comma separated (shortcut for --ctx gpu(0),...)")
    g.add_argument("--kvstore", help="MXNet kvstore: device, local, nccl, dist_sync, ...")
    g.add_argument("--data", metavar="SOURCE", help="data source: digits, cifar10, npz, folder, imagenet_rec")
    g.add_argument("--data-root", metavar="PATH", help="folder or file with the data (data.root)")


def resolve_config(args):
    """Load --config, apply the CLI shortcuts, then every --set (which win), and validate.

    Without --config, `--space shuffle` starts from configs/shuffle_default.yaml: the default config's
    cifar skeleton cannot hold the shuffle space.
    """
    config = getattr(args, "config", None)
    if config is None and getattr(args, "space", None) == "shuffle":
        config = SHUFFLE_CONFIG
    values = {}
    shortcuts = (("space", "space.kind"), ("data", "data.source"), ("data_root", "data.root"),
                 ("name", "name"), ("kvstore", "runtime.kvstore"))
    for attr, key in shortcuts:
        value = getattr(args, attr, None)
        if value is not None:
            values[key] = value
    ctx, gpus = getattr(args, "ctx", None), getattr(args, "gpus", None)
    if ctx and gpus:
        raise ConfigError("--ctx and --gpus both pick devices; pass only one of them")
    if ctx:
        values["runtime.ctx"] = [c.strip() for c in ctx.split(",") if c.strip()]
    if gpus:
        ids = [g.strip() for g in gpus.split(",") if g.strip()]
        if not all(g.isdigit() for g in ids):
            raise ConfigError(f"--gpus {gpus!r}: expected comma-separated GPU ids such as 0,1")
        values["runtime.ctx"] = [f"gpu({g})" for g in ids]
    return load_config(config, getattr(args, "set", ()) or (), values=values)
