"""The body of each stage kind: what a stage computes once its inputs are stored (``BODIES``, by w2sg.core.graph.Kind).

Each body is ``fn(ctx, stage, out)``: it reads its inputs through ``ctx``, the run's StageContext
(w2sg.run.context: the task's data, token ids, stored features, trained models, the device) and writes its
outputs (metrics.json, arrays, weights) into ``out``, a stage folder the store renames into place when the body
returns (bodies never receive the Runner itself). Adding a stage kind: a ``Kind`` member and a builder
in w2sg.core.graph, and a body here.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Callable, Dict, Optional

from w2sg.core.graph import Kind, Stage
from w2sg.core.store import StageDir
from w2sg.run.context import StageContext, micro_batch

log = logging.getLogger(__name__)


def validation_split(ctx: StageContext, stage: Stage, data: Any, soft: Any, part: str, rows: Optional[Any] = None):
    """Hold out ``val_frac`` of the training part (seeded); return (train data, train labels, Validation).
    ``rows``: the rows of the part that ``data`` holds (a transformed training set), None for all."""
    import numpy as np

    from w2sg.ml.train import Validation

    tspec = stage.spec["train"]
    n_val = int(round(tspec["val_frac"] * len(soft)))
    if n_val == 0:
        return data, soft, None
    perm = np.random.RandomState(ctx.cfg.seed).permutation(len(soft))
    val_idx, train_idx = sorted(perm[:n_val].tolist()), sorted(perm[n_val:].tolist())
    val_y = soft[val_idx]
    if part == "weak" and tspec["val_labels"] == "ground_truth":  # judge against ground truth (an oracle)
        truth = [ctx.data.weak[i if rows is None else int(rows[i])][1] for i in val_idx]
        val_y = np.eye(ctx.cfg.task.num_classes, dtype=np.float32)[truth]
    validation = Validation(data.subset(val_idx), val_y, tspec["eval_every"], tspec["keep_best"])
    return data.subset(train_idx), soft[train_idx], validation


def train(ctx: StageContext, stage: Stage, out: StageDir) -> None:
    import numpy as np

    from w2sg.ml.losses import make_loss
    from w2sg.ml.metrics import accuracy, auroc
    from w2sg.ml.models import count_params, merge_lora
    from w2sg.ml.train import Checkpointer, fit_probe, predict, train_model

    cfg, data = ctx.cfg, ctx.data
    num_classes = cfg.task.num_classes
    rows = None  # the rows of the weak-label half a transformed training set holds (None: all)
    if "labels" in stage.inputs:
        part = "weak"
        soft, rows = training_labels(ctx, stage.inputs["labels"])
    else:
        part = "gt"
        soft = np.eye(num_classes, dtype=np.float32)[[y for _, y in data.gt]]
    tspec = stage.spec["train"]
    # before the model is on the GPU: whether full finetuning fits one GPU decides auto's strategy
    strategy, processes = parallel_plan(ctx, tspec["mode"], stage)
    model = ctx.build_model(stage, shards=processes if strategy == "fsdp" else 1)
    pad_id = ctx.tokenizer(stage.model).pad_token_id
    inputs = ctx.inputs_of(stage, part)
    inputs = inputs if rows is None else inputs.subset(rows.tolist())
    dropped = 0
    if tspec.get("truncation") == "drop":  # over-long training examples left out (openai/weak-to-strong)
        inputs, soft, rows, dropped = drop_long(ctx, stage, part, rows, inputs, soft)
    train_data, train_y, validation = validation_split(ctx, stage, inputs, soft, part, rows)
    probe = tspec["mode"] == "probe"
    # a probe head fits in well under a second: no checkpoints (a rerun simply fits it again)
    checkpointer = nullcontext(None) if probe else Checkpointer(str(ctx.store.checkpoint_path(stage.key)),
                                                                cfg.train.checkpoint_every,
                                                                cfg.train.checkpoint_minutes)
    with checkpointer as ckpt, ctx.stage_run(stage) as wb:
        settings = dict(epochs=tspec["epochs"], lr=tspec["lr"], optimizer=tspec["optimizer"],
                        weight_decay=tspec["weight_decay"], warmup_frac=tspec["warmup_frac"],
                        schedule=tspec["schedule"], validation=validation,
                        eval_batch_size=ctx.eval_batch_size(stage.model), desc=stage.label, on_log=wb.log,
                        policy=ctx.policy)
        if probe:
            result = fit_probe(model, train_data, train_y, make_loss(stage.spec["loss"]), **settings)
        else:
            loop = dict(batch_size=tspec["batch_size"], pad_id=pad_id, seed=ctx.model_seed(stage),
                        batch_order=tspec.get("batch_order", "random"), max_grad_norm=tspec.get("max_grad_norm"),
                        minibatch_size=tspec.get("minibatch_size"), progress=cfg.progress)
            if processes > 1:  # local ranks train; this process predicts and writes the stage as below
                result = train_in_processes(ctx, stage, model, train_data, train_y, strategy, processes, ckpt,
                                            {**settings, **loop})
            else:
                result = train_model(model, train_data, train_y, make_loss(stage.spec["loss"]), checkpointer=ckpt,
                                     **settings, **loop)
        if result.resumed_from:
            log.info("%s resumed from its checkpoint at step %d", stage.label, result.resumed_from)
        trained_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        adapter = adapter_state(model) if tspec["mode"] == "lora" else None
        # every number comes from the model that is stored and labels: adapters merged, and a full finetune's
        # fp32 master weights cast to the compute dtype, before the test and transfer predictions
        merge_lora(model)
        if tspec["mode"] == "full" and ctx.policy.precision != "fp32":
            model.backbone.to(ctx.policy.dtype)
        test_y = [y for _, y in data.test]
        probs = predict(model, ctx.inputs_of(stage, "test"),
                        batch_size=ctx.eval_batch_size(stage.model), pad_id=pad_id,
                        progress=cfg.progress and not probe,
                        desc=f"{stage.label} test", policy=ctx.policy)
        transfer_probs = None
        if part == "weak":  # the student's fit of the weak labels (misfit; w2sg.results.diagnostics)
            transfer_probs = predict(model, ctx.inputs_of(stage, "weak"),
                                     batch_size=ctx.eval_batch_size(stage.model), pad_id=pad_id,
                                     progress=cfg.progress and not probe, desc=f"{stage.label} transfer",
                                     policy=ctx.policy)
        metrics = {
            "acc": accuracy(probs, test_y), "auroc": auroc(probs, test_y), "n_train": len(train_y),
            "n_test": len(test_y), "history": result.history, "trained_params": trained_params,
            # the predicting model's size (a probe's backbone ran in the features stage)
            "params": stage.model.params if tspec["mode"] == "probe" else count_params(model),
            "resumed_from_step": result.resumed_from, "task_sizes": ctx.task_sizes(),
            "runtime": ctx.runtime(model),
        }
        if processes > 1:  # trained on several ranks (w2sg.ml.distributed); predicted and stored here
            metrics["runtime"].update(strategy=strategy, ranks=processes)
        if not probe or tspec.get("truncation") == "drop":
            # the share of training texts cut (token ids know it: Encoded.cut_frac; 0 after drop, and for features)
            cut_frac = getattr(train_data, "cut_frac", lambda: 0.0)()
            metrics["cut"] = {"train": round(cut_frac, 4), "max_length": cfg.train.max_length,
                              "truncation": tspec.get("truncation", "right")}
            if dropped:
                metrics["cut"]["dropped"] = dropped
        if validation is not None:
            metrics.update(n_val=len(validation.labels), val_labels=tspec.get("val_labels", "ground_truth"),
                           evals=result.evals, best=result.best)
            # the final model (the kept best weights, cast as stored) on its held-out rows: what a tuning sweeper
            # selects by (objective=val.*), so the test split is read once, for the report
            metrics["val"] = {**validation.evaluate(model, pad_id, ctx.eval_batch_size(stage.model), ctx.policy),
                              "labels": metrics["val_labels"]}
        wb.log({"eval/acc": metrics["acc"], "eval/auroc": metrics["auroc"], "epoch": len(result.history)})
        wb.summary({k: v for k, v in metrics.items() if k not in ("history", "evals")})
    out.write_array("test_probs", probs)
    if transfer_probs is not None:
        out.write_array("transfer_probs", transfer_probs)
    out.write_json("metrics.json", metrics)
    save_weights(ctx, stage, model, adapter, out)
    ctx.keep(stage.key, model)  # the latest only: the labels stage usually follows at once


def parallel_plan(ctx: StageContext, mode: str, stage: Optional[Stage] = None):
    """(strategy, processes) of a train stage: train.strategy / processes resolved (w2sg.ml.distributed). LoRA and
    probes, and a model sharded with device_map, train in one process; auto with several processes is ddp when the
    stage's full finetuning fits one GPU by the memory estimate (StageContext.fits_one_device), else fsdp."""
    from w2sg.ml.distributed import resolve_processes

    t = ctx.cfg.train
    strategy = getattr(t, "strategy", "auto")
    if mode != "full" or t.device_map is not None or strategy == "single":
        return "single", 1
    processes = resolve_processes(getattr(t, "processes", None), ctx.policy.device)
    if processes == 1:
        return "single", 1
    if strategy == "auto":
        fits = stage is None or ctx.fits_one_device(stage, mode, micro_batch(stage.spec["train"]))
        strategy = "ddp" if fits else "fsdp"
    return strategy, processes


def train_in_processes(ctx: StageContext, stage: Stage, model: Any, data: Any, labels: Any, strategy: str,
                       processes: int, ckpt: Any, settings: Dict[str, Any]):
    """Train in ``processes`` local ranks (no distributed environment: this process is no rank); rank 0's trained
    weights are loaded into ``model``, its log entries go to W&B from here. Only this process writes the store."""
    import shutil

    from w2sg.ml.distributed import train_processes

    on_log = settings.pop("on_log", None)
    folder = ctx.store.scratch_dir(stage.key, "ranks")
    try:
        return train_processes(processes, strategy, str(folder), model, data, labels, stage.spec["loss"],
                               (ckpt.path, ckpt.every, ckpt.minutes), on_log, **settings)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def drop_long(ctx: StageContext, stage: Stage, part: str, rows: Optional[Any], data: Any, soft: Any):
    """train.truncation=drop: (data, labels, rows of the part, how many were left out) without the examples
    longer than train.max_length under this model's tokenizer (training and validation examples alike)."""
    import numpy as np

    rows = np.arange(len(soft)) if rows is None else np.asarray(rows, dtype=int)
    cut = np.asarray(ctx.encode(stage.model, part).cut, dtype=bool)[rows]
    keep = [i for i in range(len(cut)) if not cut[i]]
    if not keep:
        from w2sg.core.errors import W2SGError

        raise W2SGError(f"{stage.label}: every training example is longer than train.max_length="
                        f"{ctx.cfg.train.max_length} tokens, so train.truncation=drop leaves none; raise "
                        "train.max_length or set train.truncation=left")
    dropped = len(cut) - len(keep)
    if dropped:
        log.warning("%s: %d of %d training examples (%.1f%%) are longer than train.max_length=%d tokens and are "
                    "left out (train.truncation=drop)", stage.label, dropped, len(cut), 100 * dropped / len(cut),
                    ctx.cfg.train.max_length)
    return data.subset(keep), soft[keep], rows[keep], dropped


def training_labels(ctx: StageContext, labels: Stage):
    """(soft labels, rows of the weak-label half or None for all) of a labels or transform stage."""
    sd = ctx.store.get(labels.key)
    rows = sd.read_array("rows") if sd.file("rows.npy").exists() else None
    return sd.read_array("probs"), rows


def transform(ctx: StageContext, stage: Stage, out: StageDir) -> None:
    """The w2s stage's training set (w2sg.ml.methods): averaged members, budget rows, the labels= method."""
    import numpy as np

    from w2sg.ml.methods import average, build_training_set, training_set_metrics

    members = [ctx.store.get(dep.key).read_array("probs") for name, dep in sorted(stage.inputs.items())
               if name == "labels" or name.startswith("member")]
    probs = members[0] if len(members) == 1 else average(members)
    features = None
    if "features" in stage.inputs:
        features, features_b = ctx.features(stage.inputs["features"])["weak"]
        if features_b is not None:  # a pair's features: the difference of its two texts'
            features = features - features_b
    truth = [y for _, y in ctx.data.weak]
    ts = build_training_set(stage.spec, probs, features, truth)
    metrics = {"method": stage.spec["method"]["name"], **training_set_metrics(ts, probs, truth)}
    with ctx.stage_run(stage) as wb:
        wb.summary({f"label_{k}": v for k, v in metrics.items()})
    out.write_array("probs", ts.probs)
    out.write_array("rows", ts.rows.astype(np.int64))
    out.write_array("ground_truth", ts.ground_truth)
    out.write_json("metrics.json", metrics)


def adapter_state(model: Any) -> Dict[str, Any]:
    """LoRA: what training changed (the adapters and the head), before the adapters are merged."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_weights(ctx: StageContext, stage: Stage, model: Any, adapter: Optional[Dict[str, Any]], out: StageDir) -> None:
    """A train stage's weights: LoRA stores its adapters and head only (adapter.safetensors; StageContext.load_trained
    rebuilds the base model and merges them, as training did); a full finetune stores the model with its
    backbone in the compute dtype (fp32 on the CPU: as trained), and keeps that model for the labels stage, so
    labels are the same whether they are computed now or from the store later; a probe stores its head."""
    from safetensors.torch import save_file, save_model

    if adapter is not None:
        save_file(adapter, str(out.file("adapter.safetensors")))
        return
    save_model(model, str(out.file("model.safetensors")))  # a full finetune's: cast already (train)


def features(ctx: StageContext, stage: Stage, out: StageDir) -> None:
    """The frozen model as an encoder: this run's texts are encoded into the store's feature bank of the stage's
    key (texts are found there by content, so other seeds, sizes and tasks reuse them; w2sg.run.context)."""
    parts = ctx.features(stage)
    out.write_json("metrics.json", {"dim": int(parts["test"][0].shape[1]),
                                    "texts": len(ctx.store.feature_bank(stage.key))})


def lm(ctx: StageContext, stage: Stage, out: StageDir) -> None:
    from safetensors.torch import save_file

    from w2sg.ml.generative import finetune_lm

    texts = [t for part in (ctx.data.gt, ctx.data.weak) for x, _ in part
             for t in (x if isinstance(x, tuple) else (x,))]
    g = stage.spec["generative"]
    ctx.check_memory(stage, "full", g["batch_size"])
    with ctx.stage_run(stage) as wb:
        result = finetune_lm(stage.model, ctx.tokenizer(stage.model), texts, objective=g["objective"],
                             epochs=g["epochs"], batch_size=g["batch_size"], lr=g["lr"],
                             max_length=stage.spec["max_length"], mlm_probability=g["mlm_probability"],
                             seed=ctx.cfg.seed, progress=ctx.cfg.progress, desc=stage.label,
                             policy=ctx.policy)
        for entry in result["history"]:
            wb.log({f"lm/{k}": v for k, v in entry.items()})
        metrics = {"objective": result["objective"], "n_texts": len(texts), "history": result["history"]}
        wb.summary({"objective": result["objective"], "final_loss": result["history"][-1]["loss"]})
    save_file({k: v.contiguous() for k, v in result["state"].items()}, str(out.file("backbone.safetensors")))
    out.write_json("metrics.json", metrics)


def labels(ctx: StageContext, stage: Stage, out: StageDir) -> None:
    from w2sg.ml.metrics import accuracy, auroc
    from w2sg.ml.train import predict

    trained = stage.inputs["model"]
    model = ctx.load_trained(trained)
    data = ctx.data
    probs = predict(model, ctx.inputs_of(trained, "weak"), policy=ctx.policy,
                    batch_size=ctx.eval_batch_size(trained.model),
                    pad_id=ctx.tokenizer(trained.model).pad_token_id,
                    progress=ctx.cfg.progress and "features" not in trained.inputs,  # a probe's: a fraction of a second
                    desc=stage.label)
    gt = [y for _, y in data.weak]
    # how good the labels are against the (hidden) ground truth of that half
    metrics = {"acc": accuracy(probs, gt), "auroc": auroc(probs, gt), "n": len(gt), "runtime": ctx.runtime(model)}
    with ctx.stage_run(stage) as wb:
        wb.summary({f"label_{k}": v for k, v in metrics.items()})
    out.write_array("probs", probs)
    out.write_json("metrics.json", metrics)


BODIES: Dict[Kind, Callable[[StageContext, Stage, StageDir], None]] = {
    Kind.TRAIN: train, Kind.LABELS: labels, Kind.FEATURES: features, Kind.LM: lm, Kind.TRANSFORM: transform,
}
