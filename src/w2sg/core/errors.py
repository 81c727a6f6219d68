"""The one exception type for user-facing problems: its message names the bad value and the valid ones."""


class W2SGError(Exception):
    """A problem with the user's input (config, data, model path) or a run that cannot go on (NaN loss)."""
