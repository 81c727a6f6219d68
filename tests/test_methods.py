"""Weak-label methods (labels=), label budgets (budget=) and strong-to-strong iterations (s2s=)."""

import json
import re

import numpy as np
import pytest
from helpers import TINY, compose, metrics_files, run_w2sg
from hydra.errors import ConfigCompositionException, MissingConfigException

from w2sg.core.errors import W2SGError
from w2sg.core.plan import plan
from w2sg.core.store import Store
from w2sg.core import methods as method_specs
from w2sg.ml import methods


def keys(overrides=()):
    return {name: s.key for name, s in plan(compose(list(overrides))).items()}


# --- the transformations on hand-made examples --------------------------------------------------------------

def test_confidence_filter_drops_the_least_confident_share():
    probs = np.array([[.9, .1], [.55, .45], [.3, .7], [.5, .5], [.2, .8],
                      [.6, .4], [.99, .01], [.45, .55], [.1, .9], [.8, .2]], dtype=np.float32)
    new, kept = methods.confidence_filter(probs, None, drop_frac=0.3)
    # confidence |p - 0.5|: rows 3 (0), 1 and 7 (0.05) are the three least confident
    assert kept.tolist() == [0, 2, 4, 5, 6, 8, 9]
    assert np.array_equal(new, probs[kept])
    assert methods.confidence_filter(probs, None, drop_frac=0.0)[1].tolist() == list(range(10))


def test_knn_probe_averages_the_labels_of_the_nearest_rows_itself_included():
    x = np.array([[1, 0], [.9, .1], [0, 1], [.1, .9]], dtype=np.float32)
    probs = np.array([[1, 0], [.6, .4], [0, 1], [.2, .8]], dtype=np.float32)
    expected = np.array([[.8, .2], [.8, .2], [.1, .9], [.1, .9]])
    for metric in ("euclidean", "cosine"):
        assert np.allclose(methods.knn_probe(x, probs, k=2, metric=metric), expected)
        assert np.allclose(methods.knn_probe(x, probs, k=50, metric=metric), probs.mean(0))  # k above n: all rows
    # cosine ignores a feature vector's scale, Euclidean distance does not: scaled to [.1, 0], [.9, .1], [0, 7],
    # [.1, .9], row 3's nearest other row is row 0 (distance .9; row 2: 6.1), row 0's is row 1 (.81; row 3: .9)
    scaled = x * np.array([[.1], [1], [7], [1]], dtype=np.float32)
    assert np.allclose(methods.knn_probe(scaled, probs, k=2, metric="cosine"), expected)
    euclidean = methods.knn_probe(scaled, probs, k=2)
    assert np.allclose(euclidean[3], (probs[3] + probs[0]) / 2) and np.allclose(euclidean[0], expected[0])
    with pytest.raises(W2SGError, match="'manhattan': unknown; valid: euclidean, cosine"):
        methods.knn_probe(x, probs, k=2, metric="manhattan")


def _clusters(n=10, flip=(7,)):
    """Two well separated clusters of features; the weak labels follow them except at rows ``flip``."""
    rng = np.random.default_rng(0)
    centres = np.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    cls = np.array([i % 2 for i in range(n)])
    x = centres[cls] + rng.normal(0, 0.3, (n, 3))
    weak = cls.copy()
    weak[list(flip)] = 1 - weak[list(flip)]
    probs = np.eye(2, dtype=np.float32)[weak] * 0.8 + 0.1
    return x.astype(np.float32), probs, cls


PROBE_VARIANTS = [{"probe": "knn"}, {"probe": "knn", "knn_metric": "cosine"}, {"probe": "logreg"},
                  {"probe": "logreg", "logreg_fit": "sklearn_hard"}]


@pytest.mark.parametrize("variant", PROBE_VARIANTS)
def test_probe_filter_drops_the_rows_where_probe_and_label_disagree_most(variant):
    x, probs, _ = _clusters(flip=(7,))
    new, kept = methods.probe_filter(probs, x, k=5, contamination=0.1, **variant)
    assert kept.tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9]  # 10% of 10 rows: the mislabelled row 7
    assert np.array_equal(new, probs[kept])


@pytest.mark.parametrize("variant", PROBE_VARIANTS)
def test_probe_relabel_replaces_the_labels_by_the_probes_predictions(variant):
    x, probs, cls = _clusters(n=20, flip=(7,))
    new, kept = methods.probe_relabel(probs, x, k=5, **variant)
    assert kept.tolist() == list(range(20))
    assert np.allclose(new.sum(1), 1.0, atol=1e-5)
    assert new.argmax(1).tolist() == cls.tolist()  # row 7's wrong label is outvoted by its cluster
    expected = {("knn", None): methods.knn_probe(x, probs, k=5),
                ("knn", "cosine"): methods.knn_probe(x, probs, k=5, metric="cosine"),
                ("logreg", None): methods.bce_logreg_probe(x, probs, l2p=1e-3),
                ("logreg", "sklearn_hard"): methods.logreg_probe(x, probs, C=1.0)}[
        (variant["probe"], variant.get("knn_metric", variant.get("logreg_fit")))]
    assert np.allclose(new, expected)


def test_the_filters_share_is_eleuthers_int_for_their_probes_and_rounded_for_the_earlier_ones():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(25, 4)).astype(np.float32)
    soft = rng.uniform(0.05, 0.95, 25).astype(np.float32)
    probs = np.stack([1 - soft, soft], 1)
    # 0.1 * 25 = 2.5: EleutherAI's Probe.filter drops int(2.5) = 2 rows, the earlier w2sg filter round(2.5) = 2,
    # 0.14 * 25 = 3.5: int 3, round 4
    for frac, eleuther, earlier in ((0.1, 2, 2), (0.14, 3, 4)):
        assert len(methods.probe_filter(probs, x, contamination=frac, k=3)[1]) == 25 - eleuther
        assert len(methods.probe_filter(probs, x, contamination=frac, k=3, knn_metric="cosine")[1]) == 25 - earlier
        assert len(methods.probe_filter(probs, x, probe="logreg", contamination=frac)[1]) == 25 - eleuther
        assert len(methods.probe_filter(probs, x, probe="logreg", logreg_fit="sklearn_hard",
                                        contamination=frac)[1]) == 25 - earlier


def test_the_earlier_sklearn_logreg_probe_fits_hard_labels_and_handles_a_single_class():
    x, probs, cls = _clusters(n=20, flip=())
    p = methods.logreg_probe(x, probs, C=1.0)
    assert p.argmax(1).tolist() == cls.tolist() and (p.max(1) > 0.5).all()
    one = np.tile(np.array([[.3, .7]], dtype=np.float32), (4, 1))
    assert methods.logreg_probe(x[:4], one).tolist() == [[0.0, 1.0]] * 4


def test_ensemble_averages_its_members_soft_labels():
    a = np.array([[.9, .1], [.2, .8]])
    b = np.array([[.5, .5], [.4, .6]])
    assert np.allclose(methods.average([a, b]), [[.7, .3], [.3, .7]])


def test_budget_rows_are_disjoint_nested_and_checked():
    weak, gt = methods.budget_rows(100, n_weak=30, n_gt=10, seed=0)
    assert len(weak) == 30 and len(gt) == 10 and not set(weak) & set(gt)
    weak_all, gt_all = methods.budget_rows(100, n_weak=None, n_gt=10, seed=0)
    assert sorted(set(weak_all) | set(gt_all)) == list(range(100)) and gt_all.tolist() == gt.tolist()
    assert set(methods.budget_rows(100, None, 5, seed=0)[1]) <= set(gt)  # more ground truth keeps the smaller set
    with pytest.raises(W2SGError, match="only 100"):
        methods.budget_rows(100, n_weak=95, n_gt=10, seed=0)


def test_training_set_mixes_weak_and_one_hot_ground_truth_rows():
    probs = np.full((10, 2), 0.5, dtype=np.float32)
    probs[:, 0] = np.linspace(0.05, 0.95, 10)
    probs[:, 1] = 1 - probs[:, 0]
    truth = [0, 1] * 5
    spec = {"method": {"name": "confidence_filter", "drop_frac": 0.5}, "budget": {"n_weak": 4, "n_gt": 3}, "seed": 0}
    ts = methods.build_training_set(spec, probs, None, truth)
    weak_rows, gt_rows = methods.budget_rows(10, 4, 3, seed=0)
    conf = methods.confidence(probs[weak_rows])
    kept_weak = sorted(weak_rows[np.argsort(conf)[2:]])  # half of the 4 weak rows: the 2 most confident stay
    assert ts.rows.tolist() == sorted(kept_weak + gt_rows.tolist()) and ts.n_dropped == 2
    for row, p, is_gt in zip(ts.rows, ts.probs, ts.ground_truth):
        assert is_gt == (row in gt_rows)
        assert np.allclose(p, np.eye(2)[truth[row]] if is_gt else probs[row])
    m = methods.training_set_metrics(ts, probs, truth)
    assert (m["n"], m["n_weak"], m["n_gt"], m["n_dropped"]) == (5, 2, 3, 2)
    y = np.array(truth)
    assert m["acc_weak_rows_before"] == np.mean(probs[weak_rows].argmax(1) == y[weak_rows])  # all 4 given rows
    assert m["acc_weak_rows"] == np.mean(probs[kept_weak].argmax(1) == y[kept_weak])
    assert m["acc"] == np.mean(ts.probs.argmax(1) == y[ts.rows])


def test_method_spec_keeps_only_the_parameters_a_method_uses():
    assert method_specs.method_spec({"name": "probe_filter", "probe": "knn", "k": 50, "C": 1.0, "contamination": 0.1}) == {
        "name": "probe_filter", "probe": "knn", "k": 50, "knn_metric": "euclidean", "contamination": 0.1,
        "feature_layer": "middle"}
    assert method_specs.method_spec({"name": "probe_relabel", "probe": "logreg", "k": 50, "C": 2.0}) == {
        "name": "probe_relabel", "probe": "logreg", "logreg_fit": "soft_bce", "l2p": 1e-3, "feature_layer": "middle"}
    assert method_specs.method_spec({"name": "probe_relabel", "probe": "logreg", "logreg_fit": "sklearn_hard",
                                     "C": 2.0, "l2p": 0.5, "feature_layer": 3, "reapply_s2s": False}) == {
        "name": "probe_relabel", "probe": "logreg", "C": 2.0, "feature_layer": 3}
    with pytest.raises(W2SGError, match="no parameter 'k'; valid: drop_frac"):
        method_specs.validate_labels({"name": "confidence_filter", "k": 5})
    with pytest.raises(W2SGError, match="unknown labels method 'knn'; valid: confidence_filter, ensemble, none"):
        method_specs.validate_labels({"name": "knn"})
    with pytest.raises(W2SGError, match="valid: knn, logreg, topo"):
        method_specs.validate_labels({"name": "probe_filter", "probe": "svm"})
    with pytest.raises(W2SGError, match=r"contamination=1.5: must be in \[0, 1\)"):
        method_specs.validate_labels({"name": "probe_filter", "contamination": 1.5})
    for bad, message in (({"knn_metric": "l1"}, "labels.knn_metric='l1': unknown; valid: euclidean, cosine"),
                         ({"logreg_fit": "hard"}, "labels.logreg_fit='hard': unknown; valid: soft_bce, sklearn_hard"),
                         ({"l2p": -1}, "labels.l2p=-1: the L2 penalty must be >= 0"),
                         ({"feature_layer": "first"}, "labels.feature_layer='first': unknown; valid: null"),
                         ({"feature_layer": -2}, "labels.feature_layer=-2: unknown"),
                         ({"reapply_s2s": "yes"}, "labels.reapply_s2s='yes': must be true or false")):
        with pytest.raises(W2SGError, match=re.escape(message)):
            method_specs.validate_labels({"name": "probe_relabel", **bad})


def test_the_earlier_probes_specs_are_their_old_specs_and_run_their_old_code():
    """knn_metric=cosine, logreg_fit=sklearn_hard and feature_layer=null give the specs (so the keys) of the probes
    before EleutherAI's were the default, and a stage with such a spec runs those probes, not the new defaults."""
    earlier = {"knn_metric": "cosine", "logreg_fit": "sklearn_hard", "feature_layer": None, "reapply_s2s": False}
    for name, extra in (("probe_relabel", {}), ("probe_filter", {"contamination": 0.1})):
        assert method_specs.method_spec({"name": name, "probe": "knn", "k": 50, **earlier, **extra}) == {
            "name": name, "probe": "knn", "k": 50, **extra}
        assert method_specs.method_spec({"name": name, "probe": "logreg", "C": 1.0, **earlier, **extra}) == {
            "name": name, "probe": "logreg", "C": 1.0, **extra}
        assert method_specs.method_spec({"name": name, "probe": "topo", "k_cc": 50, "k_zeta": 50, **earlier,
                                         **extra}) == {"name": name, "probe": "topo", "k_cc": 50, "k_zeta": 50, **extra}
    x, truth, probs, _ = _noisy_clusters(4, n=120)
    for probe, old in (("knn", lambda: methods.knn_probe(x, probs, k=50, metric="cosine")),
                       ("logreg", lambda: methods.logreg_probe(x, probs, C=1.0))):
        spec = {"method": method_specs.method_spec({"name": "probe_relabel", "probe": probe, **earlier}),
                "budget": None, "seed": 0}
        ts = methods.build_training_set(spec, probs, x, truth)
        assert np.array_equal(ts.probs, old())
        new_spec = {**spec, "method": method_specs.method_spec({"name": "probe_relabel", "probe": probe})}
        assert not np.allclose(methods.build_training_set(new_spec, probs, x, truth).probs, old())


def test_the_conf_files_defaults_are_the_methods_signature_defaults():
    """labels=<method> and a labels config naming the method alone resolve to the same parameters (so the same key)."""
    for name in ("probe_relabel", "probe_filter", "confidence_filter"):
        conf = dict(compose([f"labels={name}"]).labels)
        assert conf.pop("name") == name
        assert conf == method_specs.method_params(methods.METHODS[name])


def test_changing_a_default_parameter_value_changes_the_key_of_configs_relying_on_it(monkeypatch):
    """A config that leaves a parameter out gets the function's default, and that default is in the spec: a new
    default value is a new key, never a stored result computed with the old one."""
    relying = ["labels=probe_relabel", "~labels.k", "~labels.knn_metric"]
    before = keys(relying)
    assert before == keys(["labels=probe_relabel"])
    fn = methods.METHODS["probe_relabel"]
    names = list(method_specs.method_params(fn))
    for param, value in (("k", 40), ("knn_metric", "cosine")):
        defaults = list(fn.__defaults__)
        defaults[names.index(param)] = value
        with monkeypatch.context() as m:
            m.setattr(fn, "__defaults__", tuple(defaults))
            assert method_specs.method_spec({"name": "probe_relabel"}).get(param) == (
                None if value == "cosine" else value)  # cosine: the earlier probe's spec, without the key
            after = keys(relying)
        assert after["train_labels"] != before["train_labels"] and after["w2s"] != before["w2s"]
        assert {k: after[k] for k in ("weak", "weak_labels", "ceiling")} == {
            k: before[k] for k in ("weak", "weak_labels", "ceiling")}


# --- the probes against EleutherAI/w2s's code (w2s/probe.py, w2s/logistic.py), copied below -----------------------
# From https://github.com/EleutherAI/w2s (MIT License, Copyright (c) EleutherAI): KnnProbe.predict,
# LogisticProbe.fit/predict with Classifier (__init__, forward, fit) and Probe.filter, as published; the class
# scaffolding is unrolled into functions and the closure returns the float of the detached loss (the same number,
# without torch's warning).

def _eleuther_knn(acts, labels, k):
    """KnnProbe: fit(acts, labels) stores them; predict(acts) on the same rows."""
    import torch

    dists = torch.cdist(acts, acts)
    topk = dists.topk(k, largest=False)
    return labels[topk.indices].float().mean(dim=-1)


def _eleuther_logistic(acts, labels, l2p=1e-3, max_iter=10_000):
    """LogisticProbe(l2p).fit(acts, labels) then predict(acts): Classifier(num_classes=1).fit, sigmoid."""
    import torch
    from torch.nn.functional import binary_cross_entropy_with_logits as bce_with_logits

    acts = acts.to(torch.float32)
    linear = torch.nn.Linear(acts.shape[1], 1)
    linear.bias.data.zero_()
    linear.weight.data.zero_()
    optimizer = torch.optim.LBFGS(linear.parameters(), line_search_fn="strong_wolfe", max_iter=max_iter)
    y = labels.to(torch.get_default_dtype())

    def closure():
        optimizer.zero_grad()
        logits = linear(acts).squeeze(-1).squeeze(-1)
        loss = bce_with_logits(logits, y)
        reg_loss = loss + l2p * linear.weight.square().sum() if l2p else loss
        reg_loss.backward()
        return float(reg_loss.detach())

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return torch.sigmoid(linear(acts).squeeze(-1))


def _eleuther_filter(preds, labels, contamination):
    """Probe.filter: indices of the bottom (1 - contamination) of examples by |preds - labels|."""
    disagree = (preds - labels).abs()
    return disagree.argsort(descending=True)[int(contamination * len(disagree)):]


def _random_soft_labels(seed, n=300, h=24):
    """Random features and soft labels p(class 1) loosely tied to them: no exact ties in distance or score."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, h)).astype(np.float32)
    soft = 1 / (1 + np.exp(-(x @ rng.normal(size=h)) / 3 + rng.normal(0, 1, n)))
    return x, np.stack([1 - soft, soft], 1).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knn_probe_and_its_filter_are_eleuthers(seed):
    import torch

    x, probs = _random_soft_labels(seed)
    acts, soft = torch.from_numpy(x), torch.from_numpy(probs[:, 1])
    theirs = _eleuther_knn(acts, soft, 50).numpy()
    ours, rows = methods.probe_relabel(probs, x)  # the defaults: knn, k=50, Euclidean
    assert rows.tolist() == list(range(len(x)))
    assert np.allclose(ours[:, 1], theirs, atol=1e-6) and np.allclose(ours[:, 0], 1 - theirs, atol=1e-6)
    assert not np.allclose(methods.knn_probe(x, probs, 50, metric="cosine")[:, 1], theirs, atol=1e-3)
    new, kept = methods.probe_filter(probs, x, contamination=0.1)
    assert kept.tolist() == sorted(_eleuther_filter(torch.from_numpy(ours[:, 1]), soft, 0.1).tolist())
    assert kept.tolist() == sorted(_eleuther_filter(torch.from_numpy(theirs), soft, 0.1).tolist())
    assert np.array_equal(new, probs[kept]) and len(kept) == len(x) - int(0.1 * len(x))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logreg_probe_and_its_filter_are_eleuthers(seed):
    import torch

    x, probs = _random_soft_labels(seed)
    acts, soft = torch.from_numpy(x), torch.from_numpy(probs[:, 1])
    theirs = _eleuther_logistic(acts, soft).numpy()
    ours, _ = methods.probe_relabel(probs, x, probe="logreg")  # the defaults: soft_bce, l2p=1e-3
    assert np.allclose(ours[:, 1], theirs, atol=1e-5) and np.allclose(ours.sum(1), 1, atol=1e-6)
    assert np.abs(methods.logreg_probe(x, probs, C=1.0)[:, 1] - theirs).mean() > 0.02  # the sklearn fit differs
    strong = _eleuther_logistic(acts, soft, l2p=0.5).numpy()
    assert np.allclose(methods.probe_relabel(probs, x, probe="logreg", l2p=0.5)[0][:, 1], strong, atol=1e-5)
    assert np.abs(strong - 0.5).mean() < np.abs(theirs - 0.5).mean()  # a larger penalty: less confident
    _, kept = methods.probe_filter(probs, x, probe="logreg", contamination=0.2)
    assert kept.tolist() == sorted(_eleuther_filter(torch.from_numpy(theirs), soft, 0.2).tolist())


def test_logreg_probe_with_more_classes_fits_the_soft_labels_softmax():
    rng = np.random.default_rng(0)
    cls = np.arange(90) % 3
    x = (np.eye(3)[cls] * 4 + rng.normal(0, 1, (90, 3))).astype(np.float32)
    probs = (np.eye(3)[cls] * 0.7 + 0.1).astype(np.float32)
    probs[5] = probs[6]  # one wrong label, outvoted
    out = methods.bce_logreg_probe(x, probs)
    assert out.shape == (90, 3) and np.allclose(out.sum(1), 1, atol=1e-5)
    assert out.argmax(1).tolist() == cls.tolist()


# --- config and plan -----------------------------------------------------------------------------------------

def test_unknown_labels_option_lists_the_valid_ones():
    with pytest.raises(MissingConfigException) as e:
        compose(["labels=probe_filer"])
    for option in ("confidence_filter", "probe_relabel", "probe_filter", "ensemble", "none"):
        assert option in str(e.value)


def test_misspelt_labels_parameter_names_the_valid_ones():
    with pytest.raises(ConfigCompositionException, match="no key 'k' in 'labels'; valid keys: name, drop_frac"):
        compose(["labels=confidence_filter", "labels.k=5"])


def test_unknown_labels_option_on_the_command_line(tmp_path, store):
    proc = run_w2sg(["labels=knn", "--cfg", "job"], tmp_path, check=False)
    assert proc.returncode != 0 and "Could not find 'labels/knn'" in proc.stderr and "probe_filter" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_defaults_and_do_nothing_settings_keep_the_plan_and_every_key():
    base = keys()
    assert keys(["labels=none", "budget=none", "s2s=0", "budget.n_gt=0"]) == base
    assert list(base) == ["weak", "weak_labels", "ceiling", "w2s"]


def test_a_transform_stage_is_shared_across_losses_and_changes_only_the_w2s_side():
    base, xent, logconf = keys(), keys(["labels=probe_filter"]), keys(["labels=probe_filter", "loss=logconf"])
    assert xent["train_labels"] == logconf["train_labels"] and xent["w2s"] != logconf["w2s"]
    assert {k: xent[k] for k in base if k != "w2s"} == {k: base[k] for k in base if k != "w2s"}
    assert xent["w2s"] != base["w2s"]
    assert keys(["labels=probe_filter", "labels.C=3"]) == xent  # a knn probe does not use C
    assert keys(["labels=probe_filter", "labels.l2p=0.1", "labels.logreg_fit=sklearn_hard"]) == xent  # nor these
    assert keys(["labels=probe_filter", "labels.reapply_s2s=false"]) == xent  # s2s=0: nothing to re-apply
    assert keys(["labels=probe_filter", "labels.knn_metric=cosine"])["train_labels"] != xent["train_labels"]
    assert keys(["labels=probe_filter", "labels.probe=logreg", "labels.l2p=0.1"])["train_labels"] != keys(
        ["labels=probe_filter", "labels.probe=logreg"])["train_labels"]
    assert keys(["labels=probe_filter", "labels.k=10"])["train_labels"] != xent["train_labels"]


def test_probe_methods_read_the_strong_models_frozen_features():
    from w2sg.core.graph import Side, features_stage

    cfg = compose(["labels=probe_relabel"])
    feats = plan(cfg)["train_labels"].inputs["features"]
    assert feats.kind == "features" and feats.spec["model"]["num_layers"] == 6  # minilm_l6, the strong model
    assert feats.spec["model"]["feature_layer"] == "middle" and feats.spec["model"]["pooling"] == "mean"
    own = plan(compose(["labels=probe_relabel", "labels.feature_layer=null"]))["train_labels"].inputs["features"]
    assert own.key == features_stage(cfg, cfg.strong, Side.STRONG).key  # the strong model's own features
    third = plan(compose(["labels=probe_relabel", "labels.feature_layer=3"]))["train_labels"].inputs["features"]
    assert third.spec["model"]["feature_layer"] == 3 and third.key != feats.key != own.key
    # a decoder keeps its last-token pooling (EleutherAI/w2s's final token) at the middle layer
    dec = plan(compose(["labels=probe_relabel", "strong=tiny_random_qwen2"]))["train_labels"].inputs["features"]
    assert dec.spec["model"]["pooling"] == "last" and dec.spec["model"]["feature_layer"] == "middle"
    with pytest.raises(W2SGError, match=r"labels.feature_layer=9: .*valid: .*0..6"):
        plan(compose(["labels=probe_relabel", "labels.feature_layer=9"]))
    # probe mode: the w2s stage's own features are the probe's when both are the same layer
    probe = plan(compose(["labels=probe_relabel", "train=probe", "labels.feature_layer=null"]))
    assert probe["train_labels"].inputs["features"].key == probe["w2s"].inputs["features"].key
    middle = plan(compose(["labels=probe_relabel", "train=probe", "strong.feature_layer=middle"]))
    assert middle["train_labels"].inputs["features"].key == middle["w2s"].inputs["features"].key


def test_ensemble_members_are_weak_stages_of_their_own_and_the_runs_weak_stage():
    stages = plan(compose(["pair=tiny", "labels=ensemble", "labels.seeds=[0,1]",
                           "labels.models=[tiny_random,tiny_random_l3]"]))
    members = stages["train_labels"].inputs
    assert len(members) == 4 and members["member0"].key == stages["weak_labels"].key
    assert [stages[f"member{i}"].label for i in (1, 2, 3)] == [
        "weak:tiny_random@seed1", "weak:tiny_random_l3", "weak:tiny_random_l3@seed1"]
    assert stages["member1"].spec["model_seed"] == 1 and "model_seed" not in stages["member2"].spec
    with pytest.raises(W2SGError, match="at least 2 members"):
        plan(compose(["labels=ensemble", "labels.seeds=[0]"]))
    with pytest.raises(W2SGError, match="unknown model 'tiny'; valid: .*tiny_random"):
        plan(compose(["labels=ensemble", "labels.models=[tiny]"]))


def test_s2s_chains_strong_students_on_each_others_labels():
    stages = plan(compose(["s2s=2"]))
    assert list(stages)[4:] == ["w2s_labels", "s2s1", "s2s1_labels", "s2s2"]
    assert stages["w2s_labels"].inputs["model"] is stages["w2s"]
    assert stages["s2s1"].inputs["labels"] is stages["w2s_labels"]
    assert stages["s2s2"].inputs["labels"].inputs["model"] is stages["s2s1"]
    assert stages["s2s1"].spec == stages["w2s"].spec  # the same strong model, loss and settings: only inputs differ
    with pytest.raises(W2SGError, match="s2s=-1"):
        plan(compose(["s2s=-1"]))


@pytest.mark.parametrize("method", ["probe_relabel", "probe_filter"])
def test_s2s_reapplies_a_probe_method_to_each_iterations_labels(method):
    """As EleutherAI/w2s, whose every transfer (w2s and each s2s iteration) fits the probe on its teacher's labels."""
    stages = plan(compose([f"labels={method}", "s2s=2", "budget=mixed", "budget.n_gt=8", "budget.n_weak=16"]))
    assert list(stages)[-6:] == ["w2s_labels", "w2s_train_labels", "s2s1", "s2s1_labels", "s2s1_train_labels",
                                 "s2s2"]
    for teacher, name in (("w2s", "w2s_train_labels"), ("s2s1", "s2s1_train_labels")):
        t = stages[name]
        assert t.kind == "transform" and stages[f"s2s{1 if teacher == 'w2s' else 2}"].inputs["labels"] is t
        assert t.inputs["labels"].inputs["model"] is stages[teacher]
        assert t.inputs["features"].key == stages["train_labels"].inputs["features"].key  # the same frozen model
        assert t.spec["method"] == stages["train_labels"].spec["method"] and t.spec["budget"] is None
    assert stages["train_labels"].spec["budget"] == {"n_weak": 16, "n_gt": 8}
    once = plan(compose([f"labels={method}", "s2s=2", "labels.reapply_s2s=false"]))
    assert "w2s_train_labels" not in once and once["s2s1"].inputs["labels"] is once["w2s_labels"]
    assert once["train_labels"].key == plan(compose([f"labels={method}", "s2s=2"]))["train_labels"].key
    other = plan(compose(["labels=confidence_filter", "s2s=1"]))  # not a probe method: applied once, as before
    assert "w2s_train_labels" not in other and other["s2s1"].inputs["labels"] is other["w2s_labels"]


def test_validation_against_ground_truth_follows_the_training_sets_rows(tmp_path):
    import torch

    from w2sg.core.graph import Stage
    from w2sg.core.store import Store
    from w2sg.data.tasks import TaskData
    from w2sg.ml.train import Features
    from w2sg.run import bodies
    from w2sg.run.context import StageContext

    cfg = compose(["train.val_frac=0.5", "train.val_labels=ground_truth"])
    data = TaskData(gt=[], weak=[(f"t{i}", i % 2) for i in range(10)], test=[])
    ctx = StageContext(cfg, Store(tmp_path / "store"), data=data)
    stage = Stage("train", {"train": {"val_frac": 0.5, "val_labels": "ground_truth", "eval_every": 0,
                                      "keep_best": None}})
    rows = np.array([1, 2, 3, 5])  # odd rows have class 1
    soft = np.full((4, 2), 0.5, dtype=np.float32)
    _, _, val = bodies.validation_split(ctx, stage, Features(torch.zeros(4, 3)), soft, "weak", rows)
    perm = np.random.RandomState(0).permutation(4)
    expected = [data.weak[rows[i]][1] for i in sorted(perm[:2].tolist())]
    assert val.labels.argmax(1).tolist() == expected


# --- end to end through the real entrypoint ------------------------------------------------------------------

def test_each_labels_method_end_to_end_shares_its_stage_across_losses(tmp_path, store):
    proc = run_w2sg(["-m", *TINY, "labels=confidence_filter,probe_relabel,probe_filter", "loss=xent,logconf"],
                    tmp_path)
    runs = [json.loads(p.read_text()) for p in sorted((tmp_path / "multirun").glob("**/metrics.json"))]
    assert len(runs) == 6, proc.stdout
    by_method = {}
    for m in runs:
        t = m["train_labels"]
        by_method.setdefault(t["method"], []).append(m)
        n_half = 32  # task.n_train=64
        dropped = 3 if t["method"] in ("confidence_filter", "probe_filter") else 0  # 10% of 32, rounded
        assert (t["n"], t["n_weak"], t["n_gt"], t["n_dropped"]) == (n_half - dropped, n_half - dropped, 0, dropped)
        assert m["settings"]["labels.name"] == t["method"]
        assert Store(store).get(m["stages"]["w2s"]["key"]).read_json("metrics.json")["n_train"] == t["n"]
    assert sorted(by_method) == ["confidence_filter", "probe_filter", "probe_relabel"]
    for method, (first, second) in by_method.items():
        assert {first["loss"], second["loss"]} == {"xent", "logconf"}
        assert first["stages"]["train_labels"]["key"] == second["stages"]["train_labels"]["key"]
        assert second["stages"]["train_labels"]["reused"] and not second["stages"]["w2s"]["reused"]
    assert "labels (probe_filter)" in proc.stdout


def test_ensemble_budget_and_s2s_end_to_end(tmp_path, store):
    proc = run_w2sg([*TINY, "labels=ensemble", "labels.seeds=[0,1]", "budget=mixed", "budget.n_gt=8",
                     "budget.n_weak=16", "s2s=1"], tmp_path)
    [m] = metrics_files(tmp_path)
    assert {"member1", "member1_labels", "train_labels", "w2s_labels", "s2s1"} <= set(m["stages"])
    t = m["train_labels"]
    assert (t["method"], t["n"], t["n_weak"], t["n_gt"], t["n_dropped"]) == ("ensemble", 24, 16, 8, 0)
    assert 0 <= m["acc"]["s2s1"] <= 1 and m["s2s"]["iterations"] == 1 and m["s2s"]["acc"] == m["acc"]["s2s1"]
    if m["acc"]["ceiling"] > m["acc"]["weak"]:
        assert m["s2s"]["pgr"] == pytest.approx(
            (m["acc"]["s2s1"] - m["acc"]["weak"]) / (m["acc"]["ceiling"] - m["acc"]["weak"]))
    else:
        assert m["s2s"]["pgr"] is None and "no gap" in m["s2s"]["pgr_reason"]
    assert m["settings"]["budget.n_gt"] == 8 and m["settings"]["s2s.iterations"] == 1
    assert "acc s2s1" in proc.stdout and "PGR s2s" in proc.stdout
    from w2sg.results.collect import collect

    # a store report reads the experiment the run recorded: transformed labels and s2s stages included
    rows = collect(store)
    assert len(rows) == 1 and rows[0]["acc_w2s"] == m["acc"]["w2s"] and rows == collect(tmp_path / "outputs")


def test_a_probe_filter_reapplied_in_s2s_end_to_end(tmp_path, store):
    """EleutherAI/w2s's logistic probe, fitted on the tiny strong model's middle-layer features, filters the weak
    labels and then the w2s student's labels; the s2s student trains on the kept rows."""
    run_w2sg([*TINY, "labels=probe_filter", "labels.probe=logreg", "s2s=1"], tmp_path)
    [m] = metrics_files(tmp_path)
    assert {"train_labels", "w2s_labels", "w2s_train_labels", "s2s1"} <= set(m["stages"])
    s = Store(store)
    again = s.get(m["stages"]["w2s_train_labels"]["key"])
    kept = int(0.1 * 32)  # EleutherAI's Probe.filter: int(contamination * n) of the 32-row weak-label half
    assert len(again.read_array("rows")) == 32 - kept and again.read_json("metrics.json")["n_dropped"] == kept
    assert s.get(m["stages"]["s2s1"]["key"]).read_json("metrics.json")["n_train"] == 32 - kept
    student = s.get(m["stages"]["w2s_labels"]["key"]).read_array("probs")
    rows = again.read_array("rows")
    assert np.array_equal(again.read_array("probs"), student[rows])  # a filter keeps the student's own labels


@pytest.mark.parametrize("overrides,message", [
    (["labels=probe_filter", "labels.probe=svm"], "labels.probe='svm': unknown probe; valid: knn, logreg, topo"),
    (["budget=mixed", "budget.n_gt=40", "budget.n_weak=40"], "the weak-label half has 32 (task.n_train=64)"),
])
def test_bad_method_settings_fail_before_anything_runs(tmp_path, store, overrides, message):
    proc = run_w2sg([*TINY, *overrides], tmp_path, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not list(store.glob("stages/*"))


# --- TopoFilter (EleutherAI/w2s w2s/topo.py), against its torch code on the same data ----------------------------

def _eleuther_topo_cc(x, y, k):
    """EleutherAI/w2s topo_cc and lcc_mask, as published (torch, binary labels y in [0, 1])."""
    import torch
    from scipy.sparse.csgraph import connected_components

    def lcc_mask(adj):
        num, cmps = connected_components(adj.cpu().numpy(), connection="strong")
        return torch.from_numpy(cmps == np.bincount(cmps, minlength=num).argmax())

    dists = torch.cdist(x, x).fill_diagonal_(torch.inf)
    indices = dists.topk(k, largest=False).indices
    adj = indices.new_zeros(len(x), len(x), dtype=torch.bool)
    adj.scatter_(1, indices, True)
    cls_mask = y[:, None] > 0.5
    return lcc_mask(adj & cls_mask) | lcc_mask(adj & ~cls_mask)


def _eleuther_topofilter(x, y, contamination, k_cc, k_zeta):
    import torch

    C = _eleuther_topo_cc(x, y, k_cc)
    x_C, y_C = x[C], y[C]
    dists = torch.cdist(x_C, x_C).fill_diagonal_(torch.inf)
    indices = dists.topk(k_zeta, largest=False).indices
    dists = torch.abs(y_C - y_C[indices].float().mean(1))
    n = max(round(len(x) * contamination) - (len(x) - len(x_C)), 0)
    return np.delete(C.nonzero().squeeze(1).numpy(), dists.topk(n).indices.numpy())


def _noisy_clusters(seed, n=300, flip=0.15):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(-1.5, 1, (n // 2, 6)), rng.normal(1.5, 1, (n - n // 2, 6))]).astype(np.float32)
    y = np.array([0] * (n // 2) + [1] * (n - n // 2))
    noisy = y.copy()
    flipped = rng.choice(n, int(flip * n), replace=False)
    noisy[flipped] = 1 - noisy[flipped]
    soft = np.clip(noisy * 0.8 + 0.1 + rng.normal(0, 0.05, n), 0.01, 0.99).astype(np.float32)  # p(class 1)
    return x, y, np.stack([1 - soft, soft], 1), set(flipped.tolist())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topo_filter_keeps_the_rows_eleuthers_topofilter_keeps(seed):
    import torch

    x, _, probs, _ = _noisy_clusters(seed)
    ours = methods.topo_filter(x, probs, 0.1, k_cc=8, k_zeta=8)
    theirs = _eleuther_topofilter(torch.from_numpy(x), torch.from_numpy(probs[:, 1]), 0.1, 8, 8)
    assert ours.tolist() == sorted(theirs.tolist())
    cc = methods.topo_cc(x, probs.argmax(1), 8)
    assert cc.tolist() == _eleuther_topo_cc(torch.from_numpy(x), torch.from_numpy(probs[:, 1]), 8).tolist()


def test_topo_filter_drops_mostly_flipped_labels_and_topo_relabel_repairs_them():
    x, truth, probs, flipped = _noisy_clusters(3, n=400)
    new, kept = methods.METHODS["probe_filter"](probs, x, probe="topo", contamination=0.15, k_cc=10, k_zeta=10)
    dropped = set(range(len(x))) - set(kept.tolist())
    assert len(dropped) >= round(0.15 * len(x)) and len(dropped & flipped) >= 0.8 * len(flipped)
    assert np.array_equal(new, probs[kept])
    relabelled, rows = methods.METHODS["probe_relabel"](probs, x, probe="topo", k_cc=10, k_zeta=10)
    assert rows.tolist() == list(range(len(x)))
    assert (relabelled.argmax(1) == truth).mean() > (probs.argmax(1) == truth).mean() + 0.1


def test_the_topo_probe_spec_keeps_its_own_parameters_only():
    assert method_specs.method_spec({"name": "probe_filter", "probe": "topo", "k": 50, "C": 1.0, "k_cc": 20,
                                     "k_zeta": 30, "contamination": 0.2, "knn_metric": "euclidean"}) == {
        "name": "probe_filter", "probe": "topo", "k_cc": 20, "k_zeta": 30, "contamination": 0.2,
        "feature_layer": "middle"}
    with pytest.raises(W2SGError, match="labels.k_cc=0: need at least 1 neighbour"):
        method_specs.validate_labels({"name": "probe_filter", "probe": "topo", "k_cc": 0})
