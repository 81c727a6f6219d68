"""The hub catalogue's derived fields, generated from each model's architecture so that nothing is typed by hand.

    python tools/catalogue.py            # rewrite params, lora_lr and memory_gb in conf/model/*.yaml
    python tools/catalogue.py --check    # exit 1 (and say which) when a file differs from what is generated

One source, each model file's ``arch`` (the architecture fields of its transformers config) and ``path``; derived:

- ``params``: the backbone built on the meta device (nothing allocated) plus a 2-class head (hidden x 2 + 2);
- ``memory_gb``: w2sg.run.device.stage_estimate in bf16 at minibatch 8 x length 512 (LoRA: rank 8 on the
  family's targets), in GiB, for inference, lora and full finetuning;
- ``lora_lr``: log-linear in size between EleutherAI/w2s's 5e-4 (0.5B) and 8e-5 (8B), 5e-4 at most, two
  significant figures: 5e-4 x 0.16 ** (log(params / 0.5e9) / log 16).

What each family's files share is said once, in conf/model/README.md. tests/test_catalogue.py runs ``--check``.
An architecture the installed transformers lacks (e.g. qwen3 before 4.51) is skipped with a note.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "conf" / "model"


def catalogue(folder: Path = MODELS) -> List[Path]:
    """The hub catalogue's files: models with an architecture that are neither random stand-ins nor weights from a
    Python package (pkg://, e.g. smollm2_135m: tests/test_catalogue.py checks its fields where the package is
    installed)."""
    return sorted(p for p in folder.glob("*.yaml") if "\narch:" in p.read_text() and "random_init" not in p.read_text()
                  and "\npath: pkg://" not in p.read_text())


def lora_lr(params: int) -> float:
    value = min(5e-4, 5e-4 * 0.16 ** (math.log(params / 0.5e9) / math.log(16)))
    return float(f"{value:.2g}")


def derived(path: Path) -> Optional[Dict[str, str]]:
    """The generated lines of one model file (field -> YAML value text), None when its architecture cannot be
    built here."""
    from transformers import AutoModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import compose  # the composed model config, as a run sees it

    import torch

    from w2sg.ml.models import arch_config, count_params, hidden_size
    from w2sg.run.device import GIB, stage_estimate

    cfg = compose([f"weak={path.stem}"]).weak
    if cfg.arch["model_type"] not in CONFIG_MAPPING:
        print(f"{path.name}: skipped, transformers has no {cfg.arch['model_type']} architecture", file=sys.stderr)
        return None
    with torch.device("meta"):
        backbone = AutoModel.from_config(arch_config(cfg.arch))
    params = count_params(backbone) + hidden_size(backbone.config) * 2 + 2
    cfg.params = params
    gb = {mode: round(sum(stage_estimate(cfg, mode, 8, 512, "bf16").values()) / GIB, 1)
          for mode in ("inference", "lora", "full")}
    return {"params": str(params), "lora_lr": f"{lora_lr(params):g}",
            "memory_gb": "{" + ", ".join(f"{k}: {v}" for k, v in gb.items()) + "}"}


def rewrite(text: str, fields: Dict[str, str]) -> str:
    """``text`` with each field's value replaced (its line's comment kept)."""
    for name, value in fields.items():
        pattern = re.compile(rf"^{name}: [^#\n]*?(\s*(#.*)?)$", re.M)
        if not pattern.search(text):
            raise SystemExit(f"no '{name}:' line to rewrite")
        text = pattern.sub(lambda m: f"{name}: {value}{m.group(1)}", text, count=1)
    return text


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/catalogue.py", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report files that differ, change nothing")
    args = parser.parse_args(argv)
    stale = []
    for path in catalogue():
        fields = derived(path)
        if fields is None:
            continue
        text = path.read_text()
        new = rewrite(text, fields)
        if new != text:
            stale.append(path.name)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run python tools/catalogue.py", file=sys.stderr)
        return 1
    print(f"{'up to date' if not stale else 'rewrote ' + ', '.join(stale)} ({len(catalogue())} catalogue models)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
