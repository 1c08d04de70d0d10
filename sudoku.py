"""
4x4 Sudoku on a laptop CPU: when does on-policy self-distillation fix parallel decoding?

    python sudoku.py                  # the minimal regime: Base, Base-Self and COPSD over 3 seeds
                                      #   (about 5 min on 2 cores; a rerun reads its cache)
    python sudoku.py --regime multi --methods base,self,copsd,sft,sft+copsd,selfusion,dopsd
    python sudoku.py --solve 1000002000300004  # a puzzle of your own, 0 = blank

Top to bottom: the puzzles, their tokens, the metric, the regimes, pretraining the base (a 0.18M
parameter LLaDA, model.py, trained from scratch with the MDM loss until it fills 90% of the
validation blanks at 1 token/step, and losing accuracy as more tokens are decoded per step, like
LLaDA-8B-Instruct on Sudoku), the paper's premise measured, post-training (every method of
copsd.METHODS through one loop, on puzzles alone, each at its own budget), the default table,
--solve. Regimes: minimal = unique puzzles with minimal givens, base trained over all mask
ratios; early = the same puzzles, a base that rarely saw mostly-masked responses (meant to put
the paper's premise in place; measured, it does not); low = a base never trained above mask
ratio 0.1 (it does); multi = puzzles with 2-4 solutions, scored by validity. The study
(every reading, ablation and regime, budgets chosen on validation, the figures) is the lab
notebook: python -m experiments.study --help.
"""

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import sys
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

import copsd
from copsd import flag
from model import (CheckpointError, LLaDA, ModelConfig, from_pretrained, read_config,
                   save_pretrained)

PROGRESS = dict(leave=False)  # this process's progress bars: a seed's line, or off (workers)


def bar(iterable=None, **kw):
    return tqdm(iterable, **PROGRESS | kw)


# ----------------------------------------------------------------------------------------------
# the puzzles


def units(grid):
    """The 12 units of 4x4 grids (..., 16): their 4 rows, 4 columns and 4 boxes, (..., 12, 4)."""
    a = rearrange(np.asarray(grid), "... (r c) -> ... r c", r=4)
    boxes = rearrange(a, "... (R r) (C c) -> ... (R C) (r c)", r=2, c=2)
    return np.concatenate([a, np.swapaxes(a, -1, -2), boxes], -2)


@functools.cache
def grids():
    """Every valid 4x4 Sudoku grid (there are 288), (288, 16) digits 1-4; built on first use:
    of the 24^4 stacks of 4 permuted rows, those whose every unit holds 1-4 once."""
    rows = np.array(list(itertools.permutations(range(1, 5))))
    candidates = rows[np.indices((len(rows),) * 4).reshape(4, -1).T].reshape(-1, 16)
    return candidates[(np.sort(units(candidates), -1) == np.arange(1, 5)).all((-1, -2))]


def solutions(puzzle):
    """All grids that keep the puzzle's givens (0 = blank): the solver. (n, 16)."""
    p = np.asarray(puzzle)
    return grids()[((grids() == p) | (p == 0)).all(1)]


def make_puzzle(grid, rng, most=1):
    """Remove givens in random order while the puzzle keeps at most `most` solutions. most=1: a
    unique minimal puzzle (4-6 givens). Easy puzzles (6-10 givens) a small model solves in one
    pass as well as cell by cell, so parallel decoding loses nothing; minimal ones need chained
    deductions (a cell's value follows from other blanks'), which one pass cannot make. most > 1:
    puzzles with several solutions, where cells decoded together from separate marginals can mix
    two solutions."""
    p = grid.copy()
    for c in rng.permutation(16):
        v, p[c] = p[c], 0
        if len(solutions(p)) > most:
            p[c] = v
    return p


SPLITS = ("pretrain", "distill", "val", "test")


def make_splits(seed, n_pretrain, n_distill, n_test, n_val=256, most=1, blanks=None):
    """Disjoint sets of puzzles (make_puzzle(most); most > 1 keeps those with 2 or more
    solutions; blanks: unique puzzles with exactly that many random blank cells, as d1's
    evaluation has 8): pretraining (with a solution, drawn among its solutions),
    self-distillation prompts (puzzles only), validation and test.
    {split: (puzzles, solutions)}, (n, 16) each."""
    rng = np.random.default_rng(seed)
    need, seen, puzzles = n_pretrain + n_distill + n_val + n_test, set(), []
    with bar(total=need, desc="puzzles") as progress:
        for _ in range(50 * need):
            grid = grids()[rng.integers(len(grids()))]
            if blanks is None:
                p = make_puzzle(grid, rng, most)
            else:
                p = np.where(np.isin(np.arange(16), rng.choice(16, blanks, replace=False)), 0, grid)
            n = len(solutions(p))
            if p.tobytes() not in seen and (n == 1 if most == 1 else n > 1):
                seen.add(p.tobytes())
                puzzles.append(p)
                progress.update()
                if len(puzzles) == need:
                    break
    if len(puzzles) < need:
        raise SystemExit(f"only {len(puzzles)} distinct puzzles found; ask for fewer")
    puzzles = np.array(puzzles)
    sols = np.array([solutions(p)[0] if most == 1 else rng.choice(solutions(p))
                     for p in puzzles])
    cut = np.cumsum([0, n_pretrain, n_distill, n_val, n_test])
    return {name: (puzzles[a:b], sols[a:b]) for name, a, b in
            zip(SPLITS, cut[:-1], cut[1:])}


# ----------------------------------------------------------------------------------------------
# tokens: prompt = the 16 puzzle cells, response = the 16 solution cells
#
# LLaDA has no absolute position embedding (RoPE only encodes offsets) while Sudoku's rules are
# absolute (a cell's row, column and box), so each prompt token names its cell: token 5 + 5c + v
# for cell c holding v (0 = blank). Response cell c sits 16 positions after prompt cell c, an
# offset RoPE does resolve, and the response digits are tokens 1-4.

PROMPT_LEN = GEN_LEN = 16
MASK_ID = 5 + 5 * 16
VOCAB = MASK_ID + 1


def encode_prompt(puzzles, device="cpu"):
    p = torch.as_tensor(np.asarray(puzzles), dtype=torch.long, device=device)
    return 5 + 5 * torch.arange(16, device=device) + p


def parse_puzzle(text):
    """A user's puzzle: 16 digits 0-4 (0 = blank), row by row. One-line errors for bad input."""
    s = "".join(text.split()).replace(".", "0")
    if len(s) != 16 or any(ch not in "01234" for ch in s):
        raise SystemExit("--solve: expected 16 digits 0-4 (0 = blank), row by row; got "
                         + (repr(text) if s else "an empty puzzle"))
    p = np.array([int(ch) for ch in s])
    for i, u in enumerate(units(p)):
        given = list(u[u > 0])
        dup = {v for v in given if given.count(v) > 1}
        if dup:
            kind = ("row", "column", "box")[i // 4]
            raise SystemExit(f"--solve: puzzle {s} repeats digit {min(dup)} in {kind} {i % 4 + 1}")
    if len(solutions(p)) == 0:
        raise SystemExit(f"--solve: puzzle {s} has no solution")
    return p


# ----------------------------------------------------------------------------------------------
# the metric (App. A.1): the fraction of originally blank cells filled correctly; also the
# fraction of puzzles solved completely. Greedy decoding, low-confidence remasking, one block.

SAMPLER = copsd.Sampler(gen_length=GEN_LEN, block_length=GEN_LEN, steps=GEN_LEN)  # 1 token/step


def columns(ns, thresholds=()):
    """The evaluation's decoding settings {column: copsd.Sampler}: n tokens per step for each n
    of ns (Table 1's columns), then Fast-dLLM's threshold decoding at each τ of thresholds
    (column "τ=0.9": every cell above τ at once, at least one; its tokens per forward vary)."""
    return {str(n): SAMPLER.at(n) for n in ns} | {
        f"τ={τ}": dataclasses.replace(SAMPLER.at(GEN_LEN), threshold=τ) for τ in thresholds}


def aup(test, y_max=None):
    """AUP (copsd.aup) of a row's accuracy-parallelism curve (copsd.aup_curve: its 1 token/step
    and threshold columns, % blank cells correct). y_max: the best accuracy of any row."""
    return copsd.aup(copsd.aup_curve(test, "cell_acc"), y_max)


@torch.no_grad()
def decode(model, puzzles, sampler):
    """The model's fill of each puzzle (n, 16), the cells it decoded and the model calls it
    needed (copsd.decode_counts: their ratio is its tokens per forward), each (n,)."""
    prompt = encode_prompt(puzzles, model.device)
    if model.cfg.causal:  # OPDLM's AR teacher: left to right, one token per step whatever n
        x = prompt
        for _ in range(GEN_LEN):
            x = torch.cat([x, model(x, start=x.shape[1] - 1).argmax(-1)], 1)
        every = np.full(len(x), GEN_LEN)  # all 16 cells, one per call
        return x[:, PROMPT_LEN:].cpu().numpy(), every, every
    stats = {}
    seq, states = copsd.generate(model, prompt, None, MASK_ID, sampler, record=True, stats=stats)
    cells, calls = copsd.decode_counts(states[:, :, PROMPT_LEN:], stats["forwards"],
                                       sampler.block_length, MASK_ID)
    # tokens 1-4 are the digits; anything else scores wrong
    return seq[:, PROMPT_LEN:].cpu().numpy(), cells.cpu().numpy(), calls.cpu().numpy()


def score(filled, puzzles, sols=None):
    """Blank cells filled correctly and puzzles solved; per puzzle, its blank cells and those
    filled correctly (for intervals over puzzles). sols: each puzzle's reference solution;
    None: the nearest of all its solutions, so that a puzzle with several counts as solved by a
    valid grid that keeps its givens."""
    if sols is None:
        near = [solutions(p) for p in puzzles]
        sols = np.stack([s[(s == f).sum(1).argmax()] for s, f in zip(near, filled)])
    blank = puzzles == 0
    right = (filled == sols) | ~blank
    return dict(cell_acc=float((right & blank).sum() / blank.sum()),
                solved=float(right.all(1).mean()), blanks=blank.sum(1).tolist(),
                right=(right & blank).sum(1).tolist())


def evaluate(model, split, cols, batch=512):
    """{column: cell accuracy, puzzles solved, TPF (cells decoded over model calls), and per
    puzzle its blanks, those right and its calls} on a split (scored against the nearest
    solution); cols: {column: copsd.Sampler}."""
    model.eval()
    puzzles, _ = split
    out = {}
    for name, sampler in cols.items():
        parts = [decode(model, puzzles[i:i + batch], sampler)
                 for i in range(0, len(puzzles), batch)]
        filled, cells, calls = (np.concatenate(x) for x in zip(*parts))
        out[name] = dict(score(filled, puzzles), tpf=float(cells.sum() / max(calls.sum(), 1)),
                         calls=calls.tolist())
    return out


# ----------------------------------------------------------------------------------------------
# the regimes and the configuration: the flags are what a reader varies here; the other fields
# are flags of the lab notebook (experiments/)

REGIMES = ("minimal", "early", "low", "multi")
ROWS = ("base", *copsd.METHODS, "sft+self", "sft+copsd")  # --methods: a method, or SFT then it


def label(method, objective="paper"):
    """A row's name: "Base", the method's label (COPSD with its reading of Eq. 6), "SFT + X"."""
    def one(m):
        reading = f" ({objective})" if m == "copsd" and objective != "paper" else ""
        return "Base" if m == "base" else copsd.METHODS[m].label + reading
    return " + ".join(one(m) for m in method.split("+"))


@dataclass
class Config(copsd.MethodConfig):
    """the toy (python sudoku.py)"""
    regime: str = flag("minimal", "minimal: unique minimal puzzles, base trained over all mask "
                                  "ratios; early: a base that rarely saw mostly-masked "
                                  "responses; low: one never trained above mask ratio low_t (the "
                                  "premise measured to hold); multi: puzzles with 2-4 solutions, "
                                  "scored by validity", choices=REGIMES)
    methods: tuple = flag(("base", "self", "copsd"), "table rows: base (no training), a method, "
                          "or sft+METHOD (SFT, then METHOD)", choices=ROWS)
    seeds: int = flag(3, "seeds; each its own data split, base model and rows (a process each)")
    steps: int = flag(0, "optimiser steps of every method; 0: each method's own "
                         "(sudoku.OWN_CHOICE)")
    lr: float = flag(0.0, "AdamW learning rate of every method; 0: each method's own")
    prompts_per_step: int = flag(8, "prompts per optimiser step")
    resample_every: int = flag(8, "optimiser steps per rollout (on-policy refresh, θ' = the "
                                  "weights then); 0 = sample once from p_0 (Alg. 1/2 literally)")
    tokens_per_step: tuple = flag((1, 2, 4, 8, 16), "tokens decoded per step in evaluation "
                                  "(Table 1's columns)")
    thresholds: tuple = flag((0.5, 0.7, 0.8, 0.9, 0.95, 0.99), "confidence thresholds of "
                             "threshold decoding in evaluation: the curve AUP is read from")
    out: str = flag("out/sudoku", "data splits, base checkpoints and rows, each kept under a key "
                                  "of what determines it")
    device: str = flag("cpu", "where models train and decode (cuda: kept apart, as a GPU's "
                              "numbers differ by float rounding)", choices=("cpu", "cuda"))
    solve: str = flag("", "solve this puzzle (16 digits 0-4, 0 = blank) and exit")
    ckpt: str = flag("", "--solve with this checkpoint (e.g. a row's, under --out/rows) instead "
                         "of the newest base under --out")
    # the data; the base (0.18M parameters: of the recipes the notebook swept, the fewest FLOPs to
    # the target in every seed) and its pretraining, until base_target validation accuracy at 1
    # token/step (the early regime draws early_share of its rows' mask ratios from U(0, early_t),
    # the rest from U(0, 1); the low regime draws every one from U(0, low_t), and never reaches
    # the target: it trains pretrain_max_steps); OPDLM's own budget (its student starts as a
    # next-token predictor); the premise measurement's prompts and completions
    n_pretrain: int = 4000
    n_distill: int = 2000
    n_test: int = 256
    most_solutions: int = 4
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 2
    mlp_hidden_size: int = 128
    pretrain_lr: float = 1e-3
    pretrain_warmup: int = 0  # steps of linear warm-up to pretrain_lr
    pretrain_decay: float = 1.0  # then a cosine to pretrain_decay x pretrain_lr (1: constant)
    pretrain_batch: int = 64
    base_target: float = 0.9
    pretrain_max_steps: int = 4000
    eval_every: int = 100
    early_t: float = 0.6
    early_share: float = 0.8
    low_t: float = 0.1
    pretrain_t: float = 0.0  # > 0: every pretraining row at this mask ratio (the ceiling: 1)
    pretrain_stratified: bool = True  # a batch's mask ratios stratified (mask_ratios)
    opdlm_lr: float = 3e-4
    opdlm_steps: int = 400
    premise_prompts: int = 64
    premise_K: int = 16

    def columns(self):
        return columns(self.tokens_per_step, self.thresholds)


def model_config(cfg):
    return ModelConfig(d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads,
                       n_layers=cfg.n_layers, mlp_hidden_size=cfg.mlp_hidden_size,
                       vocab_size=VOCAB, embedding_size=VOCAB, rope_theta=10000.0,
                       max_sequence_length=PROMPT_LEN + GEN_LEN, mask_token_id=MASK_ID,
                       eos_token_id=0, pad_token_id=0)


def digest(*parts, device="cpu"):
    """A cache key: a hash of what determines the thing kept (a GPU's: its device too)."""
    parts += (device,) if device != "cpu" else ()
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def atomic_json(path, obj):
    """Write, then rename: a killed run never leaves half a file (the temporary name is the
    process's own: two workers may write the same result)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def warn(message):
    tqdm.write(f"warning: {message}", file=sys.stderr)


def cached(path, make, keys=()):
    """make()'s JSON result, kept at path: a rerun reads it. One that does not parse (truncated,
    garbage) or is not a dict with `keys` is made again, with a warning."""
    if os.path.exists(path):
        try:
            kept = read_json(path)
            if isinstance(kept, dict) and all(k in kept for k in keys):
                return kept
            warn(f"{path} is not a result with {', '.join(keys) or 'keys'}; recomputing it")
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            warn(f"{path} does not parse ({e}); recomputing it")
    made = make()  # first: a run that fails leaves no directory behind
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_json(path, made)
    return read_json(path)


def regime_data(cfg, seed):
    """The regime's splits (make_splits), kept on disk: a rerun need not search again."""
    most = cfg.most_solutions if cfg.regime == "multi" else 1
    key = digest(seed, most, cfg.n_pretrain, cfg.n_distill, cfg.n_test)
    path = os.path.join(cfg.out, f"splits-{key}.npz")
    if os.path.exists(path):
        try:
            with np.load(path) as z:
                return {k: (z[k + "_p"], z[k + "_s"]) for k in SPLITS}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:  # truncated
            warn(f"{path} does not load ({e}); making the splits again")
    data = make_splits(seed, cfg.n_pretrain, cfg.n_distill, cfg.n_test, most=most)
    os.makedirs(cfg.out, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **{f"{k}_{w}": v[i] for k, v in data.items() for i, w in enumerate("ps")})
    os.replace(tmp, path)
    return data


# ----------------------------------------------------------------------------------------------
# pretraining the base (kept under --out by what determines it)

PRETRAIN_FIELDS = ["regime", "most_solutions", "n_pretrain", "n_distill", "n_test", "d_model",
                   "n_layers", "n_heads", "mlp_hidden_size", "pretrain_lr", "pretrain_warmup",
                   "pretrain_decay", "pretrain_batch",
                   "base_target", "pretrain_max_steps", "eval_every", "early_t", "early_share",
                   "low_t", "pretrain_t", "pretrain_stratified"]


def optimiser_step(model, opt, loss, step):
    """Backward and AdamW's step, stopping (copsd.check_finite, naming `step`) at a non-finite
    loss, gradient or weight: a diverged run never trains on, and is never saved."""
    copsd.check_finite(step, loss=loss)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    copsd.check_finite(step, gradients=[p.grad for p in model.parameters() if p.grad is not None])
    opt.step()
    copsd.check_finite(step, weights=list(model.parameters()))


def lr_factor(cfg, step):
    """Pretraining's learning rate over pretrain_lr after `step` updates: a linear warm-up over
    pretrain_warmup steps, then a cosine from 1 to pretrain_decay at pretrain_max_steps."""
    if step < cfg.pretrain_warmup:
        return (step + 1) / cfg.pretrain_warmup
    done = min(1.0, (step - cfg.pretrain_warmup) / max(1, cfg.pretrain_max_steps
                                                        - cfg.pretrain_warmup))
    return cfg.pretrain_decay + (1 - cfg.pretrain_decay) * (1 + math.cos(math.pi * done)) / 2


def mask_ratios(cfg, n, generator, eps=1e-3):
    """The mask ratio t of each of n pretraining rows, (n,), or None for the MDM loss's own
    t ~ U(0, 1) (minimal, multi, not stratified): the ceiling's all at pretrain_t; early:
    early_share of them from U(0, early_t), the rest from U(0, 1); low: every one from
    U(0, low_t).
    pretrain_stratified: the n uniforms behind them one in each of n equal intervals, in random
    order (each row's t keeps its distribution; a batch covers it evenly: a lower-variance
    estimate of the same loss)."""
    dev = generator.device
    if cfg.pretrain_t:
        return torch.full((n,), cfg.pretrain_t, device=dev)
    if cfg.regime not in ("early", "low") and not cfg.pretrain_stratified:
        return None
    top, share = {"early": (cfg.early_t, cfg.early_share), "low": (cfg.low_t, 1.0)}.get(
        cfg.regime, (1.0, 1.0))
    u = torch.rand(n, generator=generator, device=dev)
    if cfg.pretrain_stratified:
        u = (torch.randperm(n, generator=generator, device=dev) + u) / n
    below = torch.rand(n, generator=generator, device=dev) < share
    return eps + u * torch.where(below, top - eps, 1 - eps)


def pretrain(cfg, seed, causal=False, budget=None):
    """The base MDM (LLaDA's loss, Eq. 3) of the regime, trained until the validation target
    (blank-cell accuracy at 1 token/step). The early regime draws most rows' mask ratio from
    U(0, early_t): a stand-in for an instruct model whose fine-tuning rarely saw a mostly masked
    response (measured: its early steps are no worse than minimal's, relative to its later
    ones); the low regime draws every row's from U(0, low_t): a base that never saw one, whose
    early steps are (its self-consistency gap is over 3x minimal's).
    causal=True: OPDLM's autoregressive teacher of the same architecture (next-token loss on
    the response) for `budget` steps. Returns the checkpoint's path."""
    key = digest(seed, causal, [getattr(cfg, f) for f in PRETRAIN_FIELDS], device=cfg.device)
    path = os.path.join(cfg.out, f"{'ar' if causal else 'base'}-{key}")
    if os.path.isdir(path):
        return path
    data, dev = regime_data(cfg, seed), cfg.device
    torch.manual_seed(seed)
    model = LLaDA(dataclasses.replace(model_config(cfg), causal=causal)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_factor, cfg))
    puzzles, sols = data["pretrain"]
    seq = torch.cat([encode_prompt(puzzles, dev), torch.as_tensor(sols, device=dev)], 1)
    g = torch.Generator(dev).manual_seed(seed)
    acc, n = 0.0, cfg.pretrain_batch
    what = "AR teacher" if causal else f"base, until {cfg.base_target:.0%} on validation"
    progress = bar(range(1, (budget or cfg.pretrain_max_steps) + 1), desc=f"seed {seed}: {what}")
    for step in progress:
        model.train()
        batch = seq[torch.randint(len(seq), (n,), generator=g, device=dev)]
        if causal:  # position j - 1 predicts response token j
            logits = model(batch, start=PROMPT_LEN - 1)[:, :-1]
            loss = F.cross_entropy(rearrange(logits, "b l v -> (b l) v"),
                                   batch[:, PROMPT_LEN:].flatten())
        else:
            loss, _ = copsd.mdm_loss(model, copsd.Rollout(batch, None, PROMPT_LEN), MASK_ID,
                                     generator=g, t=mask_ratios(cfg, n, g))
        optimiser_step(model, opt, loss,
                       f"{step} of seed {seed}'s {'AR teacher' if causal else 'base'}")
        schedule.step()
        if step % cfg.eval_every == 0 and not causal:  # the AR teacher trains its fixed budget
            acc = evaluate(model, data["val"], columns([1]))["1"]["cell_acc"]
            if acc >= cfg.base_target:
                break
        progress.set_postfix(loss=f"{loss.item():.3f}", val_acc=f"{acc:.3f}")
    model.cfg.extra["pretrain_steps"] = step  # config.json keeps it: the AR teacher's budget
    save_pretrained(path, model.cfg, model.state_dict())
    return path


def ar_teacher(cfg, seed):
    """OPDLM's autoregressive teacher: the base's architecture, causal, pretrained on the same
    data for as many steps as the seed's base took (left to right it cannot make a minimal
    puzzle's chained deductions, and plateaus below the base). Returns its path."""
    budget = read_config(pretrain(cfg, seed)).extra["pretrain_steps"]
    return pretrain(cfg, seed, causal=True, budget=budget)


# ----------------------------------------------------------------------------------------------
# the paper's premise (Sec. 4.1), measured: are the model's early predictions worse than what it
# predicts once more of its own trajectory is revealed?


@torch.no_grad()
def complete(model, x, generator):
    """Fill x's masked response cells one at a time, in random order, each sampled from the
    model (temperature 1): a sample of the model's own joint distribution given x."""
    x = x.clone()
    for _ in range(GEN_LEN):
        masked = x[:, PROMPT_LEN:] == MASK_ID
        if not masked.any():
            break
        logits = model(x, start=PROMPT_LEN).index_fill(
            -1, torch.tensor([MASK_ID], device=x.device), -torch.inf)
        token = copsd.add_gumbel_noise(logits, 1.0, generator).argmax(-1)
        u = torch.rand(masked.shape, generator=generator, device=x.device)
        u = u.masked_fill(~masked, -1.0)
        cell = u.argmax(1, keepdim=True)  # one random masked cell per row
        row = masked.any(1)
        x[row, PROMPT_LEN + cell[row, 0]] = token.gather(1, cell)[row, 0]
    return x


@torch.no_grad()
def self_consistency(model, puzzles, t=0.9, s=0.5, K=16, seed=0):
    """The premise as a number. The model samples y for each puzzle (2 tokens/step); y_t masks
    it at t; its early marginal p(.|y_t) is compared, at the cells masked in both views, with
    the mean of the later-view predictions p(.|y^k_{t-s}) over K of its own completions y^k of
    y_t. A perfectly self-consistent MDM has p(.|y_t) = E_k p(.|y^k_{t-s}). Returns
    Σ_v (p(v) - mean_k p̃_k(v))^2 averaged over cells, less the K-sample mean's own variance (an
    unbiased estimate)."""
    g = torch.Generator(model.device).manual_seed(seed)
    prompt = encode_prompt(puzzles, model.device)
    y = copsd.generate(model, prompt, None, MASK_ID,
                       dataclasses.replace(SAMPLER, temperature=1.0).at(2), generator=g)
    mask_t, mask_ts = copsd.nested_masks((len(y), GEN_LEN), t, s, generator=g, device=y.device)
    y_t = copsd.apply_mask(y, PROMPT_LEN, mask_t, MASK_ID)
    p = F.softmax(model(y_t, start=PROMPT_LEN), -1)
    later = copsd.apply_mask(complete(model, copsd.per_prompt(y_t, K), g), PROMPT_LEN,
                             copsd.per_prompt(mask_ts, K), MASK_ID)
    p_k = rearrange(F.softmax(model(later, start=PROMPT_LEN), -1), "(b k) l v -> b k l v", k=K)
    gap = ((p - p_k.mean(1)) ** 2 - p_k.var(1) / K).sum(-1)
    return float((gap * mask_ts).sum() / mask_ts.sum())


# ----------------------------------------------------------------------------------------------
# post-training from the base: every method (copsd.METHODS) runs the same loop (optimiser steps
# of prompts_per_step x K rows) and optimiser, each for its own budget

# each method's (lr, steps): the argmax of its own validation curve (the mean over 5 seeds of
# accuracy at 1 and 16 tokens/step; lr 1e-5, 3e-5, 1e-4 x steps 20-240) in the notebook's study
# of this base in the minimal regime, used in every regime; --lr / --steps: one for all
OWN_CHOICE = {"self": (3e-5, 180), "copsd": (1e-5, 20), "copsd (score)": (1e-5, 20),
              "copsd (exact)": (3e-5, 20), "copsd (later)": (3e-5, 180),
              "copsd (later, forward)": (3e-5, 240), "sft": (1e-4, 240),
              "selfusion": (3e-5, 240), "dopsd": (1e-5, 20), "dparallel": (3e-5, 200),
              "d3llm": (1e-4, 240)}


def budget(c, method):
    """`method`'s (learning rate, optimiser steps): --lr and --steps where set, else its own
    choice (OWN_CHOICE; COPSD's by its reading of Eq. 6); OPDLM: its own budget."""
    if method == "opdlm":
        return c.opdlm_lr, c.opdlm_steps
    if method == "copsd" and c.objective != "paper":
        forward = c.objective == "later" and c.later_direction == "forward"
        method = f"copsd ({c.objective}{', forward' if forward else ''})"
    lr, steps = OWN_CHOICE[method]
    return c.lr or lr, c.steps or steps


def post_train(model, c, data, method, seed, teacher=None, start=0, after_step=None):
    """Train `model` in place on the distillation puzzles with `method` for its budget (budget:
    learning rate, optimiser steps). Every `resample_every` steps a rollout of resample_every x
    prompts_per_step prompts x K responses is drawn with the current weights (θ') and consumed
    one slice per step (resample_every = 0: one rollout from p_0, reused). SFT draws as many
    solved puzzles per step as the others have rows. after_step(start + steps done, model), if
    given, runs after each step. Returns the per-step loss and stats."""
    lr, steps = budget(c, method)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    puzzles, sols = data["distill"]
    dev = model.device
    prompts, answers = encode_prompt(puzzles, dev), torch.as_tensor(sols, device=dev)
    g = torch.Generator(dev).manual_seed(seed)
    sampler = dataclasses.replace(SAMPLER, temperature=c.temperature).at(c.train_tokens_per_step)
    window = c.resample_every or steps
    K, rows = 1 if method == "sft" else c.K, c.prompts_per_step * c.K
    loss_fn = copsd.METHODS[method].loss
    options = copsd.loss_options(method, c, sampler,
                                 **({} if teacher is None else dict(teacher=teacher)))
    history = []
    for step in bar(range(steps), desc=f"seed {seed}: {label(method, c.objective)}"):
        if step % window == 0 and (c.resample_every or step == 0):
            model.eval()
            idx = torch.randint(len(prompts), (window * rows // K,), generator=g, device=dev)
            ro = copsd.make_rollout(method, model, prompts[idx], None, MASK_ID, sampler, c, K=K,
                                    answers=answers[idx], generator=g)
        model.train()
        part = ro[(step % window) * rows:(step % window + 1) * rows]
        loss, stats = loss_fn(model, part, MASK_ID, generator=g, **options)
        optimiser_step(model, opt, loss,
                       f"{step + 1} of seed {seed}'s {label(method, c.objective)}")
        history.append(dict(loss=loss.item(), **{k: round(v, 5) for k, v in stats.items()
                                                 if k in ("d", "kd", "div", "kl")}))
        if after_step:
            after_step(start + step + 1, model)
    return history


def train(cfg, seed, stages, after_step=None):
    """The seed's base post-trained by each of `stages` in turn (["sft", "copsd"]: SFT, then
    COPSD; ["opdlm"]: from its AR teacher made bidirectional). Returns the model and each
    stage's history."""
    data, teacher, history = regime_data(cfg, seed), None, []
    if list(stages) == ["opdlm"]:
        ar = ar_teacher(cfg, seed)
        teacher = from_pretrained(ar, cfg.device).requires_grad_(False)
        model = from_pretrained(ar, cfg.device)
        model.cfg = dataclasses.replace(model.cfg, causal=False)
    else:
        model = from_pretrained(pretrain(cfg, seed), cfg.device)
    done = 0  # the steps of the stages before
    for method in stages:
        history.append(post_train(model, cfg, data, method, seed, teacher, done, after_step))
        done += budget(cfg, method)[1]
    return model, history


# ----------------------------------------------------------------------------------------------
# the default table: each seed in a process of its own (one thread, as a serial run: the same
# numbers), its rows kept under --out and printed as they are ready, then the table over seeds


def base_row(cfg, seed, path):
    """A model that did not post-train, as a row: its test scores and pretraining steps, and
    the premise measured on it (a causal model, OPDLM's AR teacher: no premise)."""
    data, model = regime_data(cfg, seed), from_pretrained(path, cfg.device)
    model.eval()
    premise = None if model.cfg.causal else self_consistency(
        model, data["val"][0][:cfg.premise_prompts], cfg.t, cfg.s, cfg.premise_K, seed)
    return dict(test=evaluate(model, data["test"], cfg.columns()), history=[], curve=[],
                steps=model.cfg.extra["pretrain_steps"], premise=premise)


def method_row(cfg, seed, method, ckpt):
    """A --methods row: the base post-trained by it (its weights saved at ckpt, for --solve
    --ckpt), its history and test scores."""
    model, history = train(cfg, seed, method.split("+"))
    save_pretrained(ckpt, model.cfg, model.state_dict())
    test = evaluate(model, regime_data(cfg, seed)["test"], cfg.columns())
    return dict(history=history, test=test, ckpt=ckpt)


def say(seed, name, row):
    tqdm.write(f"seed {seed}: {name}: blank cells correct " + ", ".join(
        f"{100 * v['cell_acc']:.1f}% at {n}" for n, v in row["test"].items() if "τ" not in n)
        + f", AUP {aup(row['test']):.1f} (against its own best)" + (
        f"; {row['steps']} pretraining steps, self-consistency gap {row['premise']:.4f}"
        if row.get("premise") is not None else ""))


def seed_rows(cfg, seed):
    """One seed's rows (its base, then each of --methods), each kept under --out/rows by the
    configuration (a row's JSON and its weights) and printed as soon as it is ready. With more
    seeds than cores, the seeds past the first cores - 1 yield to those (nice): the first rows
    come sooner, the run as a whole no later."""
    PROGRESS.update(position=seed)
    cores = os.cpu_count() or 1
    if cfg.seeds > cores and seed >= max(1, cores - 1) and hasattr(os, "nice"):
        os.nice(10)
    same = {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in ("methods", "seeds", "out", "solve", "ckpt")}
    rows = {}
    for method in ("base",) + tuple(m for m in cfg.methods if m != "base"):
        own = [budget(cfg, m) for m in method.split("+") if m != "base"]  # OWN_CHOICE may change
        path = os.path.join(cfg.out, "rows", f"{method}-{digest(seed, method, same, own)}")
        rows[label(method, cfg.objective)] = row = cached(path + ".json", lambda: (
            base_row(cfg, seed, pretrain(cfg, seed)) if method == "base" else
            method_row(cfg, seed, method, path)), ("test", "history"))
        say(seed, label(method, cfg.objective), row)
    return rows


def worker(lock, quiet):
    """A worker process: one thread, progress bars sharing tqdm's lock (or none: quiet)."""
    tqdm.set_lock(lock)
    torch.set_num_threads(1)
    PROGRESS.update(disable=quiet)


def in_processes(tasks, processes, quiet=False):
    """(key, fn(*args)) for each of tasks {key: (fn, *args)} as it finishes, in `processes`
    spawned processes (here, one after the other, when one is enough). A worker that dies
    (killed, out of memory) ends the run with a one-line error naming the unfinished tasks."""
    if processes <= 1 or len(tasks) <= 1:
        yield from ((key, fn(*args)) for key, (fn, *args) in tasks.items())
        return
    spawn = multiprocessing.get_context("spawn")
    tqdm.set_lock(spawn.RLock())
    with ProcessPoolExecutor(min(processes, len(tasks)), spawn, worker,
                             (tqdm.get_lock(), quiet)) as pool:
        futures = {pool.submit(fn, *args): key for key, (fn, *args) in tasks.items()}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        except BrokenProcessPool:
            left = [str(k) for f, k in futures.items() if not f.done() or f.exception()]
            print(file=sys.stderr)  # below the dead worker's progress bar
            raise SystemExit("a worker process died (killed, or out of memory?) while running: "
                             + "; ".join(left[:4] + [f"{len(left) - 4} more"] * (len(left) > 4)))
        finally:  # a task's error: the tasks not started yet are not run
            pool.shutdown(wait=False, cancel_futures=True)


def print_premise(regime, base):
    gap = [100 * (b["test"]["1"]["cell_acc"] - b["test"]["16"]["cell_acc"]) for b in base
           if "1" in b["test"] and "16" in b["test"]]
    print(f"\n{regime}: the base's self-consistency gap at t/T = 0.9 (0 for a self-consistent "
          f"MDM): {np.mean([b['premise'] for b in base]):.4f} ± "
          f"{np.std([b['premise'] for b in base]):.4f}; its loss from 1 to 16 tokens/step: "
          + (f"{np.mean(gap):.1f} points" if gap else "—"))


def aups(results, reference="Base"):
    """{row: [AUP of each seed]}. y_max, the accuracy below which AUP's weight penalises, is
    the best accuracy on the reference row's curve of that seed (d3LLM takes the best of the
    methods it ranks; the base they all start from keeps a row's AUP independent of which
    other rows a table holds), or on any row's where there is no reference row."""
    def best(rows):
        return max(y for r in rows for _, y in copsd.aup_curve(r["test"], "cell_acc"))
    y_max = [best([r]) for r in results[reference]] if reference in results else [
        best(rows) for rows in zip(*results.values())]
    return {row: [aup(r["test"], y) for r, y in zip(per_seed, y_max)]
            for row, per_seed in results.items()}


def report(results, cols, regime):
    """The tables: each row's mean ± std over seeds at the fixed tokens-per-step columns (and
    AUP, when there are threshold columns), then its threshold decoding curve."""
    fixed, curve = [n for n in cols if "τ" not in n], [n for n in cols if "τ" in n]
    width = max(len(r) for r in results) + 2
    for key, what in (("cell_acc", "blank cells filled correctly"),
                      ("solved", "puzzles solved completely")):
        print(f"\n{regime}: {what} (%), mean ± std over seeds")
        score = aups(results) if curve and key == "cell_acc" else {}
        print("Model / # Tokens".ljust(width) + "".join(f"{n:>15}" for n in fixed)
              + (f"{'AUP':>17}" if score else ""))
        for row, per_seed in results.items():
            v = 100 * np.array([[r["test"][n][key] for n in fixed] for r in per_seed])
            print(row.ljust(width) + "".join(f"{m:6.2f} ± {s:5.2f}".rjust(15)
                                             for m, s in zip(v.mean(0), v.std(0)))
                  + (f"{np.mean(score[row]):7.1f} ± {np.std(score[row]):5.1f}".rjust(17)
                     if score else ""))
    if curve:
        print(f"\n{regime}: threshold decoding, blank cells correct (%) @ tokens per forward, "
              "mean over seeds")
        print("Model / τ".ljust(width) + "".join(f"{n[2:]:>14}" for n in curve))
        for row, per_seed in results.items():
            print(row.ljust(width) + "".join(
                f"{100 * np.mean([r['test'][n]['cell_acc'] for r in per_seed]):6.2f} @ "
                f"{np.mean([r['test'][n]['tpf'] for r in per_seed]):4.1f}".rjust(14)
                for n in curve))


def run(cfg):
    """The default table: one regime, the base and each --methods row over cfg.seeds seeds."""
    t0 = time.time()
    os.makedirs(cfg.out, exist_ok=True)
    done = dict(in_processes({f"seed {s}": (seed_rows, cfg, s) for s in range(cfg.seeds)},
                             cfg.seeds))
    per_seed = [done[f"seed {s}"] for s in range(cfg.seeds)]
    results = {row: [rows[row] for rows in per_seed] for row in per_seed[0]}
    print_premise(cfg.regime, results["Base"])
    report(results, list(cfg.columns()), cfg.regime)
    path = os.path.join(cfg.out, "results.json")
    atomic_json(path, dict(config=dataclasses.asdict(cfg), results=results))
    print(f"\nwall time {time.time() - t0:.0f} s; results in {path}")
    return results


def fail(message):
    """Bad input: one line on stderr and exit status 2, as argparse's own errors."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check(cfg, methods=None, more=()):
    """Bad flags, before any work: the first as one line, exit 2. copsd's shared checks for the
    methods to run (default: --methods' stages), the toy's, then the caller's `more`."""
    methods = {m for row in cfg.methods for m in row.split("+")} if methods is None else methods
    problems = cfg.problems(methods) + [why for bad, why in [
        (cfg.seeds < 1, f"--seeds {cfg.seeds}: need at least 1"),
        (cfg.steps < 0, f"--steps {cfg.steps}: need >= 0 (0: each method's own)"),
        (not 0 <= cfg.lr < float("inf"), f"--lr {cfg.lr}: need a finite value >= 0 (0: each "
                                         "method's own)"),
        (cfg.prompts_per_step < 1, f"--prompts_per_step {cfg.prompts_per_step}: need >= 1"),
        ("copsd" not in methods and not 0 <= cfg.s < cfg.t <= 1,
         f"the premise's two views need 0 <= s < t <= 1, got --t {cfg.t} --s {cfg.s}"),
        (cfg.device == "cuda" and not torch.cuda.is_available(),
         "--device cuda: torch sees no CUDA GPU here"),
        (cfg.ckpt and not os.path.isdir(cfg.ckpt), f"--ckpt {cfg.ckpt}: no such directory"),
        (os.path.exists(cfg.out) and not os.path.isdir(cfg.out),
         f"--out {cfg.out}: a file, not a directory")]
        if bad]
    for what, make in (("the evaluation's sampler", cfg.columns),
                       ("--train_tokens_per_step", lambda: SAMPLER.at(cfg.train_tokens_per_step))):
        try:
            make()
        except ValueError as e:
            problems.append(f"{what}: {e}")
    if problems + list(more):
        fail((problems + list(more))[0])


def solve(cfg):
    puzzle = parse_puzzle(cfg.solve)
    path = cfg.ckpt
    if not path:  # a base, never one half-written (save_pretrained's base-KEY.tmpPID)
        bases = [e for e in (os.scandir(cfg.out) if os.path.isdir(cfg.out) else [])
                 if e.name.startswith("base-") and "." not in e.name]
        if not bases:
            raise SystemExit(f"--solve: no trained model in {cfg.out}; run `python sudoku.py` "
                             "first or pass --ckpt")
        path = max(bases, key=lambda e: e.stat().st_mtime).path
    model = from_pretrained(path)
    model.eval()
    grid = np.where(puzzle > 0, puzzle, decode(model, puzzle[None], SAMPLER)[0][0])
    for r in range(4):
        print(" ".join(str(v) for v in grid[4 * r:4 * r + 4]))
    ok = any((grid == s).all() for s in solutions(puzzle))
    print("valid solution" if ok else "not a valid solution")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = copsd.parse_config(Config, argv, description=__doc__)
    check(cfg)
    torch.set_num_threads(1)  # one thread per run, serial or parallel: the same numbers
    try:  # --solve "" too: it says the puzzle is empty
        solve(cfg) if cfg.solve or "--solve" in [a.split("=")[0] for a in argv] else run(cfg)
    except (FloatingPointError, CheckpointError) as e:  # diverged; a checkpoint that won't load
        fail(e)
    except SystemExit as e:  # --solve's: a puzzle that is not one, no model to solve it with
        if isinstance(e.code, str):
            fail(e.code)
        raise


if __name__ == "__main__":
    main()
