"""Fault injection for tests: a process kills itself (SIGKILL, as the OOM killer or a pre-empted job would)
at a named, deterministic point, so that crash-and-resume tests never race the clock.

    DYNPRUNE_KILL_AT="step:2:3"    in the training loop, epoch 2, before step 3's update (1-based)
    DYNPRUNE_KILL_AT="saved:2"     right after the checkpoint of epoch 2 is on disk
    DYNPRUNE_KILL_AT="bn:5"        re-estimating BatchNorm statistics, before batch 5 (1-based)
    DYNPRUNE_KILL_AT="decode:1"    under torchrun, the process of local rank 1 as it starts decoding the images
    DYNPRUNE_KILL_AT="trial:3:saved:1"  main_search.py: that point within the 3rd trial the process runs

With DYNPRUNE_KILL_SIGNAL=SIGINT the point sends SIGINT to its whole process group instead, as Ctrl-C does to
a pipeline (`python main_sp.py ... | tee log`; start such a job in a session of its own), and raises
KeyboardInterrupt once every pipe it writes to has lost its reader, so a test sees that order every time.
"""
import contextlib
import os
import select
import signal
import stat
import time

ENV = "DYNPRUNE_KILL_AT"
SIGNAL_ENV = "DYNPRUNE_KILL_SIGNAL"


def kill_point(name, *where):
    """SIGKILL this process if DYNPRUNE_KILL_AT names this point, e.g. kill_point("step", 2, 3)."""
    spec = os.environ.get(ENV)
    if spec and spec == ":".join([name, *map(str, where)]):
        if os.environ.get(SIGNAL_ENV) == "SIGINT":
            interrupt_pipeline()
        else:
            os.kill(os.getpid(), signal.SIGKILL)


def interrupt_pipeline(wait_s=60):
    """Ctrl-C to this process's group, handled here once the readers of stdout / stderr that are pipes have
    exited (poll reports POLLERR on a pipe's writing end without readers; at most `wait_s` seconds)."""
    before = signal.signal(signal.SIGINT, lambda *_: None)  # this process's own Ctrl-C is the raise below
    try:
        os.killpg(os.getpgrp(), signal.SIGINT)
        poller, pipes = select.poll(), set()
        for fd in (1, 2):
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                poller.register(fd, select.POLLERR)
                pipes.add(fd)
        deadline = time.monotonic() + wait_s
        while pipes and time.monotonic() < deadline:
            for fd, _ in poller.poll(100):
                poller.unregister(fd)
                pipes.discard(fd)
    finally:
        signal.signal(signal.SIGINT, before)
    raise KeyboardInterrupt


@contextlib.contextmanager
def scoped(name, *where):
    """Within this block DYNPRUNE_KILL_AT="<name>:<where>:<point>" acts as "<point>": "trial:2:saved:1" is "saved:1"
    of the second trial a search process runs (one process runs many stages, each with its own "saved:1")."""
    spec, prefix = os.environ.get(ENV), ":".join([name, *map(str, where)]) + ":"
    if not spec or not spec.startswith(prefix):
        yield
        return
    os.environ[ENV] = spec[len(prefix):]
    try:
        yield
    finally:
        os.environ[ENV] = spec
