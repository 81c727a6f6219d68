"""The core, imported by every layer and importing none of them (no torch): the typed config (config), the valid
values of options (options), the stage graph (graph: Stage with its Kind, Role and Side), the plan of an experiment
(plan, methods), the content-addressed store that alone knows its folder layout (store), content fingerprints,
paths, the registries users' extensions add to (registry), and the errors users see."""
