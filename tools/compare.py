"""Search, retrain and random-baseline runs side by side: cost, test accuracy, time, ablation settings.

    python tools/compare.py runs/default runs/random runs/retrain-default runs/retrain-random-0
    python tools/compare.py runs/* --csv > results.csv

One row per search or retrain run and per genotype of a random run. A retrain run whose genotype came
from a search or random run given on the same command line names it under "from" and inherits its
search time and settings (split training, pre-training epochs, W:λ ratio, penalty).
"""

import argparse

from common import run_tool, setup_threads


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_const", const="json", dest="fmt", help="JSON list of rows")
    fmt.add_argument("--csv", action="store_const", const="csv", dest="fmt", help="CSV with a header row")
    p.add_argument("--threads", type=int, help="OpenMP threads (default: OMP_NUM_THREADS or all cores)")
    args = p.parse_args(argv)
    setup_threads(args.threads)
    from dsonas.report import compare_rows, format_table  # may import mxnet to count a genotype

    print(format_table(compare_rows(args.runs), args.fmt or "text"))
    if not args.fmt:
        print("params / MACs of the derived net for one image (FLOPs = 2 x MACs); acc = test accuracy "
              "(retrain: best and last epoch; search: supernet after search); s = seconds")


if __name__ == "__main__":
    run_tool(main)
