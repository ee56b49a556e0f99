"""Shared by the tests: tiny datasets in the real on-disk layouts, running entry points, tree snapshots."""
import hashlib
import os

from evaluation.runner import run_script as run_python
from utils.synthetic import write_synthetic


def tiny_dataset(path, classes=10, train_per_class=60, test_per_class=20, size=32, layout="png", seed=0):
    if not os.path.isdir(path):
        write_synthetic(str(path), layout=layout, num_classes=classes, train_per_class=train_per_class,
                        test_per_class=test_per_class, size=size, seed=seed)
    return str(path)


def run_script(*argv, timeout=600, env=None):
    """Run an entry point as a user would; returns the CompletedProcess (text)."""
    return run_python(argv, env={"OMP_NUM_THREADS": "2", **(env or {})}, capture_output=True, text=True,
                      timeout=timeout)


def snapshot(path):
    """Every file under `path` with the hash of its bytes (to prove nothing was written or deleted)."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


# the line a CUDA build of torch prints when it runs on the CPU without being told to (utils.dist): said on
# machines like this one whenever a command gives no --device, and beside the point of the tests that run them
CPU_FALLBACK = "warning: running on the CPU: "


def stderr_lines(proc):
    """The non-empty lines of a finished command's stderr, but for the CPU-fallback warning."""
    return [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(CPU_FALLBACK)]


def assert_one_line_error(proc, *words):
    """Exit status 2, no traceback, exactly one line on stderr that names the problem."""
    lines = stderr_lines(proc)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    return lines[0]
