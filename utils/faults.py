"""Fault injection for tests: a process kills itself (SIGKILL, as the OOM killer or a pre-empted job would)
at a named, deterministic point, so that crash-and-resume tests never race the clock.

    DYNPRUNE_KILL_AT="step:2:3"    in the training loop, epoch 2, before step 3's update (1-based)
    DYNPRUNE_KILL_AT="saved:2"     right after the checkpoint of epoch 2 is on disk
    DYNPRUNE_KILL_AT="bn:5"        re-estimating BatchNorm statistics, before batch 5 (1-based)
    DYNPRUNE_KILL_AT="decode:1"    under torchrun, the process of local rank 1 as it starts decoding the images
    DYNPRUNE_KILL_AT="trial:3:saved:1"  main_search.py: that point within the 3rd trial the process runs

The point names and numbers are those of the calls to `kill_point` below; with the variable unset (every
normal run) a call costs one dictionary lookup.
"""
import contextlib
import os
import signal

ENV = "DYNPRUNE_KILL_AT"


def kill_point(name, *where):
    """SIGKILL this process if DYNPRUNE_KILL_AT names this point, e.g. kill_point("step", 2, 3)."""
    spec = os.environ.get(ENV)
    if spec and spec == ":".join([name, *map(str, where)]):
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def scoped(name, *where):
    """Within this block DYNPRUNE_KILL_AT="<name>:<where>:<point>" acts as "<point>": e.g. "trial:2:saved:1"
    kills right after the epoch-1 checkpoint of the second trial a search process runs (one process runs
    many stages, each with its own "saved:1")."""
    spec, prefix = os.environ.get(ENV), ":".join([name, *map(str, where)]) + ":"
    if not spec or not spec.startswith(prefix):
        yield
        return
    os.environ[ENV] = spec[len(prefix):]
    try:
        yield
    finally:
        os.environ[ENV] = spec
