"""dsonas.openmp: the calling thread's OpenMP team becomes serial, threads started later keep
OMP_NUM_THREADS (MXNet's engine threads do the work)."""

import os
import subprocess
import sys

SCRIPT = """
import ctypes, threading
from dsonas.openmp import serial_main_thread
libgomp = ctypes.CDLL("libgomp.so.1")
before = libgomp.omp_get_max_threads()
assert serial_main_thread()
other = []
t = threading.Thread(target=lambda: other.append(libgomp.omp_get_max_threads()))
t.start(); t.join()
import mxnet as mx
x = mx.nd.ones((256, 256))
mx.nd.dot(x, x).wait_to_read()
print(before, libgomp.omp_get_max_threads(), other[0])
"""


def test_serial_main_thread_leaves_other_threads_their_count():
    env_threads = "3"
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS=env_threads))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [env_threads, "1", env_threads]
