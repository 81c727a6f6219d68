"""The application layer, the only one that knows Hydra and the command line: the ``w2sg`` entrypoint and its
subcommands (cli), config composition, friendly errors and the typed config (config), ``w2sg status`` / ``w2sg gc``.
It may import every layer below it: run, ml, data, results, core."""
