"""Keep the Python thread's own OpenMP regions serial, so MXNet's engine threads keep spin-waiting.

MXNet runs operators on its engine's worker threads, each with an OpenMP team of OMP_NUM_THREADS. When
the Python thread itself runs a oneDNN primitive (reading back an array that oneDNN reordered in place,
e.g. asnumpy() of weights after an imperative inference call), libgomp gives that thread a team as well.
With more OpenMP threads than cores, libgomp stops spin-waiting between parallel regions (its "throttled"
spin count), and every region of an op-heavy net then pays a sleep and wake-up: measured 12 -> 65 ms per
batch-1 call of a derived net, in every net of the process, from then on (bench/README.md). A serial
team for the Python thread never adds threads; the engine's teams keep OMP_NUM_THREADS.

This module does not import mxnet: `tools/common.setup_threads` calls it before mxnet loads.
"""

import ctypes


def serial_main_thread():
    """omp_set_num_threads(1) for the calling thread, in the libgomp MXNet links; False without libgomp."""
    try:
        libgomp = ctypes.CDLL("libgomp.so.1")
    except OSError:
        return False
    libgomp.omp_set_num_threads(1)
    return True
