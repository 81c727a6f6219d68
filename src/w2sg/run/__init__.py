"""Execution: the runner that computes stages through the store (runner), the body of each stage kind (bodies),
one experiment from plan to metrics.json (experiment), W&B tracking, and the device/precision policy's
decision (device). Imports ml, data, results and core; never app."""
