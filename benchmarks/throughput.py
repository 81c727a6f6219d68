"""w2sg against bare baselines measured in the same run: training and labeling throughput, start-up, padding, memory.

    python benchmarks/throughput.py            # MiniLM 6 layers, 512 examples per measurement
    python benchmarks/throughput.py --quick    # MiniLM 1 layer, 256 examples (CI)
    python benchmarks/throughput.py --only startup   # just `w2sg --help` and a config-error exit (seconds)

Every figure is printed next to its baseline as a ratio; targets: training and labeling >= 0.95x the bare loop,
start-up (`w2sg --help`, a config-error exit) under 1.5 s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def bare_train(model, tok, texts, labels, batch_size, max_length, lr, seed):
    """A hand-written loop: tokenize each batch with padding, cross-entropy, AdamW."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    model.train()
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        logits = model(enc["input_ids"], enc["attention_mask"])
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([labels[i] for i in idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()


def bare_predict(model, tok, texts, batch_size, max_length):
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = tok(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            out.append(torch.softmax(model(enc["input_ids"], enc["attention_mask"]), -1))
    return torch.cat(out)


def timed(fn, repeats=1):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def throughput(model_name: str, n: int, repeats: int) -> None:
    import numpy as np

    from w2sg.app.config import resolve
    from w2sg.app.config import compose
    from w2sg.data.tasks import load_task
    from w2sg.ml.losses import make_loss
    from w2sg.ml.models import build_model, load_tokenizer
    from w2sg.ml.train import Encoded, predict, train_model

    cfg = resolve(compose([f"weak={model_name}"]))
    data = load_task(cfg.task, 0)
    pool = (data.gt + data.weak + data.test)[:n]
    texts, labels = [t for t, _ in pool], [y for _, y in pool]
    tok = load_tokenizer(cfg.weak)
    bs, ml, lr = cfg.train.batch_size, cfg.train.max_length, cfg.weak.lr

    # Both loops train the same freshly built model (built outside the timed region: loading weights is not
    # training); they run in turns, so a busy machine slows both alike, and each figure is the fastest run.
    soft = np.eye(2, dtype=np.float32)[labels]
    xent = make_loss({"name": "xent"})

    def ours(model):
        enc = Encoded.of(tok, texts, ml)  # tokenizing is part of w2sg's cost here
        train_model(model, enc, soft, xent, epochs=1, batch_size=bs, lr=lr, pad_id=tok.pad_token_id, seed=0,
                    progress=False)

    def bare(model):
        bare_train(model, tok, texts, labels, bs, ml, lr, 0)

    best = {"bare": float("inf"), "ours": float("inf")}
    for rep in range(repeats + 1):
        for name, fn in (("bare", bare), ("ours", ours)):
            model = build_model(cfg.weak, 2, 0)
            t = timed(lambda: fn(model))
            if rep:  # the first round warms up allocators and lazy imports
                best[name] = min(best[name], t)
    t_bare, t_ours = best["bare"], best["ours"]
    print(f"training  ({model_name}, {n} examples, batch {bs}): bare {n / t_bare:7.1f} ex/s   "
          f"w2sg {n / t_ours:7.1f} ex/s   ratio {t_bare / t_ours:.2f}x  (target >= 0.95x; fastest of {repeats})")

    model = build_model(cfg.weak, 2, 0)
    ebs = int(cfg.train.eval_batch_size)
    t_bare = timed(lambda: bare_predict(model, tok, texts, ebs, ml), 3)
    t_ours = timed(lambda: predict(model, Encoded.of(tok, texts, ml), batch_size=ebs, pad_id=tok.pad_token_id,
                                   progress=False), 3)
    print(f"labeling  ({model_name}, {n} examples, batch {ebs}): bare {n / t_bare:7.1f} ex/s   "
          f"w2sg {n / t_ours:7.1f} ex/s   ratio {t_bare / t_ours:.2f}x  (target >= 0.95x)")

    # padding: share of token slots that are padding, per batching scheme, over the whole pool of the task
    from w2sg.ml.train import epoch_order

    pool_enc = Encoded.of(tok, [t for t, _ in data.gt + data.weak + data.test], ml)
    lengths = [len(ids) for ids in pool_enc.ids]
    real = sum(lengths)

    def waste(batches):
        slots = sum(len(b) * max(b) for b in batches)
        return 1 - real / slots

    def training(grouped):
        order = epoch_order(pool_enc, bs, 0, grouped=grouped)
        return waste([[lengths[i] for i in order[j:j + bs]] for j in range(0, len(order), bs)])

    fixed = 1 - real / (len(lengths) * ml)
    srt = sorted(lengths)
    bucketed = waste([srt[i:i + ebs] for i in range(0, len(srt), ebs)])
    print(f"padding   waste ({len(lengths)} texts): fixed max_length {fixed:.1%}   training batches: random order "
          f"{training(False):.1%}, length-grouped (train.batch_order=grouped, the default) {training(True):.1%} "
          f"(target < 15%)   length-sorted (labeling) {bucketed:.1%}")


def startup(repeats: int = 5) -> None:
    """Wall time of `w2sg --help` and of a config-error exit next to `python -c 'import hydra'`: the three are
    run in turns (so a busy machine slows them alike) and each figure is the fastest of `repeats` runs."""
    cmds = {
        "base": [sys.executable, "-c", "import hydra"],
        "help": [sys.executable, "-m", "w2sg", "--help"],
        "err": [sys.executable, "-m", "w2sg", "task=nope"],
    }
    best = dict.fromkeys(cmds, float("inf"))
    for _ in range(repeats):
        for key, cmd in cmds.items():
            best[key] = min(best[key], timed(lambda cmd=cmd: subprocess.run(cmd, capture_output=True)))
    base, help_, err = best["base"], best["help"], best["err"]
    print(f"start-up  python -c 'import hydra' {base:.2f}s   w2sg --help {help_:.2f}s ({help_ / base:.1f}x)   "
          f"config error {err:.2f}s ({err / base:.1f}x)   (target < 1.5 s; fastest of {repeats})")


def peak_rss_mib(args, env, cwd) -> float:
    """Peak resident memory of one `w2sg` run (its own process tree, measured by a wrapper process)."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "w2sg", *args], cwd=cwd, env=env,
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1]) / 1024


def memory(quick: bool) -> None:
    base = ["experiment=smoke"] if quick else []  # the full figure: the default pair and task
    # full finetuning vs linear probes at the same sizes (the task's own: the default's larger probe sizes would
    # measure the data, not the mode)
    sizes = [] if quick else ["task.n_train=600", "task.n_test=400"]
    figures = []
    for extra in (["train=full", *sizes], ["train=probe", *sizes]):
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, W2SG_STORE=os.path.join(tmp, "store"), WANDB_MODE="disabled")
            label = " ".join(["w2sg"] + base + extra)
            figures.append((label, peak_rss_mib(base + extra + ["progress=false"], env, tmp)))
    print("memory    peak RSS: " + "   ".join(f"`{a}` {m:.0f} MiB" for a, m in figures)
          + f"   (probe/full {figures[1][1] / figures[0][1]:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["startup", "memory"], help="run only this part (startup: seconds, no torch)")
    args = ap.parse_args()
    if args.only == "startup":
        startup()
        return
    if args.only == "memory":
        memory(args.quick)
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    throughput("minilm_l1" if args.quick else "minilm_l6", 256 if args.quick else 512, 3 if args.quick else 5)
    startup()
    memory(args.quick)


if __name__ == "__main__":
    main()
