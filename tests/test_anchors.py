"""Published figures next to ours: the shipped anchors, their verdicts, `w2sg report`'s anchors.csv, the packs."""

import csv
import hashlib
import json

import pytest
from helpers import CONF, compose
from omegaconf import OmegaConf

from w2sg.core.errors import W2SGError
from w2sg.results import anchors

ROOT = CONF.parent
SWEEPS = ROOT / "sweeps"
PARAMS = {"gpt2": 124_441_346, "gpt2_medium": 354_825_218, "gpt2_large": 774_032_642, "gpt2_xl": 1_557_614_402,
          "qwen2_5_0_5b": 494_034_562, "llama3_1_8b": 7_504_932_866, "minilm_l1": 13_841_666}
CATALOGUE = ["gpt2", "gpt2_medium", "gpt2_large", "gpt2_xl", "qwen2_5_0_5b", "llama3_1_8b"]
ELEUTHER_TASKS = ["sst2", "piqa", "hellaswag", "social_i_qa", "openbookqa", "anli", "paws", "quail", "wic", "multirc",
                  "mc_taco", "ethics_deontology", "ethics_justice", "ethics_utilitarianism", "ethics_virtue", "boolq",
                  "sciq", "cosmos_qa", "amazon_polarity", "anthropic_hh"]


def options(group):
    return {p.stem for p in (CONF / group).glob("*.yaml")}


def row(task, weak, strong, loss, seed, pgr, **settings):
    """A report row (w2sg.results.collect.collect) with only what anchors read."""
    return {"task": task, "weak": weak, "weak_params": PARAMS[weak], "strong": strong,
            "strong_params": PARAMS[strong], "loss": loss, "seed": seed, "pgr": pgr, **settings}


# --- the shipped anchors ----------------------------------------------------------------------------------

GPT2 = "gpt2|gpt2_medium|gpt2_large|gpt2_xl"


def anchor(**fields):
    """One parsed median anchor (sciq xent 0.33 over gpt2 -> gpt2_xl, per run, per-seed medians) with ``fields`` changed."""
    raw = dict.fromkeys(anchors.FIELDS, "")
    raw.update({"source": "src", "sweep": "paper_nlp", "kind": "median", "task": "sciq", "loss": "xent",
           "models": "gpt2|gpt2_xl", "metric": "pgr", "value": "0.33", "verified": "no"})
    raw.update({k: str(v) for k, v in fields.items()})
    return anchors._parse(raw, "test")


def test_shipped_anchors_hold_the_figures_read_in_their_sources():
    shipped = anchors.load()
    medians = {(a["task"], a["loss"]): a["value"] for a in shipped if a["kind"] == "median"}
    assert medians == {("sciq", "xent"): 0.3322, ("sciq", "logconf"): 0.3102, ("boolq", "xent"): 0.0484,
                       ("boolq", "logconf"): -0.3545, ("cosmos_qa", "xent"): 0.3518, ("cosmos_qa", "logconf"): 0.3693,
                       ("amazon_polarity", "xent"): 0.5757, ("amazon_polarity", "logconf"): 0.5207,
                       ("anthropic_hh", "xent"): -0.1237, ("anthropic_hh", "logconf"): 0.8061}
    for a in shipped:
        if a["kind"] == "median":  # notebooks/Plotting.ipynb's definition, over its seven models
            assert a["verified"] == "yes" and f"notebooks/{a['task']}.png" in a["note"], a
            assert (a["population"], a["averaging"], a["pooling"], a["pgr_from"]) == (
                "strong_more_accurate", "seed_mean_baselines", "pairs_and_seeds", "accuracy")
            assert a["models"][4:] == ["Qwen/Qwen-1_8B", "Qwen/Qwen-7B", "Qwen/Qwen-14B"]
    wins = [a for a in shipped if a["kind"] == "wins"]
    assert [(a["loss"], a["baseline"], a["count"], a["n"], a["p_value"], a["pgr_from"], a["verified"])
            for a in wins] == [("logconf", "xent", 16, 21, 0.079, "auroc", "no")]  # the count: not found in a source
    assert wins[0]["value"] == pytest.approx(16 / 21)
    for a in shipped:
        assert a["task"] == "*" or a["task"] in options("task"), a
        assert {a["loss"], a["baseline"] or a["loss"]} <= options("loss"), a
        assert (SWEEPS / f"{a['sweep']}.yaml").exists(), a


def test_shipped_openai_medians_are_not_comparable_with_gpt2_rows_alone():
    rows = [row("sciq", "gpt2", "gpt2_xl", "xent", s, 0.33, acc_weak=0.6, acc_ceiling=0.8, acc_w2s=0.666)
            for s in range(3)]
    (c,) = anchors.compare(rows)
    assert c["verdict"] == "not comparable" and "Qwen/Qwen-1_8B" in c["detail"]
    assert c["ours"] == pytest.approx(0.33)  # ours is still shown


@pytest.mark.parametrize("sweep", ["paper_nlp", "eleuther"])
def test_each_sweep_runs_what_its_anchors_need(sweep):
    grid = OmegaConf.load(SWEEPS / f"{sweep}.yaml").hydra.sweeper.params
    values = {k: [v.strip() for v in str(vals).split(",")] for k, vals in grid.items()}
    assert len(values["seed"]) >= 3 and set(values["loss"]) == {"xent", "logconf"}
    assert set(values["task"]) <= options("task")
    for a in (a for a in anchors.load() if a["sweep"] == sweep):
        assert a["task"] == "*" or a["task"] in values["task"]
        assert set(values["weak"]) | set(values["strong"]) <= set(a["models"])
    if sweep == "paper_nlp":
        assert values["task"] == ["sciq", "boolq", "cosmos_qa", "amazon_polarity", "anthropic_hh"]
        pairs = {(w, s) for w in values["weak"] for s in values["strong"] if PARAMS[w] < PARAMS[s]}
        assert len(pairs) == 6  # every weak < strong pair of the four GPT-2 sizes
    else:
        assert sorted(values["task"]) == sorted(ELEUTHER_TASKS)


@pytest.mark.parametrize("text,message", [
    ("source,kind\nx,median\n", "missing column(s)"),
    ("{header}\ns,paper_nlp,mean,sciq,xent,,gpt2,pgr,m,0.3,,,,,no,n\n", "kind='mean'; valid: median, wins"),
    ("{header}\ns,paper_nlp,median,sciq,xent,,gpt2,pgr,m,high,,,,,no,n\n", "value='high' is not a number"),
    ("{header}\ns,eleuther,wins,*,logconf,,gpt2,pgr,m,,16,21,,,no,n\n", "needs a baseline loss"),
    ("{header}\ns,eleuther,wins,*,logconf,xent,gpt2,pgr,m,,22,21,,,no,n\n", "0 <= count <= n"),
])
def test_a_broken_anchor_file_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text.format(header=",".join(anchors.FIELDS)))
    with pytest.raises(W2SGError) as e:
        anchors.load([path])
    assert message in str(e.value) and "bad.csv, line" in str(e.value)


# --- verdicts ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pgrs,verdict,ci", [
    ((0.30, 0.33, 0.36), "reproduced", (0.30, 0.36)),    # 0.33 inside [0.30, 0.36]
    ((0.60, 0.62, 0.64), "differs", (0.60, 0.64)),       # 0.33 outside
    ((0.10, 0.33, 0.70), "inconclusive", (0.10, 0.70)),  # holds 0.33, but 0.6 wide (> WIDE_MEDIAN)
    ((0.30, 0.33), "no CI", (None, None)),               # 2 seeds
])
def test_median_anchor_verdicts(pgrs, verdict, ci):
    rows = [row("sciq", "gpt2", "gpt2_xl", "xent", seed, p) for seed, p in enumerate(pgrs)]
    (c,) = anchors.compare(rows, anchors=[anchor()])
    assert (c["task"], c["loss"], c["theirs"], c["verdict"]) == ("sciq", "xent", 0.33, verdict)
    assert c["ours"] == pytest.approx(sorted(pgrs)[len(pgrs) // 2] if len(pgrs) == 3 else sum(pgrs) / 2)
    assert (c["ci_low"], c["ci_high"]) == (pytest.approx(ci[0]) if ci[0] is not None else None,
                                           pytest.approx(ci[1]) if ci[1] is not None else None)
    assert c["ci_level"] == (0.75 if len(pgrs) == 3 else None)  # exact order-statistic coverage of 3 seeds
    assert c["n_seeds"] == len(pgrs) and c["n_runs"] == len(pgrs)


def test_three_seeds_spread_over_a_whole_unit_reproduce_no_anchor():
    rows = [row("sciq", "gpt2", "gpt2_xl", "xent", s, p) for s, p in enumerate((-0.1, 0.3, 0.8))]
    got = [anchors.compare(rows, anchors=[anchor(value=v)])[0]["verdict"] for v in (0.05, 0.58, 0.52)]
    assert got == ["inconclusive"] * 3
    assert anchors.median_verdict(0.33, 0.1, 0.6) == "reproduced"  # 0.5 wide: still narrow enough
    assert anchors.median_verdict(0.33, 0.1, 0.61) == "inconclusive"


def test_median_is_over_the_weak_smaller_pairs_of_each_seed_then_over_seeds():
    rows = []
    for seed in range(3):
        rows += [row("boolq", "gpt2", "gpt2_medium", "logconf", seed, 0.0 + 0.1 * seed),
                 row("boolq", "gpt2", "gpt2_xl", "logconf", seed, 0.2 + 0.1 * seed),
                 row("boolq", "gpt2_large", "gpt2_xl", "logconf", seed, 0.4 + 0.1 * seed),
                 row("boolq", "gpt2_large", "gpt2_medium", "logconf", seed, 5.0),   # weak larger: left out
                 row("boolq", "gpt2_medium", "gpt2_medium", "logconf", seed, None)]  # PGR undefined: left out
    (c,) = anchors.compare(rows, anchors=[anchor(task="boolq", loss="logconf", value=-0.36, models=GPT2)])
    assert c["ours"] == pytest.approx(0.3)  # per seed 0.2, 0.3, 0.4
    assert (c["ci_low"], c["ci_high"]) == (pytest.approx(0.2), pytest.approx(0.4))
    assert c["verdict"] == "differs" and c["theirs"] == -0.36 and c["n_runs"] == 9
    assert c["detail"].startswith("3 pair(s): gpt2->gpt2_medium, gpt2->gpt2_xl, gpt2_large->gpt2_xl")


def test_openai_pooling_averages_baselines_over_seeds_keeps_strong_better_pairs_one_median():
    """A hand-made table: (weak, strong) -> per seed (acc_weak, acc_ceiling, acc_w2s)."""
    table = {("gpt2", "gpt2_medium"): [(0.60, 0.70, 0.65), (0.62, 0.72, 0.69), (0.64, 0.68, 0.60)],
             ("gpt2", "gpt2_xl"): [(0.60, 0.80, 0.70), (0.62, 0.84, 0.80), (0.64, 0.82, 0.64)],
             ("gpt2_medium", "gpt2_large"): [(0.70, 0.66, 0.70), (0.72, 0.68, 0.72), (0.68, 0.70, 0.69)]}
    rows = [row("sciq", w, s, "xent", seed, 123.0, acc_weak=a, acc_ceiling=c, acc_w2s=x)
            for (w, s), per_seed in table.items() for seed, (a, c, x) in enumerate(per_seed)]
    # seed means: gpt2 weak 0.62, gpt2_medium ceiling 0.70, gpt2_xl ceiling 0.82, gpt2_medium weak 0.70,
    # gpt2_large ceiling 0.68 < 0.70: that pair is left out. PGRs (w2s - 0.62) / (ceiling - 0.62):
    # gpt2->gpt2_medium: 0.375, 0.875, -0.25; gpt2->gpt2_xl: 0.4, 0.9, 0.1; one median of the six: 0.3875
    a = anchor(value=0.39, models=GPT2, population="strong_more_accurate", averaging="seed_mean_baselines",
               pooling="pairs_and_seeds")
    (c,) = anchors.compare(rows, anchors=[a])
    assert c["ours"] == pytest.approx(0.3875) and c["n_runs"] == 6
    # CI over the per-seed medians (0.3875, 0.8875, -0.075): min to max, coverage 0.75
    assert (c["ci_low"], c["ci_high"], c["ci_level"]) == (pytest.approx(-0.075), pytest.approx(0.8875), 0.75)
    assert c["verdict"] == "inconclusive" and "gpt2_medium->gpt2_large" not in c["detail"]


def test_rows_no_anchor_covers_give_no_comparison():
    rows = [row("sst2", "gpt2", "gpt2_xl", "xent", s, 0.3) for s in range(3)]  # a task with no median anchor
    rows += [row("sciq", "minilm_l1", "gpt2_xl", "xent", s, 0.3) for s in range(3)]  # not the anchor's models
    rows += [row("sciq", "gpt2", "gpt2_xl", "kl", s, 0.3) for s in range(3)]  # a loss with no anchor
    assert anchors.compare(rows) == []
    sciq_xent = next(a for a in anchors.load() if (a["task"], a["loss"]) == ("sciq", "xent"))
    assert not anchors.covered(sciq_xent, rows)
    assert anchors.covered(sciq_xent, [row("sciq", "gpt2", "gpt2_xl", "xent", 0, 0.3)])


def test_a_task_without_a_published_figure_shows_ours_and_says_so():
    rows = [row("anthropic_hh", "gpt2", "gpt2_xl", "xent", s, 0.1 * s) for s in range(3)]
    (c,) = anchors.compare(rows, anchors=[anchor(task="anthropic_hh", value="")])
    assert c["verdict"] == "no anchor figure" and c["theirs"] is None and c["ours"] == pytest.approx(0.1)


def test_rows_that_differ_in_a_setting_are_compared_apart():
    rows = [row("sciq", "gpt2", "gpt2_xl", "xent", s, p, **{"train.lr": lr})
            for lr, ps in ((1e-5, (0.3, 0.33, 0.36)), (1e-4, (0.6, 0.62, 0.64))) for s, p in enumerate(ps)]
    got = {c["settings"]: c["verdict"] for c in anchors.compare(rows, settings=["train.lr"], anchors=[anchor()])}
    assert got == {"train.lr=1e-05": "reproduced", "train.lr=0.0001": "differs"}


def auroc(pgr):
    """AUROC columns whose PGR is ``pgr`` (weak 0.6, ceiling 0.8); the accuracy ``pgr`` is set to -1 apart."""
    return {"auroc_weak": 0.6, "auroc_ceiling": 0.8, "auroc_w2s": 0.6 + 0.2 * pgr}


def eleuther_rows(n_tasks, logconf_wins, seeds=3):
    """AUROC PGR: xent 0.3 on every task; logconf 0.4 on the first `logconf_wins` tasks and 0.2 on the rest."""
    tasks = (ELEUTHER_TASKS + ["extra"])[:n_tasks]
    out = []
    for i, task in enumerate(tasks):
        for s in range(seeds):
            lc = (0.4 if i < logconf_wins else 0.2) + 0.01 * s + 0.001 * i
            out.append(row(task, "qwen2_5_0_5b", "llama3_1_8b", "xent", s, -1.0, **auroc(0.3 + 0.01 * s)))
            out.append(row(task, "qwen2_5_0_5b", "llama3_1_8b", "logconf", s, -1.0, **auroc(lc)))
    return out


@pytest.mark.parametrize("n_tasks,wins,verdict", [
    (21, 16, "reproduced"),  # 16/21: exact CI [0.53, 0.92] holds their 0.76
    (21, 5, "differs"),      # 5/21: CI [0.08, 0.47]
    (4, 3, "inconclusive"),  # 3/4: CI [0.19, 0.99], wider than 0.5
    (2, 2, "no CI"),         # fewer than 3 data sets
])
def test_cross_task_wins_verdicts(n_tasks, wins, verdict):
    (c,) = [c for c in anchors.compare(eleuther_rows(n_tasks, wins)) if c["kind"] == "wins"]
    assert c["verdict"] == verdict and c["ours"] == pytest.approx(wins / n_tasks)
    assert c["theirs"] == pytest.approx(16 / 21) and c["their_p"] == 0.079
    assert f"logconf beats xent on {wins} of {n_tasks}" in c["detail"] and c["n_seeds"] == 3
    if n_tasks == 21:
        from scipy.stats import wilcoxon

        diffs = [(0.4 if i < wins else 0.2) + 0.001 * i - 0.3 for i in range(21)]
        assert c["our_p"] == pytest.approx(wilcoxon(diffs, alternative="greater").pvalue)  # from AUROC PGRs
        assert c["our_sign_p"] is not None and c["our_wilcoxon_p_two_sided"] is not None
        printed = "\n".join(anchors.lines([c]))
        assert f"logconf beats xent on {wins / 21:.0%} [" in printed and "of data sets vs EleutherAI/w2s 76%" in printed
        assert "(verified no, PGR from auroc)" in printed and "vs theirs 0.079" in printed and printed.endswith(f": {verdict} ({c['detail']})")


def test_cross_task_without_auroc_is_not_comparable():
    rows = [{k: v for k, v in r.items() if not k.startswith("auroc")} for r in eleuther_rows(21, 16)]
    (c,) = [c for c in anchors.compare(rows) if c["kind"] == "wins"]
    assert c["verdict"] == "not comparable" and "auroc" in c["detail"] and c["ours"] is None


def test_cross_task_needs_both_losses():
    rows = [r for r in eleuther_rows(21, 16) if r["loss"] == "logconf"]
    assert [c for c in anchors.compare(rows) if c["kind"] == "wins"] == []


# --- w2sg report --------------------------------------------------------------------------------------------

def run_metrics(task, weak, strong, loss, seed, acc):
    """A run's metrics.json as w2sg.run.experiment writes it (see tests/test_report.py)."""
    ident = json.dumps([task, weak, strong, loss, seed])
    stages = {r: {"key": hashlib.sha256((r + ident).encode()).hexdigest()[:24], "reused": False}
              for r in ("weak", "weak_labels", "ceiling", "w2s")}
    w, c, s = acc
    return {"task": task, "loss": loss, "seed": seed, "weak": {"model": weak, "params": PARAMS[weak], "size": ""},
            "strong": {"model": strong, "params": PARAMS[strong], "size": ""},
            "acc": {"weak": w, "ceiling": c, "w2s": s}, "pgr": (s - w) / (c - w), "stages": stages,
            "settings": {"train.mode": "full", "task.n_train": 20000}}


def test_report_writes_anchors_csv_and_prints_ours_next_to_theirs(tmp_path, capsys):
    from w2sg.results.report import main

    runs = []
    for seed in range(3):
        runs += [run_metrics("sciq", "gpt2", "gpt2_xl", "xent", seed, (0.6, 0.8, 0.664 + 0.002 * seed)),  # .32-.34
                 run_metrics("sciq", "gpt2", "gpt2_xl", "logconf", seed, (0.6, 0.8, 0.72 + 0.01 * seed))]  # .6-.7
    for i, m in enumerate(runs):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "metrics.json").write_text(json.dumps(m))
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "anchors: ours [CI (coverage): over seeds for a median, 95% over data sets for a share] vs published" in out
    # openai's medians pool seven models (three Qwen with no catalogue entry): one GPT-2 pair is not comparable
    assert ("sciq             xent     median PGR 0.33 [0.32, 0.34] (0.75) vs openai/weak-to-strong 0.33 "
            "(verified yes, PGR from accuracy)") in out
    assert "(3 seeds, 3 runs): not comparable" in out
    assert "logconf  median PGR 0.65 [0.60, 0.70] (0.75) vs openai/weak-to-strong 0.31" in out
    written = {(r["task"], r["loss"]): r for r in csv.DictReader(open(tmp_path / "anchors.csv"))}
    assert set(written) == {("sciq", "xent"), ("sciq", "logconf")}
    assert {r["verdict"] for r in written.values()} == {"not comparable"}
    assert float(written["sciq", "xent"]["theirs"]) == 0.3322 and written["sciq", "xent"]["n_seeds"] == "3"
    assert written["sciq", "xent"]["verified"] == "yes" and written["sciq", "xent"]["ci_level"] == "0.75"
    assert "anchors.csv" in out.splitlines()[-1]


def test_report_without_matching_anchors_writes_no_anchors_csv(tmp_path, capsys):
    from w2sg.results.report import main

    for seed in range(3):
        (tmp_path / str(seed)).mkdir()
        (tmp_path / str(seed) / "metrics.json").write_text(
            json.dumps(run_metrics("sst2", "gpt2", "gpt2_xl", "xent", seed, (0.6, 0.8, 0.7))))
    assert main([str(tmp_path)]) == 0
    assert not (tmp_path / "anchors.csv").exists() and "anchors:" not in capsys.readouterr().out


# --- the sweep files ----------------------------------------------------------------------------------------

def test_sweep_settings_are_the_sources_settings():
    """What the packs set on top of any models (composes without the catalogue models)."""
    t = compose(["sweep=paper_nlp"])
    assert (t.task.n_train, t.task.n_test) == (20000, 10000)
    assert (t.train.mode, t.train.epochs, t.train.batch_size, t.train.max_length) == ("full", 2, 32, 1024)
    assert (t.train.lr, t.train.optimizer, t.train.schedule, t.train.warmup_frac) == (None, "adam", "cosine", 0.0)
    assert t.train.val_frac == 0.0 and t.train.weight_decay == 0.0
    e = compose(["sweep=eleuther"])
    assert (e.train.mode, e.train.lr, e.weak.lora_lr, e.strong.lora_lr) == ("lora", None, 5e-4, 8e-5)
    assert (e.train.lora.rank, e.train.lora.alpha, e.train.epochs, e.train.keep_best) == (8, 8.0, 3, "auroc")
    assert (e.task.n_train, e.task.n_test, e.train.val_frac, e.train.eval_every) == (10000, 5000, 0.1, 25)
    assert sorted(e.train.lora.target_modules) == sorted(
        ["gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj"])


def _need_catalogue():
    missing = [m for m in CATALOGUE if not (CONF / "model" / f"{m}.yaml").exists()]
    if missing:
        pytest.skip(f"catalogue model configs not in this checkout: {', '.join(missing)} (conf/model/)")


@pytest.mark.parametrize("sweep", ["paper_nlp", "eleuther"])
def test_every_task_and_pair_of_the_packs_composes_and_validates(sweep):
    """Each task with one pair, each pair with one task (the full product composes in tests/test_config.py)."""
    _need_catalogue()
    from w2sg.app.config import validate

    grid = OmegaConf.load(SWEEPS / f"{sweep}.yaml").hydra.sweeper.params
    values = {k: [v.strip() for v in str(vals).split(",")] for k, vals in grid.items()}
    pair = [f"weak={values['weak'][0]}", f"strong={values['strong'][-1]}"]
    combos = [[f"task={t}", *pair] for t in values["task"]]
    combos += [[f"task={values['task'][0]}", f"weak={w}", f"strong={s}"] for w in values["weak"]
               for s in values["strong"]]
    for combo in combos:
        cfg = compose([f"sweep={sweep}", "seed=0", "loss=logconf", *combo])
        validate(cfg)
        if sweep == "eleuther":  # each side's own learning rate, as EleutherAI's weak_lr / strong_lr
            from w2sg.core.plan import plan

            stages = plan(cfg)
            assert (stages["weak"].spec["train"]["lr"], stages["w2s"].spec["train"]["lr"]) == (5e-4, 8e-5)


def test_paper_nlp_models_carry_openais_learning_rates():
    """train.lr null: each GPT-2 trains with its own lr, which must be openai/weak-to-strong's default_lr."""
    _need_catalogue()
    expected = {"gpt2": 5e-5, "gpt2_medium": 5e-5, "gpt2_large": 1e-5, "gpt2_xl": 1e-5}  # their MODELS_DICT
    assert {m: compose([f"weak={m}"]).weak.lr for m in expected} == expected


def test_cross_task_pairs_the_baseline_with_each_setting_of_the_losss_own_parameters():
    rows = [dict(r, **({"loss.aux_coef": None} if r["loss"] == "xent" else {"loss.aux_coef": 0.5}))
            for r in eleuther_rows(21, 16)]
    rows += [dict(r, **{"loss.aux_coef": 0.25}) for r in eleuther_rows(21, 5) if r["loss"] == "logconf"]
    got = {c["settings"]: (c["verdict"], c["n_runs"])
           for c in anchors.compare(rows, settings=["loss.aux_coef"]) if c["kind"] == "wins"}
    assert got == {"loss.aux_coef=0.5": ("reproduced", 126), "loss.aux_coef=0.25": ("differs", 126)}


def test_report_rows_carry_the_aurocs_auroc_anchors_compare_on():
    from w2sg.results.collect import _row

    m = {"task": "t", "weak": {"model": "a", "params": 1}, "strong": {"model": "b", "params": 2}, "loss": "xent",
         "seed": 0, "acc": {"weak": 0.6, "ceiling": 0.8, "w2s": 0.7}, "pgr": 0.5,
         "auroc": {"weak": 0.65, "ceiling": 0.9, "w2s": 0.8}}
    row = _row(m)
    assert (row["auroc_weak"], row["auroc_ceiling"], row["auroc_w2s"]) == (0.65, 0.9, 0.8)
