"""Models and learning, torch only and no config objects: the training loop and checkpoints (train), models, heads
and LoRA (models), poolings, losses, weak-label methods (methods, numpy), generative finetuning, metrics, and how
a policy places models and batches on a device (device). Imports only core."""
