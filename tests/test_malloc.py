"""dsonas.malloc: after single_arena(), threads that allocate at the same time share glibc's one arena."""

import subprocess
import sys

SCRIPT = """
import ctypes, os, sys, tempfile, threading
from dsonas.malloc import single_arena
if sys.argv[1] == "single":
    assert single_arena()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.fopen.restype = ctypes.c_void_p
together = threading.Barrier(4)

def allocate():
    together.wait()  # all four allocate while the others hold their memory
    block = libc.malloc(1 << 16)
    together.wait()
    libc.free(ctypes.c_void_p(block))

threads = [threading.Thread(target=allocate) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
fd, path = tempfile.mkstemp()
os.close(fd)
stream = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(stream))
libc.fclose(ctypes.c_void_p(stream))
print(open(path).read().count("<heap nr="))
os.remove(path)
"""


def arenas(mode):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout)


def test_single_arena_serves_every_thread():
    assert arenas("default") > 1  # the control: without it, concurrent threads get arenas of their own
    assert arenas("single") == 1
