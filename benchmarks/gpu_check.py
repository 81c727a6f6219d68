"""GPU check in one go: the `gpu` tests, a weak->strong experiment on random-initialised decoders of real shapes
(Qwen2.5-0.5B -> Qwen2.5-1.5B, length 512, bf16), and w2sg's training step against a bare torch + transformers bf16
loop on the same model. Prints per stage tokens/s, peak GPU memory and MFU against the bf16 peak. Under 8 minutes
on one H200. Targets (a benchmark, not a test): training >= 0.95x the bare loop; MFU >= 35% for the full finetune
of the 1.5B model at length 512.

The GPU machine has torch, transformers, peft, accelerate, safetensors, pandas, pyarrow and matplotlib but no
network; the other dependencies travel as wheels. Prepare them once, on a machine with PyPI, from the repo root
(omegaconf needs antlr4-python3-runtime, which PyPI has only as a source package: build its wheel first; numpy,
pandas and pyarrow are preinstalled there, so their wheels are dropped to keep the folder small, about 17 MB):

    pip wheel -w gpu_wheels --no-deps 'antlr4-python3-runtime==4.9.3'
    pip download -d gpu_wheels --find-links gpu_wheels --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        'datasets>=2.20' 'hydra-core>=1.3.2,<1.4' 'omegaconf>=2.3,<2.4' hydra-submitit-launcher submitit pytest filelock
    rm gpu_wheels/numpy-* gpu_wheels/pandas-* gpu_wheels/pyarrow-*

Then on the GPU machine, from the repository root (under 8 minutes on one H200; with the device `run` tool of
this project, carry=["gpu_wheels"]):

    pip install -q --no-index --find-links gpu_wheels datasets hydra-core omegaconf hydra-submitit-launcher \
        submitit pytest && PYTHONPATH=src HF_HUB_OFFLINE=1 WANDB_MODE=disabled python benchmarks/gpu_check.py

Here, on the CPU, the same code paths with tiny shapes (bf16 autocast on the CPU; about a minute):

    python benchmarks/gpu_check.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# dense bf16 peak FLOP/s by GPU name (vendor datasheets, without sparsity)
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}
WORDS = [f"w{i}" for i in range(2000)]


def settings(smoke: bool) -> Dict[str, Any]:
    if smoke:
        shrink = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2}
        return {"weak": "qwen2_5_0_5b", "strong": "qwen2_5_1_5b", "shrink": shrink, "length": 64, "n_train": 64,
                "n_test": 32, "batch": 8, "minibatch": 4, "steps": 3, "device": "cpu", "precision": "bf16"}
    return {"weak": "qwen2_5_0_5b", "strong": "qwen2_5_1_5b", "shrink": {}, "length": 512, "n_train": 2048,
            "n_test": 512, "batch": 32, "minibatch": 16, "steps": 20, "device": "cuda", "precision": "bf16"}


def make_tokenizer(folder: Path) -> str:
    """A word-level tokenizer over the synthetic vocabulary (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "good", "bad", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(str(folder))
    return str(folder)


def make_task(path: Path, n: int, words: int) -> None:
    """Long texts (truncated at the sequence length: no padding) whose label is their first word."""
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(n):
            label = i % 2
            text = " ".join([("good", "bad")[label]] + rng.choices(WORDS, k=words))
            f.write(json.dumps({"text": text, "label": label}) + "\n")


def overrides(s: Dict[str, Any], tmp: Path) -> List[str]:
    task = tmp / "task.jsonl"
    make_task(task, s["n_train"] + s["n_test"], s["length"] + 8)
    out = ["train=full", f"weak={s['weak']}", f"strong={s['strong']}", f"store_dir={tmp / 'store'}", "logger=none",
           "progress=false", "task.name=synthetic", "task.dataset=json", f"task.data_files={{train: {task}}}",
           "task.splits={train: train, test: null}", "task.label_column=label",
           "task.label_map=null", "task.balance=false", f"task.n_train={s['n_train']}", f"task.n_test={s['n_test']}",
           "train.epochs=1", f"train.batch_size={s['batch']}", f"train.minibatch_size={s['minibatch']}",
           f"train.max_length={s['length']}", f"train.device={s['device']}", f"train.precision={s['precision']}",
           "train.checkpoint_every=0"]
    return out


def compose_random(s: Dict[str, Any], args: List[str], tokenizer: str, sides=("weak", "strong")):
    """The composed config with random-initialised models of the catalogue's architectures (shrunk for the smoke
    run) on the synthetic tokenizer. Set here, not as overrides: Hydra cannot merge a dict into a null field."""
    from w2sg.app.config import resolve
    from w2sg.app.status import compose

    cfg = resolve(compose(args, conf_dir=ROOT / "conf"))  # the typed config, as the entry makes it
    for side in sides:
        getattr(cfg, side).random_init = dict(s["shrink"])
        getattr(cfg, side).tokenizer = tokenizer
    return cfg


def peak_flops(smoke: bool) -> float:
    if smoke:
        return float("nan")
    import torch

    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAKS.items() if k in name), float("nan"))


def flops_per_token(hf: Any, length: int) -> float:
    """Training FLOPs per token: 6 x non-embedding parameters + 12 x layers x hidden x length (attention)."""
    h, layers = hf.hidden_size, hf.num_hidden_layers
    heads, kv = hf.num_attention_heads, getattr(hf, "num_key_value_heads", hf.num_attention_heads)
    per_layer = h * h * 2 + 2 * h * (h // heads) * kv + 3 * h * hf.intermediate_size
    return 6 * layers * per_layer + 12 * layers * h * length


def memory() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def reset_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def free_gpu() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_tests(smoke: bool) -> int:
    print("== gpu tests (pytest -m gpu)", flush=True)
    args = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_device.py"]
    proc = subprocess.run(args, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")), text=True,
                          capture_output=True)
    tail = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    print("  " + "\n  ".join(tail or [proc.stderr.strip()[-500:]]), flush=True)
    return 0 if proc.returncode in (0, 5) or (smoke and "skipped" in proc.stdout) else proc.returncode


def experiment(s: Dict[str, Any], tmp: Path, tokenizer: str, peak: float) -> None:
    """weak -> strong through the real stages; per stage: seconds, tokens/s, peak memory, MFU."""
    from w2sg.core.plan import plan
    from w2sg.core.store import Store
    from w2sg.ml.models import model_config
    from w2sg.run.runner import Runner

    cfg = compose_random(s, overrides(s, tmp), tokenizer)
    runner = Runner(cfg, Store(cfg.store_dir))
    print(f"== weak->strong: {cfg.weak.name} -> {cfg.strong.name} (random init, train.mode={cfg.train.mode}), "
          f"{runner.policy}", flush=True)
    print(f"  {'stage':<10}{'seconds':>9}{'tokens/s':>12}{'peak GiB':>10}{'MFU':>8}")
    for name, stage in plan(cfg).items():
        reset_memory()
        outcome = runner.run(stage)
        hf = model_config(stage.model)[1]
        fpt = flops_per_token(hf, s["length"])
        if stage.kind == "train":
            part = "weak" if "labels" in stage.inputs else "gt"
            trained = sum(runner.encode(stage.model, part).length(i) for i in range(len(getattr(runner.data, part))))
            predicted = sum(runner.encode(stage.model, "test").length(i) for i in range(len(runner.data.test)))
            flops = fpt * trained + fpt / 3 * predicted
        else:
            trained, predicted = 0, sum(runner.encode(stage.model, "weak").length(i)
                                        for i in range(len(runner.data.weak)))
            flops = fpt / 3 * predicted
        tokens = trained + predicted
        mfu = flops / outcome.seconds / peak
        print(f"  {name:<10}{outcome.seconds:>9.1f}{tokens / outcome.seconds:>12.0f}{memory():>10.1f}{mfu:>8.1%}",
              flush=True)
    print(f"  acc: {json.dumps({k: round(runner.outcomes[v.key].metrics['acc'], 3) for k, v in plan(cfg).items() if k != 'weak_labels'})}")


def step_benchmark(s: Dict[str, Any], tokenizer: str, peak: float) -> None:
    """The same full-finetuning steps of the strong model: w2sg's train_model vs a bare autocast loop."""
    import numpy as np
    import torch

    from w2sg.ml.losses import make_loss
    from w2sg.ml.models import build_model, model_config
    from w2sg.ml.train import Encoded, train_model
    from w2sg.run.device import runtime_policy

    cfg = compose_random(s, [f"strong={s['strong']}", f"train.device={s['device']}",
                             f"train.precision={s['precision']}"], tokenizer, sides=("strong",))
    policy = runtime_policy(cfg.train)
    hf = model_config(cfg.strong)[1]
    model = build_model(cfg.strong, 2, 0, policy=policy, trainable=True)
    n = s["steps"] * s["batch"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (n, s["length"]), generator=g)
    labels = np.eye(2, dtype=np.float32)[(ids[:, 0] % 2).numpy()]
    data = Encoded([r.tolist() for r in ids])
    xent = make_loss({"name": "xent"})

    def sync() -> None:
        if policy.device == "cuda":
            torch.cuda.synchronize()

    def w2sg_loop() -> None:
        train_model(model, data, labels, xent, epochs=1, batch_size=s["batch"], minibatch_size=s["minibatch"],
                    lr=1e-5, pad_id=0, seed=0, progress=False, policy=policy)

    def bare_loop() -> None:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        x, y = ids.to(policy.input_device), torch.as_tensor(labels).to(policy.input_device)
        mask = torch.ones_like(x)
        model.train()
        for step in range(s["steps"]):
            opt.zero_grad(set_to_none=True)
            for start in range(step * s["batch"], (step + 1) * s["batch"], s["minibatch"]):
                sl = slice(start, start + s["minibatch"])
                with torch.autocast(policy.device, dtype=policy.dtype, enabled=policy.precision != "fp32"):
                    logits = model(x[sl], mask[sl])
                loss = torch.nn.functional.cross_entropy(logits.float(), y[sl]) * (s["minibatch"] / s["batch"])
                loss.backward()
            opt.step()

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    timed(bare_loop)  # warm-up: kernels, allocator
    reset_memory()
    times = {"w2sg": [], "bare": []}
    for _ in range(2):
        times["w2sg"].append(timed(w2sg_loop))
        times["bare"].append(timed(bare_loop))
    tokens = n * s["length"]
    fpt = flops_per_token(hf, s["length"])
    print(f"== training step, full finetune of {s['strong']} (random init), {policy.precision}, batch {s['batch']} "
          f"(minibatch {s['minibatch']}) x length {s['length']}, {s['steps']} steps; peak {memory():.1f} GiB")
    for name, t in times.items():
        best = min(t)
        print(f"  {name:<6}{tokens / best:>12.0f} tokens/s   MFU {fpt * tokens / best / peak:.1%}")
    ratio = min(times["bare"]) / min(times["w2sg"])
    print(f"  w2sg / bare throughput: {ratio:.3f}x (target >= 0.95)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (bf16 autocast): code paths only")
    ap.add_argument("--skip-tests", action="store_true", help="skip the gpu-marked tests")
    args = ap.parse_args()
    smoke = args.cpu_smoke
    if not smoke:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA GPU: run with --cpu-smoke for the code paths on the CPU", file=sys.stderr)
            return 2
    start = time.perf_counter()
    rc = 0 if args.skip_tests else run_tests(smoke)
    s = settings(smoke)
    peak = peak_flops(smoke)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_tokenizer(Path(tmp) / "tokenizer")
        experiment(s, Path(tmp), tokenizer, peak)
        free_gpu()
        step_benchmark(s, tokenizer, peak)
    print(f"== done in {time.perf_counter() - start:.0f} s; gpu tests {'passed' if rc == 0 else 'FAILED'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
