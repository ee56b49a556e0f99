"""Stage 1's command line: its flags are stages/sp.py's settings (SPSettings), what it does is stages.sp.run."""
from stages import sp
from utils.cli import parse
from utils.errors import run_main


def parse_args(argv=None):
    return parse(sp.SPSettings, sp.__doc__, sp.TITLES, argv)


def main(argv=None):
    sp.run(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
