"""Settings met at first contact with real decoders and GPUs: which end of a long text is kept, gradient clipping,
the head's initialisation, LoRA on every linear projection with a learning rate per model, checkpoints that hold
only what training changes, one model behind every number, and what each stage says about where it ran."""

import json
import logging
import random

import numpy as np
import pytest
import torch
from helpers import TINY, compose

from w2sg.core.errors import W2SGError
from w2sg.core.plan import plan
from w2sg.core.store import Store
from w2sg.ml.losses import make_loss
from w2sg.ml.models import add_lora, build_model, load_tokenizer
from w2sg.ml.train import Checkpointer, Encoded, predict, train_model
from w2sg.run import experiment
from w2sg.run.runner import Runner, same_predictions

XENT = make_loss({"name": "xent"})
FILLER = ["the", "a", "of", "and", "to", "in", "is", "it", "that", "was", "for", "on", "with", "as", "at", "by"]


def last_word_task(path, n=240, words=40, seed=0):
    """Texts of ``words`` filler words whose label is their last word (good / bad): an answer at the end, as in
    boolq's question or a multiple-choice answer."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            label = i % 2
            text = " ".join(rng.choices(FILLER, k=words) + [("good", "bad")[label]])
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    return task_overrides(path)


def task_overrides(path):
    return ["task.name=last_word", "task.dataset=json", f"task.data_files={{train: {path}}}",
            "task.splits={train: train, test: null}", "task.label_column=label", "task.label_map=null",
            "task.balance=false", "task.n_train=160", "task.n_test=80", "task.pool_seed=null"]


def word_tokenizer(folder):
    """A word-level tokenizer without special tokens: a decoder's last token is the text's last word (as with
    Qwen's or Llama's tokenizers; MiniLM's would append [SEP])."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "good", "bad", *FILLER])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(str(folder))
    return str(folder)


def run(overrides, store_dir):
    cfg = compose(["logger=none", f"store_dir={store_dir}", "progress=false"] + list(overrides))
    runner = Runner(cfg, Store(cfg.store_dir))
    return experiment.run(cfg, runner), runner


# --- which end of a long text survives -------------------------------------------------------------------------

def test_a_decoder_keeps_the_end_of_a_long_text_where_its_answer_is(tmp_path, caplog):
    """Last-token pooling reads the last token: cut on the right (the old behaviour) the answer is gone and a
    probe is at chance; the default (auto: keep the end for last-token pooling) keeps it."""
    task = last_word_task(tmp_path / "task.jsonl")
    tok = word_tokenizer(tmp_path / "tokenizer")
    base = ["weak=tiny_random_qwen2", "strong=tiny_random_qwen2", f"weak.tokenizer={tok}", f"strong.tokenizer={tok}",
            "train=probe", "train.max_length=16"] + task
    with caplog.at_level(logging.WARNING, logger="w2sg"):
        kept, runner = run(base, tmp_path / "s")
    assert "tiny_random_qwen2: 240 of 240 newly encoded texts (100.0%) are longer than train.max_length=16" \
        in caplog.text and "each keeps its end" in caplog.text
    cut, _ = run(base + ["train.truncation=right"], tmp_path / "s")
    assert kept["acc"]["ceiling"] >= 0.95
    assert cut["acc"]["ceiling"] <= 0.7, "the start of each text says nothing about its label"
    feats = {s.inputs["features"].spec.get("truncation") for s in plan(runner.cfg).values() if "features" in s.inputs}
    assert feats == {"left"}, "the kept end enters the features key (texts in the bank are found by side too)"


def test_encoded_texts_know_which_were_cut_and_keep_the_chosen_end():
    tok = load_tokenizer(compose([]).weak)
    texts = ["one two three four five six seven eight nine ten", "short one"]
    left = Encoded.of(tok, texts, 6, side="left")
    right = Encoded.of(tok, texts, 6, side="right")
    assert left.cut == right.cut == [True, False] and left.cut_frac() == 0.5
    assert tok.decode(left.ids[0], skip_special_tokens=True) == "seven eight nine ten"
    assert tok.decode(right.ids[0], skip_special_tokens=True) == "one two three four"
    assert left.ids[1] == right.ids[1] == tok("short one")["input_ids"]
    assert len(left.ids[0]) == 6 and left.subset([1]).cut == [False]


def test_truncation_enters_keys_only_where_it_changes_the_inputs():
    def spec(overrides):
        return plan(compose(overrides))["w2s"].spec["train"]

    assert "truncation" not in spec(["train=full"])  # mean pooling keeps the start, as every key before it
    assert spec(["train=full", "strong=tiny_random_qwen2"])["truncation"] == "left"
    assert spec(["train=full", "train.truncation=drop"])["truncation"] == "drop"
    assert spec(["train=full", "strong=tiny_random_qwen2", "train.truncation=right"]).get("truncation") is None
    with pytest.raises(W2SGError, match="unknown train.truncation 'middle'; valid: auto, left, right, drop"):
        from w2sg.app.config import validate

        validate(compose(["train.truncation=middle"]), overrides=[])


def test_drop_leaves_over_long_training_examples_out_and_counts_them(tmp_path):
    path = tmp_path / "task.jsonl"
    rng = random.Random(1)
    with path.open("w") as f:
        for i in range(240):  # a third of the texts are long
            words = rng.choices(FILLER, k=40 if i % 3 == 0 else 4)
            f.write(json.dumps({"text": " ".join(words + [("good", "bad")[i % 2]]), "label": i % 2}) + "\n")
    task = task_overrides(path) + ["task.dedupe=false"]  # short texts of 16 words repeat
    m, runner = run(TINY + ["train.truncation=drop", "train.max_length=16"] + task, tmp_path / "s")
    stored = Store(runner.cfg.store_dir).get(plan(runner.cfg)["weak"].key).read_json("metrics.json")
    long_gt = sum(runner.encode(runner.cfg.weak, "gt").cut)
    assert 0 < long_gt < 80
    assert stored["cut"]["dropped"] == long_gt and stored["n_train"] == 80 - long_gt
    assert stored["cut"]["train"] == 0.0 and stored["cut"]["truncation"] == "drop"


# --- optimisation settings ---------------------------------------------------------------------------------------

def toy(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (n, 6), generator=g)
    y = (ids[:, 0] > 100).long()
    return Encoded([r.tolist() for r in ids]), np.eye(2, dtype=np.float32)[y.numpy()]


def tiny_decoder():
    return compose(["weak=tiny_random_qwen2"]).weak


def grad_norms(monkeypatch, **kw):
    """The gradient norm each optimizer step sees."""
    seen = []
    step = torch.optim.AdamW.step

    def recording(self, *a, **k):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    data, y = toy()
    model = build_model(tiny_decoder(), 2, 0)
    train_model(model, data, y, XENT, epochs=2, batch_size=8, lr=3e-2, pad_id=0, seed=0, progress=False, **kw)
    return seen


def test_gradients_are_clipped_to_max_grad_norm(monkeypatch):
    free = grad_norms(monkeypatch)
    clipped = grad_norms(monkeypatch, max_grad_norm=0.05)
    assert max(free) > 0.05, "unclipped gradients of this toy are larger than the bound"
    assert max(clipped) <= 0.05 * 1.001


def test_zero_head_init_starts_at_the_uniform_prediction_and_enters_the_key():
    model = build_model(tiny_decoder(), 2, 0, head_init="zero")
    data, _ = toy(8)
    assert np.allclose(predict(model, data, batch_size=8, pad_id=0, progress=False), 0.5)
    assert "head_init" not in plan(compose(["train=full"]))["weak"].spec["train"]
    assert plan(compose(["train=full", "train.head_init=zero"]))["weak"].spec["train"]["head_init"] == "zero"


def test_lora_adapts_every_linear_projection_with_the_models_own_lr():
    model = build_model(tiny_decoder(), 2, 0)
    add_lora(model, rank=2, alpha=4.0, dropout=0.0, target_modules=None)
    adapted = {n.split(".")[-4] for n, _ in model.named_parameters() if n.endswith("lora_A.default.weight")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    spec = plan(compose(["train=lora", "strong=qwen2_5_7b"]))["w2s"].spec["train"]
    assert spec["lr"] == 8.7e-05 and spec["lora"]["target_modules"][-1] == "down_proj"
    assert plan(compose(["train=lora", "strong=qwen2_5_7b", "train.lr=1e-3"]))["w2s"].spec["train"]["lr"] == 1e-3
    minilm = plan(compose(["train=lora"]))["w2s"].spec["train"]  # no arch: the family table's version is keyed
    assert minilm["lr"] == 5e-4 and minilm["lora"]["family_targets"] == 2


# --- checkpoints ---------------------------------------------------------------------------------------------------

def test_a_lora_checkpoint_holds_what_training_changes_and_resumes(tmp_path):
    def lora_model():
        model = build_model(tiny_decoder(), 2, 0)
        add_lora(model, rank=2, alpha=4.0, dropout=0.0, target_modules=None)
        return model

    data, y = toy()
    path = str(tmp_path / "checkpoint.pt")
    args = dict(epochs=2, batch_size=8, lr=1e-2, pad_id=0, seed=0, progress=False)
    model = lora_model()
    with Checkpointer(path, every=3) as ckpt:
        train_model(model, data, y, XENT, checkpointer=ckpt, **args)
    saved = torch.load(path, weights_only=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert saved["step"] == 6 and set(saved["model"]) == trainable, "adapters and head, no frozen base"
    assert "best_state" not in saved
    resumed = lora_model()
    with Checkpointer(path) as ckpt:
        result = train_model(resumed, data, y, XENT, checkpointer=ckpt, **args)
    assert result.resumed_from == 6
    for (n, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_checkpoints_are_due_by_time_and_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    ckpt = Checkpointer(str(tmp_path / "c.pt"), minutes=10)
    assert not ckpt.due(1)
    ckpt._last -= 601
    assert ckpt.due(2)
    ckpt.save({"x": 1})
    assert not ckpt.due(3) and (tmp_path / "c.pt").exists()

    def full_disk(obj, f, *a, **k):
        open(f, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(RuntimeError):
        ckpt.save({"x": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


# --- one model behind every number ---------------------------------------------------------------------------

def test_test_accuracy_labels_and_stored_weights_come_from_one_cast_model(tmp_path):
    """bf16: the test predictions are those of the stored (bf16-cast) model, which the labels stage also uses."""
    overrides = TINY + ["weak=tiny_random_qwen2", "strong=tiny_random_qwen2", "train.precision=bf16"]
    _, runner = run(overrides, tmp_path / "s")
    weak = plan(runner.cfg)["weak"]
    stored = runner.store.get(weak.key).read_array("test_probs")
    fresh = Runner(runner.cfg, Store(runner.cfg.store_dir))  # nothing in memory: the model from the store
    model = fresh.load_trained(weak)
    assert next(model.backbone.parameters()).dtype == torch.bfloat16
    again = predict(model, fresh.inputs_of(weak, "test"), batch_size=64, pad_id=fresh.tokenizer(weak.model).pad_token_id,
                    progress=False, policy=fresh.policy)
    assert np.array_equal(stored, again)
    labels = fresh.store.get(plan(runner.cfg)["weak_labels"].key).read_array("probs")
    assert np.array_equal(labels, predict(model, fresh.inputs_of(weak, "weak"), batch_size=64, pad_id=0,
                                          progress=False, policy=fresh.policy))


# --- where a stage ran ---------------------------------------------------------------------------------------

def test_every_stage_records_device_dtype_and_attention(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="w2sg"):
        _, runner = run(TINY + ["weak=tiny_random_qwen2"], tmp_path / "s")
    metrics = runner.store.get(plan(runner.cfg)["weak"].key).read_json("metrics.json")
    assert metrics["runtime"]["device"] == "cpu" and metrics["runtime"]["dtype"] == "fp32"
    assert metrics["runtime"]["attention"] in ("sdpa", "eager")
    assert "done in" in caplog.text and " on cpu (fp32, attention " in caplog.text


def test_auto_on_a_machine_with_an_nvidia_gpu_but_a_cpu_torch_warns(monkeypatch, caplog):
    from w2sg.run import device as dev

    monkeypatch.setattr(dev, "cuda_available", lambda: False)
    monkeypatch.setattr(dev, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", None)
    with caplog.at_level(logging.WARNING, logger="w2sg"):
        dev.runtime_policy(compose([]).train)
    assert "has an NVIDIA GPU but torch" in caplog.text and "CPU build" in caplog.text
    caplog.clear()
    dev.runtime_policy(compose(["train.device=cpu"]).train)
    assert "NVIDIA" not in caplog.text


def test_restored_weights_are_judged_within_the_devices_stated_tolerance():
    stored = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert same_predictions(stored, stored + 1e-7, "cpu")[0]
    assert not same_predictions(stored, stored + 1e-3, "cpu")[0]
    assert same_predictions(stored, stored + [[0.01, -0.01]] * 3, "cuda")[0], "GPU kernels may differ slightly"
    flipped = stored.copy()
    flipped[2] = [0.49, 0.51]
    assert not same_predictions(stored, flipped, "cuda")[0], "a changed hard label is not noise"
    assert not same_predictions(stored, stored[:2], "cuda")[0]


@pytest.mark.parametrize("sweep", ["gpt2_grid", "qwen_grid", "pythia_checkpoints"])
def test_decoder_sweeps_read_texts_long_enough_and_keep_their_end(sweep):
    cfg = compose([f"sweep={sweep}"])
    assert cfg.train.max_length == 512
    assert plan(cfg)["w2s"].spec["train"]["truncation"] == "left"


# --- students apart, selection on validation -----------------------------------------------------------------------

def test_student_settings_retrain_only_the_students():
    """Tuning student.lr leaves the weak and ceiling models (the gap PGR divides by) as they are."""
    base, tuned = plan(compose(["train=full"])), plan(compose(["train=full", "student.lr=1e-3", "student.epochs=2"]))
    assert [base[n].key == tuned[n].key for n in ("weak", "weak_labels", "ceiling", "w2s")] == [True, True, True, False]
    assert (tuned["w2s"].spec["train"]["lr"], tuned["w2s"].spec["train"]["epochs"]) == (1e-3, 2)
    assert plan(compose(["train=full", "student.lr=null"]))["w2s"].key == base["w2s"].key
    with pytest.raises(Exception, match="no key 'lrr' in 'student'; valid keys: lr, epochs"):
        compose(["student.lrr=1e-3"])


def test_each_trained_model_is_measured_on_its_held_out_rows(tmp_path):
    """With train.val_frac, each train stage records its final model's validation accuracy (w2s: against the weak
    labels by default), which tuning objectives read instead of the test split."""
    _, runner = run(TINY + ["train.val_frac=0.25"], tmp_path / "s")
    stages = plan(runner.cfg)
    val = {n: runner.store.get(stages[n].key).read_json("metrics.json")["val"] for n in ("weak", "ceiling", "w2s")}
    assert [val[n]["labels"] for n in ("weak", "ceiling", "w2s")] == ["ground_truth", "ground_truth", "weak"]
    assert all(0 <= v["acc"] <= 1 for v in val.values())


def test_student_settings_are_checked_like_trains():
    from w2sg.app.config import validate

    with pytest.raises(W2SGError, match="unknown student.optimizer 'sgd'; valid: adamw, adam, adafactor"):
        validate(compose(["student.optimizer=sgd"]), overrides=[])
    with pytest.raises(W2SGError, match="student.lr=-1.0 is out of range"):
        Runner(compose(["student.lr=-1"]), Store("/tmp/unused-store-for-range-check"))
