"""Start a local dist_sync cluster on this machine: a scheduler, S servers and N workers on loopback.

    python tools/launch.py -n 2 -s 1 -- python tools/search.py --kvstore dist_sync --name dist2
    python tools/launch.py -n 2 --timeout 600 -- python my_worker.py

Every process gets the ps-lite environment MXNet reads (DMLC_ROLE, DMLC_PS_ROOT_URI=127.0.0.1,
DMLC_PS_ROOT_PORT=<free port>, DMLC_NUM_SERVER, DMLC_NUM_WORKER; workers also DMLC_WORKER_ID, for
logs only: ps-lite assigns ranks itself). Scheduler and servers are `python -c "import mxnet"`: importing
mxnet with DMLC_ROLE=server|scheduler runs the ps-lite loop and exits when the workers finish.

Each process runs in its own process group; on exit, timeout, Ctrl-C or SIGTERM every group still alive
is terminated (then killed), so no orphans stay behind. Exit code: the worst one of the workers
(a non-zero code wins, signals count as 128+n), 124 on timeout. Scheduler/server failures count too.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

SERVE = [sys.executable, "-c", "import mxnet"]


def free_port():
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_code(returncode):
    return 128 - returncode if returncode < 0 else returncode


class Cluster:
    """The processes of one local cluster; `stop` ends every one still running."""

    def __init__(self, command, workers, servers, port, env=None):
        base = dict(os.environ if env is None else env)
        base.update({"DMLC_PS_ROOT_URI": "127.0.0.1", "DMLC_PS_ROOT_PORT": str(port),
                     "DMLC_NUM_SERVER": str(servers), "DMLC_NUM_WORKER": str(workers)})
        self.procs = []  # (role, Popen)
        self._start("scheduler", SERVE, base)
        for _ in range(servers):
            self._start("server", SERVE, base)
        for i in range(workers):
            self._start("worker", command, {**base, "DMLC_WORKER_ID": str(i)})

    def _start(self, role, command, env):
        env = {**env, "DMLC_ROLE": role}
        self.procs.append((role, subprocess.Popen(command, env=env, start_new_session=True)))

    def wait(self, timeout):
        """Wait for every process; returns the worst exit code, 124 if `timeout` seconds pass first."""
        deadline = time.monotonic() + timeout if timeout else None
        worst = 0
        while True:
            running = False
            for _role, proc in self.procs:
                code = proc.poll()
                if code is None:
                    running = True
                elif code:
                    worst = max(worst, exit_code(code))
            if worst and any(r == "worker" and p.poll() is not None for r, p in self.procs):
                return worst  # a failed process never lets the others finish: stop now
            if not running:
                return worst
            if deadline is not None and time.monotonic() > deadline:
                print(f"launch: timeout after {timeout} s", file=sys.stderr)
                return 124
            time.sleep(0.1)

    def stop(self, grace=5.0):
        """SIGTERM every live process group, SIGKILL what is left after `grace` seconds."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            live = [p for _, p in self.procs if p.poll() is None]
            for p in live:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + grace
            while any(p.poll() is None for p in live) and time.monotonic() < end:
                time.sleep(0.05)
        for _, p in self.procs:
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--num-workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("-s", "--num-servers", type=int, default=1, help="server processes (default 1)")
    p.add_argument("--port", type=int, help="scheduler port (default: a free one)")
    p.add_argument("--timeout", type=float, default=0, help="stop everything after this many seconds")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the worker command")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the worker command after --")
    if args.num_workers < 1 or args.num_servers < 1:
        p.error("need at least one worker and one server")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    cluster = Cluster(command, args.num_workers, args.num_servers, args.port or free_port())
    try:
        code = cluster.wait(args.timeout)
    except KeyboardInterrupt:
        code = 130
    finally:
        cluster.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
