"""The search of main_search.py (docs/search.md): the original protocol as Optuna studies whose trials are the
real stages."""
