"""w2sg: declarative experiment sweeps for weak-to-strong generalization.

Importing it imports nothing heavy (no OmegaConf, Hydra, numpy, torch): ``w2sg status`` starts fast. The
``${w2sg.run_id:}`` resolver is registered where configs are composed (w2sg.app.run_id).
"""

__version__ = "0.1.0"
