"""One exception type for everything a user can get wrong, and the wrapper that turns it into one line.

Bad input (data dir, config, checkpoint, flags) must end the program with a single line naming the
problem and exit status 2, never a traceback, and before anything in --result_dir is written.
"""
import sys


class UserError(Exception):
    """A problem with what the user gave us (paths, flags, config, checkpoints): reported in one line."""


def run_main(main):
    """Run `main()`; a UserError (or Ctrl-C) becomes one line on stderr and exit status 2 (130)."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
