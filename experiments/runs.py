"""The lab notebook's runs: each row trained once for a seed and kept under --out/runs by what
determines it (its weights, history and learning curve; for the study its weights at every curve
point too), each evaluation kept beside it by its decoding settings, and a pool of worker
processes for independent runs (sudoku.in_processes: any number of workers, the same numbers)."""

import dataclasses
import functools
import os

from tqdm import tqdm

import copsd
import sudoku
from model import from_pretrained, save_pretrained
from sudoku import cached, digest, regime_data

RUN_FIELDS = sudoku.PRETRAIN_FIELDS + [f.name for f in dataclasses.fields(copsd.MethodConfig)] + [
    "steps", "prompts_per_step", "lr", "opdlm_lr", "opdlm_steps", "curve_every"]


def decoding(cfg):
    """The evaluation's decoding settings, as the key of the scores kept."""
    return digest(cfg.tokens_per_step, cfg.thresholds, cfg.cache, cfg.refresh)


def scores(cfg, seed, ckpt):
    """A checkpoint's scores on the seed's test split, at the config's columns."""
    model = from_pretrained(ckpt, cfg.device)
    return sudoku.evaluate(model, regime_data(cfg, seed)["test"], cfg.columns())


def test_scores(cfg, seed, run_dir, ckpt):
    """A run's checkpoint (final, or step-N kept for the study) on the test split, kept beside
    the run by the decoding settings: a study merged from several machines needs no weights."""
    tag = "" if ckpt == "final" else f"{ckpt.split('-')[1]}-"
    return cached(os.path.join(run_dir, f"test-{tag}{decoding(cfg)}.json"),
                  functools.partial(scores, cfg, seed, os.path.join(run_dir, ckpt)),
                  list(cfg.columns()))


def evaluate_at(cfg, seed, run_dir, step):
    """A kept checkpoint of a run, on the test split."""
    return test_scores(cfg, seed, run_dir, f"step-{step}")


def curve_point(cfg, val, curve, keep, step, model):
    """sudoku.post_train's after_step: every cfg.curve_every steps the validation accuracy at 1
    and 16 tokens/step goes into `curve`, and `keep`, a directory, receives the weights."""
    if cfg.curve_every and step % cfg.curve_every == 0:
        ev = sudoku.evaluate(model, val, sudoku.columns([1, 16]))
        curve.append(dict(step=step, **{f"val{n}": ev[n]["cell_acc"] for n in ("1", "16")}))
        if keep:
            save_pretrained(os.path.join(keep, f"step-{step}"), model.cfg, model.state_dict())


def trained(cfg, seed, stages, keep=False):
    """A row trained for one seed (sudoku.train) and kept: final/ (its weights), result.json
    (each stage's history, the learning curve, the directory); keep: step-N/ at every curve
    point. Returns result.json's contents."""
    key = digest(seed, list(stages), keep, [getattr(cfg, f) for f in RUN_FIELDS],
                 [sudoku.budget(cfg, m) for m in stages], device=cfg.device)
    d = os.path.join(cfg.out, "runs", f"{'+'.join(stages)}-{key}")

    def train():
        curve = []
        after = functools.partial(curve_point, cfg, regime_data(cfg, seed)["val"], curve,
                                  d if keep else None)
        model, history = sudoku.train(cfg, seed, stages, after)
        save_pretrained(os.path.join(d, "final"), model.cfg, model.state_dict())
        return dict(history=history, curve=curve, dir=d)
    # dir: where it is now (an --out copied or merged from another machine is read in place)
    return dict(cached(os.path.join(d, "result.json"), train, ("history", "curve")), dir=d)


def run_row(cfg, seed, stages, flags, keep=False):
    """A row (stages, with its flags) for one seed: trained, then its test scores (keep: none
    yet; the study reads the test split at the kept step it chooses on validation)."""
    c = dataclasses.replace(cfg, **flags)
    result = trained(c, seed, stages, keep)
    return dict(result, test=None if keep else test_scores(c, seed, result["dir"], "final"))


def base_scores(cfg, seed, path):
    """sudoku.base_row, with the validation accuracy at 1 and 16 tokens/step."""
    val = sudoku.evaluate(from_pretrained(path, cfg.device), regime_data(cfg, seed)["val"],
                          sudoku.columns([1, 16]))
    return dict(sudoku.base_row(cfg, seed, path), val=val)


def base_row(cfg, seed, causal=False):
    """The base (causal: OPDLM's AR teacher) as a row (sudoku.base_row), with its validation
    accuracy at 1 and 16 tokens/step (the learning curves' step 0), kept beside its weights."""
    path = sudoku.ar_teacher(cfg, seed) if causal else sudoku.pretrain(cfg, seed)
    key = digest(decoding(cfg), cfg.t, cfg.s, cfg.premise_prompts, cfg.premise_K)
    return cached(os.path.join(path, f"eval-{key}.json"),
                  functools.partial(base_scores, cfg, seed, path), ("test", "val", "premise"))


def on_line(line, fn, *args):
    """fn(*args), its progress bars shown on terminal line `line` (a worker's are off)."""
    sudoku.PROGRESS.update(position=line, disable=False)
    return fn(*args)


def parallel(tasks, workers, desc, bars=False):
    """{key: fn(*args)} for tasks {key: (fn, *args)}, in `workers` processes, in the tasks'
    order, with a bar over the tasks; bars: each task's own bars too, a line each (the bases'
    pretraining: a phase of a few long tasks)."""
    if bars:
        tasks = {key: (on_line, i + 1, *task) for i, (key, task) in enumerate(tasks.items())}
    done = dict(tqdm(sudoku.in_processes(tasks, workers, quiet=True), total=len(tasks),
                     desc=desc))
    return {key: done[key] for key in tasks}
