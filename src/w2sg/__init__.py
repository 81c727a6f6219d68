"""w2sg: declarative experiment sweeps for weak-to-strong generalization."""

__version__ = "0.1.0"
