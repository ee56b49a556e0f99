"""The evaluation of what static pruning and the switches give: the cross-fitting (crossfit) and its
statistics (stats), the task runner (runner), the digits datasets (digits), the CPU study (study), stage 3's
controllers compared (controllers, flip_blocks), fixed routes (routes) and the diagnostics of routes
(fixed_route, routes_by_difficulty, switch_probs). Each command is a module: `python -m evaluation.<name>`
from the repository root."""
