"""Atomic writes (a file is replaced whole or not at all), and the JSON reader beside them."""
import contextlib
import json
import os
import tempfile

from utils.errors import write_error


def current_umask():
    """The process's umask, read from /proc/self/status on Linux; elsewhere set and restored through 0o077, so
    that a file another thread creates in between is only ever more private."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def atomic_write(path, write, binary=False, tmp_prefix=None):
    """Call write(f) on a temporary file beside `path`, flush it to disk, then rename it over `path` with open()'s
    mode (docs/robustness.md). Earlier killed writers' temporary files (`tmp_prefix`, default ".tmp-<name>-")
    are removed first (one writer per file). An OSError, also one the writer wraps, is a UserError naming `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    prefix = tmp_prefix or f".tmp-{os.path.basename(path)}-"
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        for stale in os.listdir(directory):
            if stale.startswith(prefix):
                os.unlink(os.path.join(directory, stale))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # never a half-written file beside the good one
        cause = os_error(e)
        if cause is not None:
            raise write_error(path, cause) from None
        raise


def os_error(e):
    """The OSError behind `e`: itself, or the one a RuntimeError was raised over (torch.save's zip writer
    turns its file's OSError, a full disk, EFBIG or EIO, into "RuntimeError: ... unexpected pos"); else None."""
    for _ in range(8):
        if isinstance(e, OSError):
            return e
        if not isinstance(e, RuntimeError):
            return None
        e = e.__cause__ or e.__context__
    return None


def write_json(path, data):
    """Atomic JSON write (atomic_write): a killed process never leaves half a metrics file."""
    def write(f):
        json.dump(data, f, indent=2)
        f.write("\n")
    atomic_write(path, write)


def read_json(path):
    with open(path) as f:
        return json.load(f)
