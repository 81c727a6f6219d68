"""Results: reading runs and stores into one row per experiment, statistics (bootstrap CIs, paired tests),
diagnostics (misfit), plots, the anchors' published numbers, and ``w2sg report``. Imports core alone (no torch:
a report reads stored arrays)."""
