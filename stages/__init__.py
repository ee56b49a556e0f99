"""The three stages as functions of their typed settings (docs/layout.md); the main_*.py scripts are their command
lines, and the search calls them directly."""
