"""Weak-label methods (labels=), label budgets (budget=) and strong-to-strong iterations (s2s=)."""

import json

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


def test_knn_probe_averages_the_labels_of_the_most_similar_rows_itself_included():
    x = np.array([[1, 0], [.9, .1], [0, 1], [.1, .9]], dtype=np.float32)
    probs = np.array([[1, 0], [.6, .4], [0, 1], [.2, .8]], dtype=np.float32)
    got = methods.knn_probe(x, probs, k=2)
    expected = np.array([[.8, .2], [.8, .2], [.1, .9], [.1, .9]])
    assert np.allclose(got, expected)
    assert np.allclose(methods.knn_probe(x, probs, k=50), probs.mean(0))  # k above the row count: all rows
    # cosine: the scale of a feature vector does not matter
    assert np.allclose(methods.knn_probe(x * np.array([[3], [1], [7], [.5]]), probs, k=2), expected)


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


@pytest.mark.parametrize("probe", ["knn", "logreg"])
def test_probe_filter_drops_the_rows_where_probe_and_label_disagree_most(probe):
    x, probs, _ = _clusters(flip=(7,))
    new, kept = methods.probe_filter(probs, x, probe=probe, k=5, C=1.0, contamination=0.1)
    assert kept.tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9]  # 10% of 10 rows: the mislabelled row 7
    assert np.array_equal(new, probs[kept])


@pytest.mark.parametrize("probe", ["knn", "logreg"])
def test_probe_relabel_replaces_the_labels_by_the_probes_predictions(probe):
    x, probs, cls = _clusters(n=20, flip=(7,))
    new, kept = methods.probe_relabel(probs, x, probe=probe, k=5, C=1.0)
    assert kept.tolist() == list(range(20))
    assert np.allclose(new.sum(1), 1.0, atol=1e-5)
    assert new.argmax(1).tolist() == cls.tolist()  # row 7's wrong label is outvoted by its cluster
    expected = methods.knn_probe(x, probs, k=5) if probe == "knn" else methods.logreg_probe(x, probs, C=1.0)
    assert np.allclose(new, expected)


def test_logreg_probe_fits_hard_labels_and_handles_a_single_class():
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
        "name": "probe_filter", "probe": "knn", "k": 50, "contamination": 0.1}
    assert method_specs.method_spec({"name": "probe_relabel", "probe": "logreg", "k": 50, "C": 2.0}) == {
        "name": "probe_relabel", "probe": "logreg", "C": 2.0}
    with pytest.raises(W2SGError, match="no parameter 'k'; valid: drop_frac"):
        method_specs.validate_labels({"name": "confidence_filter", "k": 5})
    with pytest.raises(W2SGError, match="unknown labels method 'knn'; valid: confidence_filter, ensemble, none"):
        method_specs.validate_labels({"name": "knn"})
    with pytest.raises(W2SGError, match="valid: knn, logreg, topo"):
        method_specs.validate_labels({"name": "probe_filter", "probe": "svm"})
    with pytest.raises(W2SGError, match=r"contamination=1.5: must be in \[0, 1\)"):
        method_specs.validate_labels({"name": "probe_filter", "contamination": 1.5})


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
    assert keys(["labels=probe_filter", "labels.k=10"])["train_labels"] != xent["train_labels"]


def test_probe_methods_read_the_strong_models_frozen_features():
    stages = plan(compose(["labels=probe_relabel"]))
    feats = stages["train_labels"].inputs["features"]
    assert feats.kind == "features" and feats.spec["model"]["num_layers"] == 6  # minilm_l6, the strong model
    probe = plan(compose(["labels=probe_relabel", "train=probe"]))  # probe mode: the w2s stage's own features
    assert probe["train_labels"].inputs["features"].key == probe["w2s"].inputs["features"].key


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


def test_validation_against_ground_truth_follows_the_training_sets_rows(tmp_path):
    import torch

    from w2sg.core.graph import Stage
    from w2sg.core.store import Store
    from w2sg.data.tasks import TaskData
    from w2sg.ml.train import Features
    from w2sg.run import bodies
    from w2sg.run.runner import Runner

    cfg = compose(["train.val_frac=0.5", "train.val_labels=ground_truth"])
    runner = Runner(cfg, Store(tmp_path / "store"))
    runner._data = TaskData(gt=[], weak=[(f"t{i}", i % 2) for i in range(10)], test=[])
    stage = Stage("train", {"train": {"val_frac": 0.5, "val_labels": "ground_truth", "eval_every": 0,
                                      "keep_best": None}})
    rows = np.array([1, 2, 3, 5])  # odd rows have class 1
    soft = np.full((4, 2), 0.5, dtype=np.float32)
    _, _, val = bodies.validation_split(runner, stage, Features(torch.zeros(4, 3)), soft, "weak", rows)
    perm = np.random.RandomState(0).permutation(4)
    expected = [runner._data.weak[rows[i]][1] for i in sorted(perm[:2].tolist())]
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
                                     "k_zeta": 30, "contamination": 0.2}) == {
        "name": "probe_filter", "probe": "topo", "k_cc": 20, "k_zeta": 30, "contamination": 0.2}
    # knn's spec is as before the topo probe existed: stage keys of knn and logreg runs do not change
    assert method_specs.method_spec({"name": "probe_filter", "probe": "knn", "k": 50, "C": 1.0, "k_cc": 20,
                                     "k_zeta": 30, "contamination": 0.1}) == {
        "name": "probe_filter", "probe": "knn", "k": 50, "contamination": 0.1}
    with pytest.raises(W2SGError, match="labels.k_cc=0: need at least 1 neighbour"):
        method_specs.validate_labels({"name": "probe_filter", "probe": "topo", "k_cc": 0})
