"""w2sg: declarative experiment sweeps for weak-to-strong generalization."""

from w2sg.app import run_id as _run_id

__version__ = "0.1.0"

_run_id.register()  # ${w2sg.run_id:} in conf/config.yaml's run and sweep folders, wherever w2sg is imported
