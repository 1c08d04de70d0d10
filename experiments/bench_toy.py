"""
The toy's floor, counted as nanoGPT counts MFU: the model FLOPs of the default run (`python
sudoku.py`), phase by phase, against what this CPU does with them.

    python -m experiments.bench_toy                       # --seeds 3 on this machine's cores
    python -m experiments.bench_toy --base_steps 800 --cores 16

Each phase of a seed is counted from its shapes (model.forward_flops, model.sampler_flops; a
backward = 2 forwards; the head on the response, as the losses' start=P) and timed with sudoku.py's
and copsd.py's own functions on a random-init model of the toy's shape, on one thread as a seed's
process runs. The peak: float32 matmuls on one thread. The run: --seeds such processes on
min(--cores, --seeds) cores; its floor is its FLOPs over (peak x cores), its prediction each phase
at its measured rate. Not counted: the data splits, AdamW's update, checkpoints. Threshold
columns decode one token per forward here (a random model's; a trained base needs fewer). On a
CPU shared with other jobs the seconds are upper bounds.
"""

import dataclasses
import itertools
import os
import time

import torch

import copsd
import model as M
import sudoku
from copsd import flag
from sudoku import GEN_LEN as L, MASK_ID, PROMPT_LEN as P


@dataclasses.dataclass
class BenchConfig(sudoku.Config):
    """the benchmark (python -m experiments.bench_toy)"""
    base_steps: int = flag(700, "pretraining steps per base (where bases stop on this machine)")
    cores: int = flag(os.cpu_count() or 1, "cores the seeds' processes share")
    bench_steps: int = flag(3, "timed pretraining and optimiser steps (after one warm-up step)")


def timed(fn, n=1):
    """Mean seconds of n calls of fn."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def peak_flops(sizes=(256, 512, 1024, 2048), repeats=5):
    """One core's float32 matmul rate (FLOP/s): the best square matmul, 2n^3 FLOPs each."""
    mats = [(torch.randn(n, n), torch.randn(n, n)) for n in sizes]
    return max(2 * len(a) ** 3 / timed(lambda: a @ b) for a, b in mats for _ in range(repeats))


def fwd(c, rows, backward=False):
    """A forward of `rows` prompts + responses, the head on the response (x3: its backward)."""
    return (3 if backward else 1) * M.forward_flops(c, rows, P + L, head=L)


def gen(c, sp, rows):
    """Sampler sp decoding `rows` responses: no cache; at a threshold, 1 token per forward."""
    n = [sp.block_length if sp.threshold else sp.steps // sp.n_blocks] * sp.n_blocks
    return M.sampler_flops(c, sp, rows, P, dict(forwards=n, full=n))


def trainer(cfg, lr=0.0, loss_fn=None):
    """A random-init model of the toy's shape (seed 0: no prediction of it is confident), and
    one AdamW step of loss_fn(model), as sudoku.optimiser_step takes it."""
    torch.manual_seed(0)
    model = M.LLaDA(sudoku.model_config(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    return model, lambda: sudoku.optimiser_step(model, opt, loss_fn(model.train()), "bench")


def post_phases(cfg, method, prompts, g):
    """A row of sudoku.post_train: its rollout (resample_every x prompts_per_step prompts x K
    responses) and an optimiser step on a slice of it, as (name, count, FLOPs, seconds)."""
    lr, steps = sudoku.budget(cfg, method)
    c, window = sudoku.model_config(cfg), cfg.resample_every or steps
    rows = cfg.prompts_per_step * cfg.K
    sp = dataclasses.replace(sudoku.SAMPLER, temperature=cfg.temperature).at(
        cfg.train_tokens_per_step)
    options, at, ro = copsd.loss_options(method, cfg, sp), itertools.count(), []

    def loss(model):  # the next step's slice of the rollout
        k = next(at) % window
        part = ro[0][k * rows:(k + 1) * rows]
        return copsd.METHODS[method].loss(model, part, MASK_ID, generator=g, **options)[0]
    model, step = trainer(cfg, lr, loss)
    idx = torch.randint(len(prompts), (window * cfg.prompts_per_step,), generator=g)
    secs = timed(lambda: ro.append(copsd.make_rollout(method, model.eval(), prompts[idx], None,
                                                      MASK_ID, sp, cfg, generator=g)))
    two_views = copsd.METHODS[method].data == "calibrated"  # COPSD's calibration forward
    step()  # warm-up
    name = sudoku.label(method, cfg.objective)
    return [(f"{name} rollout", len(range(0, steps, window)),
             gen(c, sp, window * rows) + two_views * fwd(c, 2 * window * rows), secs),
            (f"{name} optimiser step", steps, fwd(c, rows, True), timed(step, cfg.bench_steps))]


def phases(cfg):
    """Each phase of one seed's run: (name, count, FLOPs each, seconds each measured)."""
    c, g = sudoku.model_config(cfg), torch.Generator().manual_seed(0)
    # distillation prompts: a pool of any size (a rollout draws its prompts from it at random)
    data = sudoku.make_splits(0, cfg.pretrain_batch, 8 * cfg.prompts_per_step, cfg.n_test,
                              most=cfg.most_solutions if cfg.regime == "multi" else 1)
    (puzzles, sols), (val, _), test = data["pretrain"], data["val"], data["test"]
    seq = torch.cat([sudoku.encode_prompt(puzzles), torch.as_tensor(sols)], 1)
    # sudoku.pretrain's step; its regime's mask ratios change no shape: U(0, 1) here
    model, step = trainer(cfg, cfg.pretrain_lr, lambda m: copsd.mdm_loss(m, copsd.Rollout(
        seq[torch.randint(len(seq), (cfg.pretrain_batch,), generator=g)], None, P), MASK_ID,
        generator=g)[0])
    step()  # warm-up
    out = [("pretraining step", cfg.base_steps, fwd(c, cfg.pretrain_batch, True),
            timed(step, cfg.bench_steps))]
    model, _ = trainer(cfg)
    out.append(("validation check", cfg.base_steps // cfg.eval_every,
                gen(c, sudoku.SAMPLER, len(val)),
                timed(lambda: sudoku.evaluate(model, data["val"], sudoku.columns([1])))))
    n, k = len(val[:cfg.premise_prompts]), cfg.premise_K
    # its sample, p(.|y_t), the n k completions (at most L forwards each) and their p̃
    out.append(("premise measurement", 1,
                gen(c, sudoku.SAMPLER.at(2), n) + fwd(c, n) + (L + 1) * fwd(c, n * k),
                timed(lambda: sudoku.self_consistency(model, val[:n], cfg.t, cfg.s, k, 0))))
    methods = [m for m in cfg.methods if m != "base"]
    out.append((f"evaluation ({len(cfg.columns())} columns)", 1 + len(methods),
                sum(gen(c, sp, len(test[0])) for sp in cfg.columns().values()),
                timed(lambda: sudoku.evaluate(model, test, cfg.columns()))))
    prompts = sudoku.encode_prompt(data["distill"][0])
    return out + [p for m in methods for p in post_phases(cfg, m, prompts, g)]


def report(cfg, rows, peak):
    """The table, then the run's totals: cfg.seeds single-thread processes on the cores."""
    busy, seeds = min(cfg.cores, cfg.seeds), cfg.seeds
    total = seeds * sum(n * f for _, n, f, _ in rows)
    spent = seeds * sum(n * s for _, n, _, s in rows)  # seconds, one core
    print(f"peak: {peak / 1e9:.4g} GFLOP/s per core (float32 square matmuls, one thread)\n\n"
          "| phase | count | GFLOP each | seconds each measured | GFLOP/s achieved | share of "
          "predicted run time |\n|---|---|---|---|---|---|")
    for name, n, f, s in rows:
        print(f"| {name} | {seeds * n} | {f / 1e9:.4g} | {s:.4g} | {f / s / 1e9:.4g} | "
              f"{100 * seeds * n * s / spent:.1f}% |")
    floor, predicted = total / (peak * busy), spent / busy
    print(f"\ntotal: {total / 1e12:.4g} TFLOP ({seeds} seeds, {cfg.base_steps} pretraining steps "
          f"each)\nfloor: {floor:.4g} s (the FLOPs at the peak on {busy} cores)\npredicted: "
          f"{predicted:.4g} s (each phase at its measured rate, on {busy} cores)\n"
          f"measured / floor: {predicted / floor:.4g} (MFU {100 * floor / predicted:.3g}%)")


def main(argv=None, **fields):
    """fields: sudoku.Config's fields without a flag (the tests' tiny model)."""
    cfg = dataclasses.replace(copsd.parse_config(BenchConfig, argv, __doc__), **fields)
    sudoku.check(cfg, more=[why for bad, why in [
        (not set(cfg.methods) <= {"base", "self", "copsd"}, "--methods: base, self, copsd only"),
        (min(cfg.cores, cfg.bench_steps) < 1, "--cores and --bench_steps need >= 1")] if bad])
    torch.set_num_threads(1)  # as each seed's process
    print(f"one thread; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    rows = phases(cfg)
    report(cfg, rows, peak_flops())


if __name__ == "__main__":
    main()
