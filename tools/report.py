"""Re-create the report of a run folder: plots (PNG) and report.md in <run>/report/.

    python tools/report.py runs/default

See dsonas/report.py for what each plot shows and which metrics keys it reads.
"""

import argparse

from common import run_tool, setup_threads


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by tools/search.py (or retrain)")
    p.add_argument("--threads", type=int, help="OpenMP threads (default: OMP_NUM_THREADS or all cores)")
    args = p.parse_args(argv)
    setup_threads(args.threads)
    from dsonas.report import build_report  # imports mxnet when it counts the genotype

    files = build_report(args.run_dir)
    for path in files.values():
        print(path)


if __name__ == "__main__":
    run_tool(main)
