"""experiments/ (the lab notebook): its flags, the cached runs and their workers, decoding
settings over cached runs, OPDLM with its AR teacher, the study end to end, its figures redrawn
from its JSON, faults (bad values, a killed worker, corrupt cache entries, divergence)."""

import dataclasses
import glob
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import sudoku
from conftest import ROOT
from copsd import parse_config
from experiments import runs as runs_
from experiments import study
from model import from_pretrained
from test_sudoku import kill_a_worker

ROWS = ["Base", "Base-Self", "COPSD"]
FIELDS = dict(n_pretrain=200, n_distill=64, n_test=32, d_model=32, n_layers=1, n_heads=2,
              mlp_hidden_size=64, pretrain_max_steps=20, eval_every=10, prompts_per_step=4, K=2,
              premise_prompts=8, premise_K=4)  # a tiny configuration
TINY_MODEL = [arg for k, v in FIELDS.items() for arg in (f"--{k}", str(v))]
TINY = TINY_MODEL + ["--seeds", "1", "--steps", "2", "--no-readings"]


def run_cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "experiments.study", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_every_field_of_the_toy_is_a_flag_here():
    """The notebook exposes what sudoku.py keeps as plain fields, with the toy's defaults."""
    cfg = parse_config(study.StudyConfig, [])
    toy = sudoku.Config()
    for f in dataclasses.fields(sudoku.Config):
        assert getattr(cfg, f.name) == getattr(toy, f.name), f.name
    flagged = {f.name for f in dataclasses.fields(study.StudyConfig) if "help" in f.metadata}
    toys = {f.name for f in dataclasses.fields(sudoku.Config)} - {"solve", "ckpt"}  # its own
    assert toys <= flagged and not {"solve", "ckpt"} & flagged
    assert parse_config(study.StudyConfig, ["--n_pretrain", "10"]).n_pretrain == 10


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("notebook"))
    r = run_cli(*TINY, "--workers", "2", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    return out, r.stdout


def test_one_regime_gives_the_toys_numbers(smoke):
    """The notebook's one-regime table (its own cached runs, in workers) prints the numbers of
    `python sudoku.py` at the same configuration, and keeps each run's weights loadable."""
    out, stdout = smoke
    lines = stdout.splitlines()
    header = [i for i, l in enumerate(lines) if l.startswith("Model / # Tokens")]
    assert len(header) == 2 and [l.split()[0] for l in lines[header[0] + 1:][:3]] == ROWS
    res = json.load(open(os.path.join(out, "results.json")))["results"]
    assert list(res) == ROWS
    toy = sudoku.seed_rows(sudoku.Config(**FIELDS, seeds=1, steps=2, out=out), 0)  # its rows/
    for row in ROWS:
        assert res[row][0]["test"] == toy[row]["test"], row
        assert res[row][0]["history"] == toy[row]["history"], row
    assert res["Base"][0]["premise"] == toy["Base"]["premise"]
    for row in ROWS[1:]:
        m = from_pretrained(os.path.join(res[row][0]["dir"], "final"))
        assert m.cfg.d_model == 32 and m.cfg.mask_token_id == sudoku.MASK_ID


def test_opdlm_row_comes_with_its_ar_teacher(smoke):
    """OPDLM's ceiling is printed beside it: its AR teacher, decoded left to right (one token per
    step, so the same score in every column), pretrained as long as the seed's base."""
    out, _ = smoke
    r = run_cli(*TINY, "--methods", "base,opdlm", "--opdlm_steps", "2", "--workers", "2",
                "--curve_every", "1", "--out", out, "--results", "opdlm.json")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(os.path.join(out, "opdlm.json")))["results"]
    assert list(res) == ["Base", "OPDLM", "OPDLM's AR teacher"]
    assert [p["step"] for p in res["OPDLM"][0]["curve"]] == [1, 2]
    assert os.path.getsize(os.path.join(out, "opdlm.png")) > 1000  # its learning curves
    (teacher,) = res["OPDLM's AR teacher"]
    assert len({json.dumps(v, sort_keys=True) for v in teacher["test"].values()}) == 1
    assert teacher["test"]["16"]["tpf"] == 1.0 and teacher["premise"] is None
    (ar,) = [e for e in os.listdir(out) if e.startswith("ar-")]
    (base,) = [e for e in os.listdir(out) if e.startswith("base-")]
    assert from_pretrained(os.path.join(out, ar)).cfg.causal
    assert teacher["steps"] == from_pretrained(os.path.join(out, base)).cfg.extra["pretrain_steps"]


def test_workers_give_the_serial_results(smoke, tmp_path):
    """Independent runs in worker processes: the same numbers as one after the other; and a
    rerun reads its cached runs."""
    out, _ = smoke
    r = run_cli(*TINY, "--workers", "1", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    a = json.load(open(os.path.join(out, "results.json")))["results"]
    b = json.load(open(os.path.join(tmp_path, "results.json")))["results"]
    for row in ROWS:
        assert a[row][0]["test"] == b[row][0]["test"]
        assert a[row][0]["history"] == b[row][0]["history"]
    t0 = time.time()
    assert run_cli(*TINY, "--workers", "1", "--out", str(tmp_path)).returncode == 0
    assert json.load(open(os.path.join(tmp_path, "results.json")))["results"] == b
    assert time.time() - t0 < 60


def test_decoding_settings_reevaluate_the_cached_runs(smoke):
    """--cache / --thresholds change the evaluation only: the trained runs are read back, not
    retrained; threshold decoding is a column with its tokens per forward."""
    out, _ = smoke
    before = json.load(open(os.path.join(out, "results.json")))["results"]
    for flags, column in ((["--cache", "dual"], "16"), (["--cache", "dual", "--refresh", "2"], "1"),
                          (["--thresholds", "0.5"], "τ=0.5")):
        t0 = time.time()
        r = run_cli(*TINY, *flags, "--workers", "2", "--out", out, "--results", "decoding.json")
        assert r.returncode == 0, r.stderr[-2000:]
        res = json.load(open(os.path.join(out, "decoding.json")))["results"]
        assert time.time() - t0 < 60 and column in res["COPSD"][0]["test"]
        assert res["COPSD"][0]["history"] == before["COPSD"][0]["history"]  # not retrained
        assert res["COPSD"][0]["test"][column]["tpf"] >= 1


@pytest.mark.parametrize("args,word", [
    (["--thresholds", "1.5"], "threshold"), (["--thresholds", "0.9,2"], "threshold"),
    (["--cache", "dual", "--refresh", "-1"], "refresh"),
    (["--replot", "nowhere.json"], "nowhere.json"),
    (["--n_test", "0"], "--n_test 0: need >= 1"), (["--seeds", "0"], "--seeds 0"),
    (["--K", "0"], "--K 0"), (["--steps", "-1"], "--steps -1"), (["--lr", "-1"], "--lr -1.0"),
    (["--prompts_per_step", "0"], "--prompts_per_step 0"), (["--tokens_per_step", "3"], "3 tok"),
    (["--train_tokens_per_step", "0"], "--train_tokens_per_step 0"),
    (["--ablations", "--K", "1"], "--K must be >= 2"),  # COPSD rows, asked for another way
    (["--s_sweep", "--sweep_s", "0.9"], "--sweep_s 0.9"),
    (["--study", "--study_lrs", "0"], "--study_lrs"), (["--d_model", "30"], "--d_model 30"),
    (["--regime", "multi", "--most_solutions", "1"], "--most_solutions 1"),
    (["--results", "../x.json"], "--results ../x.json: a file name"),
    (["--results", "sub/x.json"], "--results sub/x.json: a file name"),
    (["--results", "/tmp/x.json"], "--results /tmp/x.json: a file name")])
def test_bad_settings_are_one_line(args, word, tmp_path, capsys):
    out = tmp_path / "out"
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        study.main([*TINY, *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert word in err and "Traceback" not in err, err
    assert not os.path.exists(out) and not os.listdir(tmp_path)  # stopped before any work
    assert time.time() - t0 < 5


def digests(folder):
    return {f: hashlib.sha1(open(os.path.join(folder, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(folder))}


def test_study_end_to_end(tmp_path):
    """--study on a tiny configuration: every regime and row (the ceiling too), each method's
    budget and learning rate chosen as the argmax of its own validation curves, the shared one
    of Table 1's rows, test scores at each, the figures (redrawn, byte for byte, from the
    study's JSON alone)."""
    args = [*TINY_MODEL, "--study", "--seeds", "1", "--study_steps", "4", "--curve_every", "2",
            "--opdlm_steps", "4", "--study_lrs", "1e-4,3e-4", "--workers", "2", "--ceiling",
            "--ceiling_steps", "10"]
    r = run_cli(*args, "--out", str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "estimated" in r.stdout.splitlines()[0]
    res = json.load(open(os.path.join(tmp_path, "study.json")))["results"]
    assert list(res) == ["minimal", "early", "low", "multi"]
    for regime, got in res.items():
        best = max(got["choice"], key=lambda c: c["val"])
        assert (got["lr"], got["steps"]) == (best["lr"], best["step"])
        assert {c["step"] for c in got["choice"]} == {2, 4} and len(got["choice"]) == 4
        table = got["table"]
        assert {"Base", study.CEILING, "COPSD", "COPSD (later, forward)", "SFT + COPSD",
                "COPSD with Z", "OPDLM", "COPSD s/T=0.1"} <= set(table)
        assert table[study.CEILING][0]["steps"] == 10  # at mask ratio 1, no early stop
        for row, runs in table.items():
            assert all(0 <= runs[0]["test"][n]["cell_acc"] <= 1 for n in ("1", "16")), row
        # the shared point's validation score is the mean over the Table 1 rows of their curves
        curves = [got["shared_table"][name][0]["curve"] for name in study.MAIN]
        at = [p for c in curves for p in c if p["step"] == got["steps"]]
        assert np.mean([(p["val1"] + p["val16"]) / 2 for p in at]) == pytest.approx(best["val"])
        # each method's own: the argmax of its own validation curve over the learning rates
        assert set(got["own"]) == set(study.MAIN) | set(study.RELATED)
        for name, mine in got["own"].items():
            top = max(mine["choice"], key=lambda c: c["val"])
            assert (mine["lr"], mine["steps"]) == (top["lr"], top["step"]), name
            (p,) = [p for p in table[name][0]["curve"] if p["step"] == mine["steps"]]
            assert (p["val1"] + p["val16"]) / 2 == pytest.approx(top["val"]), name
    folder = os.path.join(tmp_path, "figures")
    drawn = digests(folder)
    assert list(drawn) == ["curves.png", "figure2.png", "figure3.png", "parallelism.png",
                           "related.png", "table1.png"]
    # the figures regenerate from the JSON alone, byte for byte
    moved = os.path.join(tmp_path, "elsewhere")
    os.makedirs(moved)
    shutil.copy(os.path.join(tmp_path, "study.json"), moved)
    r = run_cli("--replot", os.path.join(moved, "study.json"), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert digests(os.path.join(moved, "figures")) == drawn
    # a study split over machines merges through the cache: results and test scores alone
    # (no kept checkpoints) give one regime's tables again, unchanged
    for d in glob.glob(os.path.join(tmp_path, "runs", "*", "step-*")):
        shutil.rmtree(d)
    r = run_cli(*args, "--study_regimes", "early", "--out", str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.load(open(os.path.join(tmp_path, "study.json")))["results"]
    assert list(again) == ["early"] and again["early"] == res["early"]


def test_the_premise_rows_study_and_its_replot_from_gzip(tmp_path):
    """--study --premise_rows: the low regime's premise test alone (Base, the ceiling, Table 1's
    rows, dParallel; no Table 4, Figure 3 or OPDLM rows; of the figures, only the accuracy-
    parallelism curves); its JSON, gzipped, replots to the same tables."""
    args = [*TINY_MODEL, "--study", "--premise_rows", "--study_regimes", "low", "--seeds", "1",
            "--study_steps", "2", "--curve_every", "2", "--study_lrs", "1e-4", "--ceiling",
            "--ceiling_steps", "4", "--workers", "2", "--out", str(tmp_path)]
    r = run_cli(*args, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(os.path.join(tmp_path, "study.json")))["results"]
    assert list(res) == ["low"]
    assert list(res["low"]["table"]) == ["Base", study.CEILING, *study.MAIN, "dParallel"]
    assert set(res["low"]["own"]) == {*study.MAIN, "dParallel"}
    assert os.listdir(os.path.join(tmp_path, "figures")) == ["parallelism.png"]
    packed = os.path.join(tmp_path, "study.json.gz")
    with open(os.path.join(tmp_path, "study.json"), "rb") as f, gzip.open(packed, "wb") as g:
        g.write(f.read())
    again = run_cli("--replot", packed, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    tables = r.stdout[r.stdout.index("=== regime low"):r.stdout.index("only the accuracy")]
    assert tables in again.stdout
    # two study JSONs (a study split over machines by regime) replot as one, in their order
    saved = json.load(open(os.path.join(tmp_path, "study.json")))
    saved["results"] = {"multi": saved["results"]["low"]}
    other = os.path.join(tmp_path, "other.json")
    json.dump(saved, open(other, "w"))
    both = run_cli("--replot", f"{other},{packed}", timeout=120)
    assert both.returncode == 0, both.stderr[-2000:]
    assert tables in both.stdout
    assert both.stdout.index("=== regime multi") < both.stdout.index("=== regime low")
    assert "only the accuracy-parallelism curves of low, multi" in both.stdout


def copied(smoke, dest, drop=()):
    """A copy of the notebook's --out with the runs of the rows in `drop` removed; {row: run}."""
    out, _ = smoke
    res = json.load(open(os.path.join(out, "results.json")))["results"]
    shutil.copytree(out, dest)
    runs = {row: os.path.join(dest, "runs", os.path.basename(res[row][0]["dir"]))
            for row in ROWS[1:]}
    for row in drop:
        shutil.rmtree(runs[row])
    return str(dest), res, runs


def test_a_killed_worker_ends_the_study_and_a_rerun_resumes(smoke, tmp_path):
    """A real table whose worker is SIGKILLed while runs are left stops in seconds with one line;
    a rerun keeps the runs finished before the kill and trains only the others."""
    copy, res, _ = copied(smoke, tmp_path / "out")
    before = set(glob.glob(os.path.join(copy, "runs", "*", "result.json")))

    def ready():  # an ablation kept: of three on two workers, the last is yet to run
        return set(glob.glob(os.path.join(copy, "runs", "*", "result.json"))) - before
    args = [*TINY, "--ablations", "--workers", "2", "--out", copy]
    rc, err, took = kill_a_worker([sys.executable, "-m", "experiments.study", *args], ready,
                                  tmp_path / "stderr")
    assert rc == 1 and took < 10 and "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("a worker process died (killed, or out of memory?) while running: ("
                           "'COPSD"), err[-2000:]
    done = set(glob.glob(os.path.join(copy, "runs", "*", "result.json"))) - before
    assert 1 <= len(done) <= 2
    kept = {path: os.path.getmtime(path) for path in before | done}
    study.main([*TINY, "--ablations", "--workers", "1", "--out", copy])  # rerun, in-process
    assert all(os.path.getmtime(path) == t for path, t in kept.items())
    again = json.load(open(os.path.join(copy, "results.json")))["results"]
    assert list(again) == ROWS + list(study.ABLATIONS)
    for row in ROWS:
        assert again[row][0]["test"] == res[row][0]["test"], row


def test_corrupt_cache_entries_are_made_again(smoke, tmp_path, capsys):
    """A truncated base evaluation, a garbage test score, a run result of {} and a truncated
    splits file: each recomputed with one warning, to the same numbers (the run retrained)."""
    copy, res, runs = copied(smoke, tmp_path / "out")
    cfg = parse_config(study.StudyConfig, [*TINY, "--out", copy])  # its default columns' files
    evaluation = os.path.join(sudoku.pretrain(cfg, 0), "eval-" + sudoku.digest(  # as base_row's
        runs_.decoding(cfg), cfg.t, cfg.s, cfg.premise_prompts, cfg.premise_K) + ".json")
    test = os.path.join(runs["Base-Self"], f"test-{runs_.decoding(cfg)}.json")
    key = sudoku.digest(0, 1, cfg.n_pretrain, cfg.n_distill, cfg.n_test)  # as regime_data's
    splits = os.path.join(copy, f"splits-{key}.npz")
    for path, data in {evaluation: open(evaluation, "rb").read()[:50], test: b"\xff\x00",
                       os.path.join(runs["COPSD"], "result.json"): b"{}",
                       splits: open(splits, "rb").read()[:1000]}.items():
        with open(path, "wb") as f:
            f.write(data)
    study.main([*TINY, "--workers", "1", "--out", copy])
    warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning: ")]
    assert len(warnings) == 4 and all(l.endswith("again") or l.endswith("it") for l in warnings)
    again = json.load(open(os.path.join(copy, "results.json")))["results"]
    for row in ROWS:
        assert again[row][0]["test"] == res[row][0]["test"], row
        assert again[row][0]["history"] == res[row][0]["history"], row
    assert again["Base"][0]["premise"] == res["Base"][0]["premise"]


def test_divergence_is_one_line_and_saves_nothing(smoke, tmp_path, capsys):
    """A run whose weights become non-finite (an infinite learning rate, past the check of
    --lr) stops the table with one line naming the step; its run directory is never made."""
    copy, _, runs = copied(smoke, tmp_path / "out", drop=["Base-Self", "COPSD"])
    cfg = dataclasses.replace(parse_config(study.StudyConfig, [*TINY, "--out", copy]),
                              lr=float("inf"), workers=1)
    with pytest.raises(FloatingPointError, match="^step 1 of seed 0's Base-Self: non-finite"):
        study.table(cfg)
    assert not os.path.exists(runs["Base-Self"]) and not os.path.exists(runs["COPSD"])


def test_bench_toy_table_adds_up(capsys):
    """experiments.bench_toy on the tiny model: each phase's rate x seconds is its GFLOP, the
    counts are the run's, the totals are the phases' sums over the seeds and the busy cores,
    and the floor is below the prediction."""
    import re

    from experiments import bench_toy
    with pytest.raises(SystemExit) as e:
        bench_toy.main(["--help"])
    assert e.value.code == 0 and "--base_steps" in capsys.readouterr().out
    args = ["--seeds", "3", "--cores", "2", "--steps", "3", "--resample_every", "2",
            "--bench_steps", "1", "--base_steps", "25", "--tokens_per_step", "1,4",
            "--thresholds", "0.9"]
    bench_toy.main(args, **FIELDS)
    out = capsys.readouterr().out
    table = [l.strip("|").split("|") for l in out.splitlines() if l.startswith("| ")][1:]
    names, (count, gflop, secs, rate, share) = [r[0].strip() for r in table], zip(*[
        [float(x.strip(" %")) for x in r[1:]] for r in table])
    assert names == ["pretraining step", "validation check", "premise measurement",
                     "evaluation (3 columns)", "Base-Self rollout", "Base-Self optimiser step",
                     "COPSD rollout", "COPSD optimiser step"]
    assert count == (75, 6, 3, 9, 6, 9, 6, 9)  # 3 seeds: 25 steps, 2 checks, 3 evaluations, ...
    for g, s, r in zip(gflop, secs, rate):
        assert g > 0 and r * s == pytest.approx(g, rel=0.02)
    num = {k: float(v) for k, v in re.findall(
        r"^(peak|total|floor|predicted|measured / floor): (\S+)", out, re.M)}

    def approx(x):
        return pytest.approx(x, rel=0.02)
    assert num["total"] * 1e3 == approx(sum(n * g for n, g in zip(count, gflop)))
    assert num["predicted"] == approx(sum(n * s for n, s in zip(count, secs)) / 2)
    assert num["floor"] == approx(num["total"] * 1e3 / (num["peak"] * 2))
    assert num["floor"] < num["predicted"]
    assert num["measured / floor"] == approx(num["predicted"] / num["floor"])
    assert sum(share) == pytest.approx(100, abs=1)


def constructed(shift, seeds=5, puzzles=100, noise=0, seed=0):
    """A table of Base and one row over `seeds` seeds: per puzzle 10 blanks, Base right on a
    random 0-8 of them at every column; the row `shift` more per puzzle (+ noise in -noise..
    noise); every column's calls alike (16 at 1 token/step, 4 at the threshold)."""
    rng = np.random.default_rng(seed)

    def test(right):
        col = lambda calls: dict(right=right.tolist(), blanks=[10] * puzzles,  # noqa: E731
                                 calls=[calls] * puzzles)
        return {"1": col(16), "16": col(1), "τ=0.9": col(4)}
    rows = {"Base": [], "Row": []}
    for _ in range(seeds):
        base = rng.integers(0, 9, puzzles)
        rows["Base"].append(dict(test=test(base)))
        rows["Row"].append(dict(test=test(base + shift + rng.integers(-noise, noise + 1,
                                                                       puzzles))))
    return rows


def test_paired_bootstrap_on_a_constructed_difference():
    """One more blank right per puzzle (of 10) is +10 points in every draw: mean and interval
    exactly 10; the same row is 0 everywhere; zero-mean noise gives an interval around 0 that
    a shift of 0.5 cells per puzzle (+5 points) excludes."""
    d = study.bootstrap(constructed(1), "Base", n=200)
    for col in ("1", "16"):
        assert d["Row"][col] == pytest.approx((10, 10, 10)) and d["Base"][col] == (0, 0, 0)
    assert d["Row"]["AUP"][1] > 0  # more right at the same speed: more area
    lo, hi = study.bootstrap(constructed(0, noise=1), "Base", n=500)["Row"]["16"][1:]
    assert lo < 0 < hi and hi - lo < 4
    shifted = constructed(0, noise=1)  # the same draws, every row's puzzle half a cell better
    for r in shifted["Row"]:
        for col in r["test"].values():
            col["right"] = [x + (i % 2) for i, x in enumerate(col["right"])]
    m, lo, hi = study.bootstrap(shifted, "Base", n=500)["Row"]["16"]
    assert m == pytest.approx(5, abs=1) and lo > 0


def test_an_out_or_replot_that_is_not_one_is_one_line(tmp_path, capsys):
    """--out naming a file (the toy and the notebook), --replot of a JSON with the keys of a
    results file but not its rows: exit 2, one line, before any work."""
    afile = tmp_path / "afile"
    afile.write_text("{}")
    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"config": {}, "results": {}}')
    for main, args, word in [(sudoku.main, ["--out", str(afile)], "a file, not a directory"),
                             (study.main, [*TINY, "--out", str(afile)], "a file, not a dir"),
                             (study.main, ["--replot", str(foreign)], "not a study or results")]:
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert word in err


def test_the_recipe_sweep_runs_the_recipes_it_is_asked_for(tmp_path):
    """--recipes --recipe_filter: only the named recipes' bases, a table line each with its
    steps per seed, how many reached the target, FLOPs, validation accuracy and premise gap."""
    r = run_cli(*TINY_MODEL, "--recipes", "--recipe_filter", "stratified t", "--study_regimes",
                "minimal", "--seeds", "1", "--workers", "1", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("| stratified")]
    assert [line.split(" | ")[:2] for line in lines] == [
        ["| stratified t: constant 1e-3, 128", "minimal"],
        ["| stratified t: constant 7e-4, 64", "minimal"]]
    assert "| constant" not in r.stdout and "| early:" not in r.stdout
    bases = [json.load(open(os.path.join(d, "config.json")))
             for d in glob.glob(os.path.join(tmp_path, "base-*"))]
    assert len(bases) == 2 and all(b["pretrain_steps"] <= 20 for b in bases)


def test_a_row_keeps_its_color_in_every_parallelism_panel(tmp_path):
    """The accuracy-parallelism curves of regimes with different rows: a row has one color in
    every panel (its place among all panels' rows), and the figure draws."""
    from experiments import figures
    def row(acc):
        return [dict(test={n: dict(cell_acc=acc, tpf=tpf) for n, tpf in (("1", 1), ("τ=0.5", 4))})]
    panels = {"early": {"Base": row(0.9), study.CEILING: row(0.7), "COPSD": row(0.8)},
              "low": {"Base": row(0.3), "COPSD": row(0.2)}}
    plt = figures.pyplot()
    fig, axes = plt.subplots(1, 2)
    order = dict.fromkeys(r for results in panels.values() for r in results)
    for ax, results in zip(axes, panels.values()):
        figures.parallelism(ax, results, order)
    color = [{line.get_label(): line.get_color() for line in ax.get_lines()} for ax in axes]
    assert color[0]["COPSD"] == color[1]["COPSD"] != color[0][study.CEILING]
    plt.close(fig)
    figures.plot_parallelism(panels, str(tmp_path / "p.png"))
    assert os.path.getsize(tmp_path / "p.png") > 1000
