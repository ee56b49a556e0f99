"""The stage runtime: what runs a stage's training around its own algorithm (its modules: docs/layout.md)."""
