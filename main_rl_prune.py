"""Stage 3's command line: its flags are stages/rl.py's settings (RLSettings), what it does is stages.rl.run."""
from stages import rl
from utils.cli import parse
from utils.errors import run_main


def parse_args(argv=None):
    return parse(rl.RLSettings, rl.__doc__, rl.TITLES, argv)


def main(argv=None):
    rl.run(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
