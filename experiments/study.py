"""
The study behind the toy's tables and figures (experiments/README.md), over sudoku.py's code.

    python -m experiments.study --readings        # one regime: + a COPSD row per reading of Eq. 6
    python -m experiments.study --ablations --s_sweep        # + Table 4's rows and Figure 3's s/T
    python -m experiments.study --methods base,self,copsd,sft,sft+copsd,selfusion,dopsd,opdlm
    python -m experiments.study --cache dual --refresh 2     # the same runs, another sampler
    python -m experiments.study --study --out out/study      # everything, every regime (hours)
    python -m experiments.study --replot out/study/study.json   # its figures, from its results
    python -m experiments.study --device cuda --methods base,opdlm --opdlm_steps 16000 \\
        --curve_every 200                                      # OPDLM to the end of its conversion

One regime (the default): the rows of sudoku.py's table and those asked for, over --seeds, each
run kept under --out, independent runs in --workers processes. --study: every regime; Table 1's
self-distillation rows at each --study_lrs with learning curves; the budget and learning rate
chosen per regime on validation; the other rows (SFT, Table 4, Figure 3, the related methods) at
that choice; the tables and five figures.
"""

import dataclasses
import gzip
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

import sudoku
import copsd
from copsd import flag, parse_config
from experiments import figures
from experiments.runs import base_row, evaluate_at, parallel, run_row
import model as M
from model import CheckpointError

D = sudoku.Config  # the toy's defaults, which these flags expose


@dataclass
class StudyConfig(sudoku.Config):
    """the lab notebook (python -m experiments.study)"""
    workers: int = flag(0, "worker processes for independent runs (0: one per CPU core); any "
                           "number gives the same results")
    results: str = flag("results.json", "one regime's results file name under --out")
    readings: bool = flag(False, "add a COPSD row for each other reading of Eq. 6 (--objective)")
    ablations: bool = flag(False, "add Table 4's rows: w/o group normalisation, with Z, "
                                  "COPSD-Random")
    s_sweep: bool = flag(False, "add Figure 3's rows: COPSD at each --sweep_s")
    sweep_s: tuple = flag((0.1, 0.3, 0.7, 0.8), "s/T values of Figure 3 besides --s")
    study: bool = flag(False, "every regime, every row, budgets and learning rate chosen per "
                              "regime on validation, figures (hours: prints its estimate first)")
    study_lrs: tuple = flag((1e-5, 3e-5, 1e-4), "--study: the learning rates to choose from")
    study_steps: int = flag(240, "--study: the learning curves' length, the longest budget it "
                                 "can choose")
    study_regimes: tuple = flag(sudoku.REGIMES, "--study: the regimes (each is independent: "
                                "split a study over machines, then run it whole from the "
                                "merged cache)", choices=sudoku.REGIMES)
    replot: str = flag("", "print the tables and redraw the figures of these study JSONs "
                           "(comma-separated: their regimes merged), or the learning curves of "
                           "these results JSONs, and exit")
    curve_every: int = flag(0, "validation accuracy at 1 and 16 tokens/step every this many "
                               "post-training steps (learning curves; --study: 20); 0 = off")
    cache: str = flag("none", "K/V cache in evaluation (one block of 16: prefix and dual are "
                              "the same)", choices=("none", "prefix", "dual"))
    refresh: int = flag(0, "with --cache: also refresh the whole cache every this many steps of "
                           "a block (0: at the block's start only, as Fast-dLLM)")
    ceiling: bool = flag(False, "add the ceiling row: the base's architecture pretrained at "
                                "mask ratio 1 only (for decoding every cell in one forward), "
                                "--ceiling_steps steps")
    ceiling_steps: int = flag(4000, "the ceiling's pretraining steps")
    recipes: bool = flag(False, "pretrain the bases of --study_regimes x --seeds with each base "
                                "recipe and premise candidate of the grid (RECIPES, PREMISES): "
                                "steps to the target, FLOPs, validation accuracy, the premise gap")
    recipe_filter: str = flag("", "--recipes: only the recipes and premise candidates whose "
                                  "name contains this")
    premise_rows: bool = flag(False, "--study: only the rows of the premise's test (Base-Self, "
                                     "COPSD in each reading, dParallel); of the figures, only "
                                     "the accuracy-parallelism curves")
    ceiling_device: str = flag("cpu", "where the ceiling trains and is scored (cuda: one GPU "
                                      "for its long pretraining; cached apart)",
                               choices=("cpu", "cuda"))
    n_pretrain: int = flag(D.n_pretrain, "pretraining puzzles (with solutions)")
    n_distill: int = flag(D.n_distill, "self-distillation prompts (puzzles only)")
    n_test: int = flag(D.n_test, "test puzzles (the paper evaluates on 256)")
    most_solutions: int = flag(D.most_solutions, "the multi regime's puzzles keep at most this "
                                                 "many solutions")
    d_model: int = flag(D.d_model, "width of the base model")
    n_layers: int = flag(D.n_layers, "blocks of the base model")
    n_heads: int = flag(D.n_heads, "attention heads of the base model")
    mlp_hidden_size: int = flag(D.mlp_hidden_size, "MLP width of the base model")
    pretrain_lr: float = flag(D.pretrain_lr, "AdamW learning rate of pretraining (its peak)")
    pretrain_warmup: int = flag(D.pretrain_warmup, "pretraining's linear warm-up steps")
    pretrain_decay: float = flag(D.pretrain_decay, "pretraining's learning rate at "
                                                   "--pretrain_max_steps over its peak, reached "
                                                   "by a cosine after the warm-up (1: constant)")
    pretrain_batch: int = flag(D.pretrain_batch, "puzzles per pretraining step")
    base_target: float = flag(D.base_target, "stop pretraining at this validation blank-cell "
                                             "accuracy (1 token/step)")
    pretrain_max_steps: int = flag(D.pretrain_max_steps, "pretraining steps at most")
    eval_every: int = flag(D.eval_every, "pretraining steps between validation checks")
    early_t: float = flag(D.early_t, "early regime: most pretraining mask ratios are "
                                     "t ~ U(0, early_t)")
    pretrain_t: float = flag(D.pretrain_t, "every pretraining row at this mask ratio (0: as the "
                                           "regime draws it; the ceiling's is 1)")
    early_share: float = flag(D.early_share, "early regime: the share of pretraining rows with "
                                             "t ~ U(0, early_t) (the rest: U(0, 1))")
    low_t: float = flag(D.low_t, "low regime: every pretraining mask ratio is t ~ U(0, low_t)")
    pretrain_stratified: bool = flag(D.pretrain_stratified, "a pretraining batch's mask ratios "
                                     "stratified: one uniform in each of B equal intervals")
    opdlm_lr: float = flag(D.opdlm_lr, "OPDLM's learning rate (its student starts as a "
                                       "next-token predictor)")
    opdlm_steps: int = flag(D.opdlm_steps, "OPDLM's own budget (its conversion from an AR model "
                                           "ends after 16000-24000: experiments/README.md)")
    premise_prompts: int = flag(D.premise_prompts, "prompts for the self-consistency "
                                                   "measurement")
    premise_K: int = flag(D.premise_K, "completions per prompt for the self-consistency "
                                       "measurement")
    solve: str = ""  # sudoku.py's, not the notebook's
    ckpt: str = ""

    def columns(self):
        """The evaluation's columns: sudoku.columns, with --cache and --refresh."""
        return {n: dataclasses.replace(s, cache=self.cache, refresh=self.refresh)
                for n, s in super().columns().items()}


# ----------------------------------------------------------------------------------------------
# the rows: (training stages, the flags they change)

READINGS = {"COPSD (score)": dict(objective="score"), "COPSD (exact)": dict(objective="exact"),
            "COPSD (later)": dict(objective="later"),
            "COPSD (later, forward)": dict(objective="later", later_direction="forward")}
MAIN = {"Base-Self": (["self"], {}), "COPSD": (["copsd"], {})} | {
    name: (["copsd"], flags) for name, flags in READINGS.items()}
ABLATIONS = {"COPSD w/o group normalization": (["copsd"], dict(group_norm=False)),
             "COPSD with Z": (["copsd"], dict(keep_z=True)),
             "COPSD-Random": (["copsd"], dict(random_s=True))}
RELATED = {sudoku.label(m): (m.split("+"), {}) for m in
           ("sft", "sft+self", "sft+copsd", "selfusion", "dopsd", "dparallel", "d3llm")}
OTHER = RELATED | ABLATIONS | {sudoku.label("opdlm"): (["opdlm"], {})}
TEACHER = "OPDLM's AR teacher"  # a row beside OPDLM's: the accuracy its conversion can reach
CEILING = "Ceiling (trained at mask ratio 1)"  # what one-forward decoding can reach at this size


def sweep(cfg):
    return {f"COPSD s/T={s}": (["copsd"], dict(s=s)) for s in cfg.sweep_s}


def rows_of(cfg):
    """{row name: (stages, flags)} of one regime's table: the Base, --methods, the rows asked
    for (--readings, --ablations, --s_sweep) and, with OPDLM, its AR teacher."""
    rows = {"Base": ([], {})} | {sudoku.label(m, cfg.objective): (m.split("+"), {})
                                 for m in cfg.methods if m != "base"}
    if cfg.readings:
        rows |= {name: (["copsd"], flags) for name, flags in
                 ({"COPSD (paper)": dict(objective="paper")} | READINGS).items()
                 if flags != dict(objective=cfg.objective)}
    if cfg.ablations:
        rows |= ABLATIONS
    if cfg.s_sweep:
        rows |= sweep(cfg)
    if "opdlm" in cfg.methods:
        rows[TEACHER] = ([], {})
    if cfg.ceiling:
        rows[CEILING] = ([], {})
    return rows


def ceiling(cfg):
    """The ceiling's config: every pretraining row at mask ratio 1, no early stop."""
    return dataclasses.replace(cfg, pretrain_t=1.0, base_target=1.0, device=cfg.ceiling_device,
                               pretrain_max_steps=cfg.ceiling_steps)


# the base the recipes below start from, so that each name keeps its meaning: the toy's default
# before the quick one of this sweep (now the default: "around d64: 0.001, 64, 2 heads, mlp 128"
# with validation every 100 steps)
OLD_BASE = dict(d_model=128, n_heads=4, mlp_hidden_size=512, pretrain_batch=128, eval_every=50,
                pretrain_stratified=False)
# the base recipes tried (--recipes): the old one (constant 1e-3, batch 128); peak learning rate
# x batch x schedule (warm-up 30, cosine to a tenth over 300 or 600 steps); then warm-up 50,
# cosine to a tenth over 250 or 500 steps, validation every 25 steps
RECIPES = {"constant 1e-3, 128": {}} | {
    f"{lr:g}, {b}, cos {h}": dict(pretrain_lr=lr, pretrain_batch=b, pretrain_warmup=30,
                                  pretrain_decay=0.1, pretrain_max_steps=h)
    for lr in (2e-3, 4e-3) for b in (64, 128) for h in (300, 600)} | {
    f"{lr:g}, {b}, w50 cos {h}": dict(pretrain_lr=lr, pretrain_batch=b, pretrain_warmup=50,
                                      pretrain_decay=0.1, pretrain_max_steps=h, eval_every=25)
    for lr in (1e-3, 2e-3, 3e-3) for b in (64, 128, 256) for h in (250, 500)} | {
    # constant again (a cosine slows the plateau's end), validation every 25 steps; then
    # smaller models at the old recipe
    f"constant {lr:g}, {b}" + (f", w{w}" if w else ""): dict(
        pretrain_lr=lr, pretrain_batch=b, pretrain_warmup=w, eval_every=25)
    for lr, b, w in ((1e-3, 64, 0), (7e-4, 64, 0), (1.5e-3, 64, 20), (1e-3, 96, 0),
                     (1e-3, 128, 0), (1.5e-3, 128, 20), (2e-3, 128, 20))} | {
    f"constant 1e-3, {b}, {name}": dict(pretrain_batch=b, eval_every=25, **size)
    for name, size in (("d96", dict(d_model=96, mlp_hidden_size=384)),
                       ("3 layers", dict(n_layers=3)), ("mlp 256", dict(mlp_hidden_size=256)))
    for b in (64, 128)} | {
    # the old recipe and the fewest-FLOPs one, each batch's mask ratios stratified
    "stratified t: constant 1e-3, 128": dict(pretrain_stratified=True),
    "stratified t: constant 7e-4, 64": dict(pretrain_lr=7e-4, pretrain_batch=64, eval_every=25,
                                            pretrain_stratified=True)} | {
    # a quicker default run: smaller models and batches, stratified mask ratios
    f"quick: {lr:g}, {b}, {name}": dict(pretrain_lr=lr, pretrain_batch=b, eval_every=25,
                                        pretrain_stratified=True, **size)
    for name, size, lr, b in (
        ("d128", {}, 5e-4, 32), ("d96", dict(d_model=96, mlp_hidden_size=384), 1e-3, 64),
        ("d96", dict(d_model=96, mlp_hidden_size=384), 7e-4, 32),
        ("d96", dict(d_model=96, mlp_hidden_size=384), 1.5e-3, 64),
        ("d96, 3 layers", dict(d_model=96, mlp_hidden_size=384, n_layers=3), 1e-3, 64),
        ("d64", dict(d_model=64, mlp_hidden_size=256), 1e-3, 64),
        ("d64", dict(d_model=64, mlp_hidden_size=256), 2e-3, 64),
        ("d64", dict(d_model=64, mlp_hidden_size=256), 1e-3, 32))} | {
    # then around the quickest (d64, 1e-3, 64): heads, depth, width, learning rate, data
    f"around d64: {lr:g}, {b}{name}": dict(
        pretrain_lr=lr, pretrain_batch=b, eval_every=25, pretrain_stratified=True, d_model=64,
        mlp_hidden_size=256) | more
    for name, more, lr, b in (
        (", 2 heads", dict(n_heads=2), 1e-3, 64), (", 8 heads", dict(n_heads=8), 1e-3, 64),
        ("", {}, 1.5e-3, 64), ("", {}, 7e-4, 64), ("", {}, 1e-3, 48),
        (", 3 layers", dict(n_layers=3), 1e-3, 64), (", 6 layers", dict(n_layers=6), 1e-3, 64),
        (", mlp 128", dict(mlp_hidden_size=128), 1e-3, 64),
        (", 8000 puzzles", dict(n_pretrain=8000), 1e-3, 64),
        (", warm-up 50", dict(pretrain_warmup=50), 1.5e-3, 64),
        # and around the quickest of these (2 heads)
        (", 1 head", dict(n_heads=1), 1e-3, 64),
        (", 2 heads, mlp 128", dict(n_heads=2, mlp_hidden_size=128), 1e-3, 64),
        (", 2 heads", dict(n_heads=2), 1e-3, 48))}
RECIPES = {name: OLD_BASE | flags for name, flags in RECIPES.items()}
# the premise's candidates (--recipes, regime early): a base never trained above a mask ratio,
# or one under-trained at high mask ratios (stopped before the target)
PREMISES = {"early: t ~ U(0, 0.5) only": dict(early_t=0.5, early_share=1.0),
            "early: t ~ U(0, 0.3) only": dict(early_t=0.3, early_share=1.0),
            "early: t ~ U(0, 0.2) only": dict(early_t=0.2, early_share=1.0),
            "early: t ~ U(0, 0.2) only, 2000 steps": dict(early_t=0.2, early_share=1.0,
                                                          pretrain_max_steps=2000),
            "early: t ~ U(0, 0.15) only": dict(early_t=0.15, early_share=1.0),
            "early: t ~ U(0, 0.1) only": dict(early_t=0.1, early_share=1.0),
            "early: 95% t ~ U(0, 0.4)": dict(early_t=0.4, early_share=0.95),
            "early, stopped at 80%": dict(base_target=0.8),
            "early, 300 steps": dict(base_target=1.0, pretrain_max_steps=300)}
PREMISES = {name: OLD_BASE | flags for name, flags in PREMISES.items()}
# and on the default base (regime low): the mask ratios' bound, their stratification, the length
LOW_PREMISES = {"low, default base: t ~ U(0, 0.1)": {},
                "low, default base: t ~ U(0, 0.05)": dict(low_t=0.05),
                "low, default base: t ~ U(0, 0.2)": dict(low_t=0.2),
                "low, default base: not stratified": dict(pretrain_stratified=False),
                "low, default base: 1000 steps": dict(pretrain_max_steps=1000)}


def recipes(cfg):
    """Every recipe (and every premise candidate, in the early or low regime) on every regime and
    seed: the base, its steps, validation accuracy at 1 and 16 tokens/step and premise gap
    (runs.base_row), and its pretraining FLOPs; one line each, mean over seeds."""
    runs = {(name, r): dataclasses.replace(cfg, regime=r, **flags)
            for name, flags in RECIPES.items() for r in cfg.study_regimes}
    runs |= {(name, "early"): dataclasses.replace(cfg, regime="early", **flags)
             for name, flags in PREMISES.items()}
    runs |= {(name, "low"): dataclasses.replace(cfg, regime="low", **flags)
             for name, flags in LOW_PREMISES.items()}
    runs = {k: c for k, c in runs.items() if cfg.recipe_filter in k[0]}
    done = parallel({(name, r, s): (base_row, c, s) for (name, r), c in runs.items()
                     for s in range(cfg.seeds)}, cfg.workers, "bases")
    def fwd(c):  # one row's forward, the head on the response
        return M.forward_flops(sudoku.model_config(c), 1, 2 * sudoku.GEN_LEN, head=sudoku.GEN_LEN)
    print("\n| recipe | regime | steps per seed | reached | TFLOP | val 1 | val 16 | gap |\n"
          "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for (name, r), c in runs.items():
        rows = [done[(name, r, s)] for s in range(cfg.seeds)]
        steps = [row["steps"] for row in rows]
        val = {n: 100 * np.mean([row["val"][n]["cell_acc"] for row in rows]) for n in ("1", "16")}
        print(f"| {name} | {r} | {', '.join(map(str, steps))} | "
              f"{sum(x < c.pretrain_max_steps for x in steps)}/{len(steps)} | "
              f"{3 * fwd(c) * c.pretrain_batch * np.mean(steps) / 1e12:.1f} | {val['1']:.1f} | "
              f"{val['16']:.1f} | {np.mean([row['premise'] for row in rows]):.4f} |")
    return done


def row_task(cfg, seed, name, stages, flags):
    """The task (fn, *args) that gives one row for one seed."""
    if not stages:
        return base_row, ceiling(cfg) if name == CEILING else cfg, seed, name == TEACHER
    return run_row, cfg, seed, stages, flags


# ----------------------------------------------------------------------------------------------
# one regime, and the study


def table(cfg):
    """One regime's table over cfg.seeds seeds: the bases (and AR teachers) first, one process
    each, then every (row, seed) in cfg.workers processes."""
    t0, seeds, rows = time.time(), range(cfg.seeds), rows_of(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    # one process per base: they are the longest tasks, and a second wave would idle a core
    parallel({s: (sudoku.pretrain, cfg, s) for s in seeds}, max(cfg.workers, cfg.seeds),
             "bases", bars=True)
    if "opdlm" in cfg.methods:  # before the rows, two of which need each
        parallel({s: (sudoku.ar_teacher, cfg, s) for s in seeds}, max(cfg.workers, cfg.seeds),
                 "AR teachers", bars=True)
    done = parallel({(name, s): row_task(cfg, s, name, *spec) for name, spec in rows.items()
                     for s in seeds}, cfg.workers, "rows")
    results = {name: [done[(name, s)] for s in seeds] for name in rows}
    tables(results, list(cfg.columns()), cfg.regime)
    path = os.path.join(cfg.out, cfg.results)
    sudoku.atomic_json(path, dict(config=dataclasses.asdict(cfg), results=results))
    if cfg.curve_every:
        figures.plot_curves({cfg.regime: results}, os.path.splitext(path)[0] + ".png")
    if cfg.thresholds:
        figures.plot_parallelism({cfg.regime: results}, os.path.splitext(path)[0] + "-aup.png")
    print(f"\nwall time {time.time() - t0:.0f} s; results in {path}"
          + (", learning curves beside it (.png)" if cfg.curve_every else "")
          + (", accuracy-parallelism curves (-aup.png)" if cfg.thresholds else ""))
    return results


# a two-sided 95% Student t quantile by degrees of freedom (seeds - 1)
T95 = {1: 12.71, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired(results, against):
    """{row: {column: (mean, half-width)}}: each row's difference from `against` at 1 and 16
    tokens/step (% blank cells) and in AUP, paired by seed (the same base, split and puzzles),
    with a 95% t interval over seeds (none with one seed)."""
    score = sudoku.aups(results)
    def values(row):
        return np.array([[100 * r["test"][n]["cell_acc"] for n in ("1", "16")] + [a]
                         for r, a in zip(results[row], score[row])])
    out = {}
    for row in results:
        d = values(row) - values(against)
        half = T95.get(len(d) - 1, 1.96) * d.std(0, ddof=1) / np.sqrt(len(d)) if len(d) > 1 \
            else np.full(3, np.nan)
        out[row] = dict(zip(("1", "16", "AUP"), zip(d.mean(0), half)))
    return out


def bootstrap(results, against, n=2000, seed=0):
    """{row: {column: (mean, low, high)}}: each row's difference from `against` at 1 and 16
    tokens/step (% blank cells) and in AUP, its mean over seeds, and a 95% interval from a
    paired bootstrap: n times, draw the seeds and, within each, the puzzles (the same draw for
    every row: a seed's split and base are shared), recompute every row's scores (TPF: cells
    over calls; AUP's y_max from the drawn Base) and the mean difference; the interval is its
    2.5th to 97.5th percentile. Needs the per-puzzle lists of sudoku.evaluate."""
    rng = np.random.default_rng(seed)
    S, P = len(results[against]), len(results[against][0]["test"]["1"]["right"])
    draw = (rng.integers(0, S, (n, S)), rng.integers(0, P, (n, S, P)))  # seeds, then puzzles
    every = (np.arange(S)[None], np.broadcast_to(np.arange(P), (1, S, P)))  # the data as is

    def scores(row, draw):  # (draws, S) each: accuracy at 1, at 16, AUP (its y_max: Base's)
        def total(col, key):
            v = np.array([r["test"][col][key] for r in results[row]])  # (S, P)
            return v[draw[0][..., None], draw[1]].sum(-1)
        curve = [c for c in results[row][0]["test"] if c == "1" or "τ" in c]
        acc = {c: 100 * total(c, "right") / total(c, "blanks") for c in {"16", *curve}}
        tpf = {c: sudoku.GEN_LEN * P / total(c, "calls") for c in curve}
        return acc, tpf, curve

    def three(row, draw, y_max=None):
        acc, tpf, curve = scores(row, draw)
        y_max = np.max([acc[c] for c in curve], 0) if y_max is None else y_max
        aup = np.vectorize(lambda i, s: copsd.aup([(tpf[c][i, s], acc[c][i, s]) for c in curve],
                                                  y_max[i, s]))(*np.indices(y_max.shape))
        return np.stack([acc["1"], acc["16"], aup]), y_max  # (3, draws, S)

    base = "Base" if "Base" in results else against
    y_max, y_max0 = three(base, draw)[1], three(base, every)[1]
    ref, ref0 = three(against, draw, y_max)[0], three(against, every, y_max0)[0]
    out = {}
    for row in results:
        d = (three(row, draw, y_max)[0] - ref).mean(-1)  # (3, n): the mean over drawn seeds
        d0 = (three(row, every, y_max0)[0] - ref0).mean(-1)[:, 0]
        lo, hi = np.percentile(d, [2.5, 97.5], axis=1)
        out[row] = dict(zip(("1", "16", "AUP"), zip(d0, lo, hi)))
    return out


def tables(results, cols, regime):
    """sudoku.py's tables, then each row's paired difference from Base and from Base-Self with
    its 95% interval: the paired bootstrap where the results hold per-puzzle scores, else the
    t interval over seeds."""
    sudoku.print_premise(regime, results["Base"])
    sudoku.report(results, cols, regime)
    if not {"1", "16"} <= set(cols) or not any("τ" in n for n in cols):
        return
    width, puzzles = max(len(r) for r in results) + 2, "right" in results["Base"][0]["test"]["1"]
    for against in ("Base", "Base-Self"):
        if against not in results:
            continue
        print(f"\n{regime}: difference from {against}, paired, mean and 95% interval ("
              + ("bootstrap over seeds and puzzles" if puzzles else "t over seeds")
              + "; * where it excludes 0)")
        print("Model".ljust(width) + "".join(f"{n:>24}" for n in ("1", "16", "AUP")))
        diffs = bootstrap(results, against) if puzzles else {
            row: {c: (m, m - h, m + h) for c, (m, h) in d.items()}
            for row, d in paired(results, against).items()}
        for row, diff in diffs.items():
            print(row.ljust(width) + "".join(
                f"{m:+7.2f} [{lo:+7.2f}, {hi:+7.2f}]{'*' if lo > 0 or hi < 0 else ' '}".rjust(24)
                for m, lo, hi in diff.values()))


def choose(curves):
    """A budget and learning rate on validation: the (lr, step) whose accuracy,
    the mean of 1 and 16 tokens/step, averaged over the rows and seeds, is highest.
    curves: {lr: [curve of each (row, seed)]}: one row's (its own choice), or several
    (a choice shared by them)."""
    score_of = {}
    for lr, runs in curves.items():
        for point in zip(*runs):
            score_of[(lr, point[0]["step"])] = np.mean([p["val1"] + p["val16"] for p in point]) / 2
    return max(score_of, key=score_of.get), score_of


def estimate(cfg, n_runs):
    """Seconds the study should take: a few post-training steps and one validation pass of a
    random model, timed here, scaled to every run's steps and curve points."""
    torch.manual_seed(0)
    model = sudoku.LLaDA(sudoku.model_config(cfg))
    data = sudoku.make_splits(0, 0, 64, 0, n_val=256)
    c = dataclasses.replace(cfg, steps=cfg.resample_every or 8)
    t = time.time()
    sudoku.post_train(model, c, data, "copsd", 0)
    per_step = (time.time() - t) / c.steps
    t = time.time()
    sudoku.evaluate(model, data["val"], sudoku.columns([1, 16]))
    per_point = time.time() - t
    runs = n_runs * (cfg.steps * per_step + cfg.steps // (cfg.curve_every or 20) * per_point)
    bases = 3 * cfg.seeds * 600 * per_step / 4  # ~600 pretraining steps, a quarter the cost
    return (runs + bases) / max(cfg.workers, 1)


def chosen(regimes, cfg, runs, names):
    """Each regime's choice on validation from the runs {(regime, lr, row, seed): result} of the
    rows `names` (Table 1's: the shared choice; one method: its own): {regime: dict(lr, steps,
    choice: every point tried with its score)}."""
    out = {}
    for r in regimes:
        (lr, step), score_of = choose({lr: [runs[(r, lr, name, s)]["curve"] for name in names
                                            for s in range(cfg.seeds)] for lr in cfg.study_lrs})
        out[r] = dict(lr=lr, steps=step, choice=[dict(lr=a, step=b, val=v)
                                                 for (a, b), v in score_of.items()])
    return out


def load(path):
    """A study's or a run's saved JSON (or .json.gz): (its config, its results); a one-line
    error if not."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
            saved = json.load(f)
        return saved["config"], saved["results"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        sudoku.fail(f"--replot {path}: not a study or results JSON ({e})")


def study_tables(results):
    """A study's tables, each regime's: every method at its own choice, then at the shared one
    (results: {regime: dict(lr, steps, own, table, shared_table)})."""
    for r, res in results.items():
        cols = list(res["table"]["Base"][0]["test"])
        print(f"\n=== regime {r}: each method at its own choice on validation ===")
        print("\n".join(f"{name}: lr {c['lr']:g}, {c['steps']} steps"
                        for name, c in res["own"].items()))
        tables(res["table"], cols, r)
        print(f"\n=== regime {r}: all at the shared choice of Table 1's rows: lr "
              f"{res['lr']:g}, {res['steps']} steps ===")
        tables(res["shared_table"], cols, r)


def replot(paths):
    """One or more study JSONs (comma-separated: their regimes merged, as a study split over
    machines): the tables, five figures (into figures/ beside the first; a panel per regime
    that has every row) and the accuracy-parallelism curves (a panel per regime); or the
    tables, curves and accuracy-parallelism curves of one or more results JSONs (a panel each,
    beside the first: .png and -aup.png, or parallelism.png)."""
    saved = {path: load(path) for path in paths.split(",")}
    (config, results), first = next(iter(saved.values())), next(iter(saved))
    if all(r and all(isinstance(v, dict) and "table" in v for v in r.values())
           for _, r in saved.values()):
        merged = {r: v for _, res in saved.values() for r, v in res.items()}
        study_tables(merged)
        full = {r: v for r, v in merged.items() if not set(MAIN | RELATED) - set(v["table"])}
        if len(full) < len(merged):
            print(f"\nonly the accuracy-parallelism curves of "
                  f"{', '.join(sorted(set(merged) - set(full)))}: the five figures need every "
                  "row (--premise_rows ran only some)")
        out = os.path.join(os.path.dirname(first), "figures")
        if full:
            figures.plot(full, out, config["s"], config["sweep_s"], list(MAIN), list(OTHER))
        # every regime with the rows it has, less SFT + X (whose own choice is SFT itself)
        keep = {"Base", CEILING, *MAIN} | {n for n, (stages, _) in RELATED.items()
                                           if len(stages) == 1}
        os.makedirs(out, exist_ok=True)
        figures.plot_parallelism({r: {k: v for k, v in res["table"].items() if k in keep}
                                  for r, res in merged.items()},
                                 os.path.join(out, "parallelism.png"))
        return
    regimes = [c["regime"] for c, _ in saved.values()]
    panels = {(c["regime"] if regimes.count(c["regime"]) == 1 else
               f"{c['regime']} ({os.path.basename(path)})"): r for path, (c, r) in saved.items()}
    for title, table in panels.items():  # the tables too: a README's numbers from the JSON
        tables(table, list(table["Base"][0]["test"]), title)
    if all(r[0].get("curve") or not r[0]["history"] for r in results.values()):
        figures.plot_curves(panels, os.path.splitext(first)[0] + ".png")
    figures.plot_parallelism(panels, os.path.splitext(first)[0] + "-aup.png" if len(saved) == 1
                             else os.path.join(os.path.dirname(first), "parallelism.png"))


def study(cfg):
    """Every regime: the bases and their premise; Table 1's rows and the related methods at each
    --study_lrs with learning curves; on validation, each method's own (lr, steps) and the
    shared one of Table 1's rows (choose); the test split at each; the other rows (Table 4,
    Figure 3, OPDLM) at the shared choice; the tables (each method at its own choice, then all
    at the shared one); the figures."""
    t0, cfg = time.time(), dataclasses.replace(cfg, steps=cfg.study_steps)
    regimes = {r: dataclasses.replace(cfg, regime=r, objective="paper",
                                      curve_every=cfg.curve_every or 20)
               for r in cfg.study_regimes}
    seeds, rows, rest = range(cfg.seeds), MAIN | RELATED, ABLATIONS | sweep(cfg) | {
        sudoku.label("opdlm"): (["opdlm"], {})}
    if cfg.premise_rows:
        rows, rest = MAIN | {"dParallel": RELATED["dParallel"]}, {}
    n_runs = len(regimes) * cfg.seeds * (len(rows) * len(cfg.study_lrs) + len(rest))
    print(f"the study: {len(regimes)} regimes x {cfg.seeds} seeds, {n_runs} runs of up to "
          f"{cfg.steps} steps" + ("" if cfg.premise_rows else f" (OPDLM {cfg.opdlm_steps})")
          + "; estimated "
          f"{estimate(cfg, n_runs) / 3600:.1f} h on {cfg.workers} worker(s)")
    every = [(r, c, s) for r, c in regimes.items() for s in seeds]
    parallel({(r, s): (sudoku.pretrain, c, s) for r, c, s in every}, cfg.workers, "bases",
             bars=True)
    bases = parallel({(r, s): (base_row, c, s) for r, c, s in every}, cfg.workers, "premise")
    ceilings = parallel({(r, s): (base_row, ceiling(c), s) for r, c, s in every},
                        cfg.workers, "ceilings") if cfg.ceiling else {}
    runs = parallel({(r, lr, name, s): (run_row, dataclasses.replace(c, lr=lr), s, *spec, True)
                     for r, c in regimes.items() for lr in cfg.study_lrs
                     for name, spec in rows.items() for s in seeds}, cfg.workers,
                    "the methods, each lr")
    shared = chosen(regimes, cfg, runs, MAIN)
    own = {(r, name): chosen({r: c}, cfg, runs, [name])[r] for r, c in regimes.items()
           for name in rows}
    tests = parallel({(r, name, s, w): (evaluate_at, regimes[r], s, runs[(
        r, choice["lr"], name, s)]["dir"], choice["steps"]) for r in regimes for name in rows
        for s in seeds for w, choice in (("own", own[(r, name)]), ("shared", shared[r]))},
        cfg.workers, "test at the choices")
    others = parallel({(r, name, s): (run_row, dataclasses.replace(
        c, lr=shared[r]["lr"], steps=shared[r]["steps"]), s, *spec) for r, c in regimes.items()
        for name, spec in rest.items() for s in seeds}, cfg.workers, "the other rows")
    results = {}
    for r in regimes:
        def at_choice(w):
            return {name: [dict(runs[(r, (own[(r, name)] if w == "own" else shared[r])["lr"],
                                      name, s)], test=tests[(r, name, s, w)]) for s in seeds]
                    for name in rows}
        base = {"Base": [bases[(r, s)] for s in seeds]} | (
            {CEILING: [ceilings[(r, s)] for s in seeds]} if cfg.ceiling else {})
        rest_rows = {name: [others[(r, name, s)] for s in seeds] for name in rest}
        results[r] = dict(shared[r], own={name: own[(r, name)] for name in rows},
                          table=base | at_choice("own") | rest_rows,
                          shared_table=base | at_choice("shared") | rest_rows)
    path = os.path.join(cfg.out, "study.json")
    sudoku.atomic_json(path, dict(config=dataclasses.asdict(cfg), results=results))
    replot(path)  # the tables and figures, from the JSON
    print(f"\nwall time {(time.time() - t0) / 3600:.2f} h; results in {path}, figures in "
          f"{cfg.out}/figures")
    return results


POSITIVE = ["n_pretrain", "n_distill", "n_test", "d_model", "n_layers", "n_heads",
            "mlp_hidden_size", "pretrain_batch", "pretrain_max_steps", "eval_every",
            "premise_prompts", "premise_K", "opdlm_steps", "study_steps"]


def check(cfg):
    """sudoku.check over the stages of every row to run, with the notebook's own flags."""
    specs = (MAIN | OTHER | sweep(cfg) if cfg.study else rows_of(cfg)).values()
    rates = [cfg.pretrain_lr, cfg.opdlm_lr, *cfg.study_lrs]
    sudoku.check(cfg, {m for stages, _ in specs for m in stages}, [why for bad, why in [
        *((getattr(cfg, f) < 1, f"--{f} {getattr(cfg, f)}: need >= 1") for f in POSITIVE),
        (cfg.d_model % (2 * max(cfg.n_heads, 1)), f"--d_model {cfg.d_model}: need a multiple "
         f"of 2 x --n_heads {cfg.n_heads} (an even head size, for RoPE)"),
        ("multi" in (cfg.study_regimes if cfg.study else [cfg.regime]) and cfg.most_solutions < 2,
         f"--most_solutions {cfg.most_solutions}: the multi regime needs >= 2"),
        (not all(0 < r < float("inf") for r in rates),
         f"learning rates {rates} (--pretrain_lr, --opdlm_lr, --study_lrs): need finite, > 0"),
        (not (0 < cfg.base_target <= 1 and 0 < cfg.early_t <= 1 and 0 <= cfg.early_share <= 1
              and 0 < cfg.low_t <= 1), "need 0 < --base_target <= 1, 0 < --early_t <= 1, "
         "0 < --low_t <= 1 and 0 <= --early_share <= 1"),
        ((cfg.study or cfg.s_sweep) and not all(0 <= s < cfg.t for s in cfg.sweep_s),
         f"--sweep_s {','.join(map(str, cfg.sweep_s))}: each s/T in [0, --t {cfg.t})"),
        (cfg.curve_every < 0, f"--curve_every {cfg.curve_every}: need >= 0 (0: off)"),
        (cfg.workers < 0, f"--workers {cfg.workers}: need >= 0 (0: one per CPU core)"),
        (cfg.results in ("", ".", "..") or os.path.basename(cfg.results) != cfg.results,
         f"--results {cfg.results}: a file name (written inside --out), not a path")] if bad])


def main(argv=None):
    cfg = parse_config(StudyConfig, argv, description=__doc__)
    if cfg.replot:
        try:
            return replot(cfg.replot)
        except (KeyError, IndexError, TypeError, AttributeError) as e:  # the right keys, not
            sudoku.fail(f"--replot {cfg.replot}: not a study or results JSON ({e!r})")  # rows
    check(cfg)
    cfg = dataclasses.replace(cfg, workers=cfg.workers or os.cpu_count() or 1)
    torch.set_num_threads(1)  # one thread per run, serial or parallel: the same numbers
    try:
        recipes(cfg) if cfg.recipes else study(cfg) if cfg.study else table(cfg)
    except (FloatingPointError, CheckpointError) as e:  # diverged; a checkpoint that won't load
        sudoku.fail(e)


if __name__ == "__main__":
    main()
