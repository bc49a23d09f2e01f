"""Atomic file writes: a crash or a bad input never leaves a half-written file behind."""

import contextlib
import json
import os
import tempfile


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def replacing(path):
    """Yield a temp file name in `path`'s folder; on success it is renamed over `path`, else removed.

    The temp file gets the permissions a plain `open` would give (mkstemp makes it 0600, which would
    leave every result file private to its writer).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def new_folder(parent, prefix):
    """A fresh, uniquely named folder in `parent` with the permissions `os.mkdir` would give (mkdtemp
    makes it 0700), for results assembled out of sight and then renamed into place."""
    path = tempfile.mkdtemp(dir=parent, prefix=prefix)
    os.chmod(path, 0o777 & ~_umask())
    return path


def atomic_write_bytes(path, data):
    """Write `data` to a temp file in the same folder, then rename it over `path`."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_ndarrays(path, arrays):
    """`mx.nd.save` a dict of NDArrays atomically (mxnet writes by file name, so save to a temp name)."""
    import mxnet as mx

    with replacing(path) as tmp:
        mx.nd.save(tmp, arrays)
