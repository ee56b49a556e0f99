"""UserError, for everything a user can get wrong, and run_main, which says one in one line, never a traceback."""
import contextlib
import os
import sys


class UserError(Exception):
    """A problem with what the user gave us (paths, flags, config, checkpoints): reported in one line."""


def _why(e):
    """The operating system's reason for OSError `e`, in words (one line)."""
    return " ".join(str(e.strerror or str(e) or type(e).__name__).split())


def write_error(path, e):
    """UserError for OSError `e` (disk full, no permission, a name too long ...) raised while writing `path`."""
    why = _why(e)
    if isinstance(e, FileExistsError) and isinstance(e.filename, str) and not os.path.isdir(e.filename):
        why = "Not a directory"  # os.makedirs over a regular file says "File exists"
    # the file the OS named, unless it is `path` or its temporary copy beside it (said already)
    other = isinstance(e.filename, str) and \
        os.path.dirname(os.path.abspath(e.filename)) != os.path.dirname(os.path.abspath(path))
    return UserError(f"cannot write {path}: {why}" + (f" ({e.filename})" if other else ""))


def _abandon_process_group():
    """Destroy a process group an error left open without waiting for the other ranks (they may never come):
    gloo's threads alive at interpreter shutdown would abort the process (SIGABRT), hiding its status and line."""
    dist = sys.modules.get("torch.distributed")  # only if the program imported it: nothing to import here
    if dist is not None and dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # already broken: exiting is all that is left
            dist.destroy_process_group()


def _exit_if_one_of_several():
    """A finished process of a torchrun job exits here, output flushed, skipping the interpreter's finalization:
    objects that held gloo work (DDP's reducer) torn down in it can abort a run that wrote everything (SIGABRT)."""
    try:
        several = int(os.environ.get("WORLD_SIZE") or 1) > 1
    except ValueError:  # not set by torchrun: not one of several
        several = False
    if several:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _leave(status, line):
    """Exit with `status` after `line` on stderr. A stream whose reader is gone (`| tee` after Ctrl-C) is pointed
    at /dev/null: a failing write or last flush would replace the status with 1."""
    for stream, text in ((sys.stdout, ""), (sys.stderr, line + "\n")):
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # a broken pipe, or a stream already closed
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, stream.fileno())
                os.close(devnull)
    sys.exit(status)


def run_main(main):
    """Run `main()`; a UserError or an OSError (or Ctrl-C) becomes one line on stderr and exit status 2 (130)."""
    try:
        try:
            main()
        finally:
            _abandon_process_group()
        _exit_if_one_of_several()
    except UserError as e:
        _leave(2, f"error: {e}")
    except OSError as e:  # one the code did not wrap (a full disk under TensorBoard's writer ...): still one line
        _leave(2, f"error: {_why(e)}" + (f": {e.filename}" if e.filename else ""))
    except KeyboardInterrupt:
        _leave(130, "interrupted")
