"""The three stages as functions of their typed settings: stages.sp.run (stage 1), stages.prune.run (stage 2),
stages.rl.run (stage 3), each returning its metrics. The main_*.py scripts are their command lines; the
search calls them directly."""
