"""
4x4 Sudoku on a laptop CPU: when does on-policy self-distillation fix parallel decoding?

    python sudoku.py                  # the early regime: Base, Base-Self and COPSD over 3 seeds
                                      #   (~13 min on 2 cores; rerun: seconds)
    python sudoku.py --readings       # + a row for each other reading of Eq. 6
    python sudoku.py --regime minimal # another regime (minimal, early, multi)
    python sudoku.py --ablations --s_sweep   # + Table 4's rows and Figure 3's s/T sweep
    python sudoku.py --methods base,self,copsd,sft,sft+copsd,selfusion,dopsd,opdlm
    python sudoku.py --study          # everything, every regime, budgets chosen on validation
    python sudoku.py --solve 1000002000300004   # a puzzle of your own, 0 = blank
    python sudoku.py --device cuda --methods base,opdlm --opdlm_steps 16000 --curve_every 200
                                      # OPDLM to the end of its conversion, on a GPU (minutes)

Methods (--methods): self = Base-Self, naive self-distillation (Alg. 1); copsd (Alg. 2, in the
reading --objective); sft = the MDM loss on ground-truth solutions; sft+X = SFT, then X; the
related methods selfusion, dopsd (d-OPSD) and opdlm (OPDLM, from an autoregressive teacher of the
same size). Regimes (--regime): minimal = unique puzzles with minimal givens, base trained over
all mask ratios; early = the same puzzles, a base that rarely saw mostly-masked responses (the
paper's premise by construction); multi = puzzles with 2-4 solutions, scored by validity.

A small LLaDA (model.py, ~1M parameters) is pretrained from scratch with the MDM loss on puzzles
with their solutions until it fills 90% of the validation blanks at 1 token/step: imperfect, and
losing accuracy as more tokens are decoded per step, like LLaDA-8B-Instruct on Sudoku. From that
base each method then trains on puzzles alone (no solutions) with the same budget.
"""

import argparse
import dataclasses
import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import time
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

import copsd
from model import LLaDA, ModelConfig, from_pretrained, read_config, save_pretrained

QUIET = False  # worker processes hide their progress bars (the parent shows one for all)


def bar(iterable=None, **kw):
    return tqdm(iterable, disable=QUIET, leave=False, **kw)


# ----------------------------------------------------------------------------------------------
# the puzzles


def units(grid):
    """The 12 units of a 4x4 grid (16,): its 4 rows, 4 columns and 4 boxes, (12, 4)."""
    a = np.asarray(grid).reshape(4, 4)
    boxes = rearrange(a, "(R r) (C c) -> (R C) (r c)", r=2, c=2)
    return np.concatenate([a, a.T, boxes])


@functools.cache
def grids():
    """Every valid 4x4 Sudoku grid (there are 288), (288, 16) digits 1-4; built on first use."""
    rows = itertools.permutations(range(1, 5))
    candidates = (np.array(g).reshape(16) for g in itertools.product(list(rows), repeat=4))
    return np.array([g for g in candidates if all(len(set(u)) == 4 for u in units(g))])


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
            zip(["pretrain", "distill", "val", "test"], cut[:-1], cut[1:])}


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
        raise SystemExit(f"--solve: expected 16 digits 0-4 (0 = blank), row by row; got {text!r}")
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


@torch.no_grad()
def decode(model, puzzles, **sampler):
    """The model's fill of each puzzle (n, 16), and its tokens per forward (TPF)."""
    prompt = encode_prompt(puzzles, model.device)
    if model.cfg.causal:  # OPDLM's AR teacher: left to right, one token per step whatever n
        x = prompt
        for _ in range(GEN_LEN):
            x = torch.cat([x, model(x, start=x.shape[1] - 1).argmax(-1)], 1)
        return x[:, PROMPT_LEN:].cpu().numpy(), 1.0
    seq, states = copsd.generate(model, prompt, None, MASK_ID, gen_length=GEN_LEN,
                                 block_length=GEN_LEN, record=True, **sampler)
    # tokens 1-4 are the digits; anything else scores wrong
    return seq[:, PROMPT_LEN:].cpu().numpy(), copsd.tokens_per_forward(states, MASK_ID)


def score(filled, puzzles, sols=None):
    """Blank cells filled correctly and puzzles solved. sols: each puzzle's reference solution;
    None: the nearest of all its solutions, so that a puzzle with several counts as solved by a
    valid grid that keeps its givens."""
    if sols is None:
        near = [solutions(p) for p in puzzles]
        sols = np.stack([s[(s == f).sum(1).argmax()] for s, f in zip(near, filled)])
    blank = puzzles == 0
    right = (filled == sols) | ~blank
    return dict(cell_acc=float((right & blank).sum() / blank.sum()),
                solved=float(right.all(1).mean()))


def columns(cfg, ns=None):
    """The evaluation's decoding settings {column: generate's options}: n tokens per step (one
    block of 16) with cfg.cache, or, with cfg.threshold, one column of threshold decoding."""
    # refresh only when set: these options key the evaluations cached before it existed
    cache = dict(cache=cfg.cache) | ({"refresh": cfg.refresh} if cfg.refresh else {})
    if cfg.threshold:
        return {f"τ={cfg.threshold}": dict(steps=1, threshold=cfg.threshold, **cache)}
    return {str(n): dict(steps=GEN_LEN // n, **cache) for n in ns or cfg.tokens_per_step}


def evaluate(model, split, cols, batch=512):
    """{column: cell accuracy, puzzles solved, TPF} on a split (scored against the nearest
    solution)."""
    model.eval()
    puzzles, _ = split
    out = {}
    for name, sampler in cols.items():
        parts = [decode(model, puzzles[i:i + batch], **sampler)
                 for i in range(0, len(puzzles), batch)]
        filled = np.concatenate([f for f, _ in parts])
        out[name] = dict(score(filled, puzzles), tpf=float(np.mean([t for _, t in parts])))
    return out


# ----------------------------------------------------------------------------------------------
# configuration: every field is a flag with its help; defaults are the paper's settings where
# it gives them. parse_config is shared with train_llada.py.


def flag(default, help, choices=None):
    """A config field that is also a command-line flag (parse_config)."""
    return field(default=default, metadata=dict(help=help, choices=choices))


def comma_list(kind, choices):
    """argparse type of a list flag: "1,2,4" -> (1, 2, 4), each item checked against choices."""
    def parse(text):
        items = tuple(kind(x) for x in text.split(",") if x)
        bad = [x for x in items if choices and x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"invalid value {text!r} (items from: "
                                             f"{', '.join(map(str, choices or ['...']))})")
        return items
    return parse


def parse_config(cls, argv=None, description=None):
    """`cls` (a dataclass of flag() fields) from the command line: --name value per field;
    booleans as --name / --no-name; tuples as comma lists; fixed sets of values as choices.
    Fields a base class declares are shown as a group under its docstring."""
    ap = argparse.ArgumentParser(description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    by_name, done = {f.name: f for f in fields(cls)}, set()
    for klass in cls.__mro__[:-1]:  # a field belongs to the most derived class declaring it
        group = ap if klass is cls else ap.add_argument_group(klass.__doc__.split("\n")[0])
        for name in vars(klass).get("__annotations__", {}):
            if name not in done:
                add_flag(group, by_name[name])
                done.add(name)
    return cls(**vars(ap.parse_args(argv)))


def add_flag(ap, f):
    help, choices = f.metadata["help"], f.metadata["choices"]
    if isinstance(f.default, tuple):
        shown = ",".join(map(str, f.default))
        kw = dict(type=comma_list(type(f.default[0]), choices), metavar="A,B,...")
        if choices:
            help += f" (from: {', '.join(map(str, choices))})"
    else:
        shown = f.default if f.default != "" else "none"
        kw = dict(choices=choices, type=type(f.default))
    if isinstance(f.default, bool):
        kw = dict(action=argparse.BooleanOptionalAction)
    ap.add_argument(f"--{f.name}", default=f.default, help=f"{help} (default: {shown})", **kw)


@dataclass
class MethodConfig:
    """the method (the same flags in sudoku.py and train_llada.py)"""
    K: int = flag(4, "responses per prompt (Eq. 10's group)")
    t: float = flag(0.9, "COPSD's early mask ratio t/T (Sec. 4.3: fixed 0.9)")
    s: float = flag(0.5, "COPSD's step to the later view, s/T (Sec. 5.5: 0.5)")
    random_s: bool = flag(False, "COPSD-Random: s ~ U(0, t) per prompt (Table 3/4)")
    keep_z: bool = flag(False, "COPSD with Z: A from d + log Z (Table 4)")
    group_norm: bool = flag(True, "group relative normalisation of d (Eq. 10); off: A = d "
                                  "(Table 4)")
    resample_every: int = flag(0, "optimiser steps per rollout (on-policy refresh, θ' = the "
                                  "weights then); 0 = sample once from p_0 (Alg. 1/2 literally)")
    temperature: float = flag(1.0, "sampling temperature of training rollouts (K > 1 needs "
                                   "diverse samples; evaluation is greedy)")
    train_tokens_per_step: int = flag(2, "tokens decoded per step in training rollouts")
    objective: str = flag("paper", "COPSD's reading of Eq. 6: paper (Eq. 11 through autograd), "
                                   "score (without its +1 term), exact (Eq. 6 over the "
                                   "vocabulary), later (KL to the later view)",
                          choices=("paper", "score", "exact", "later"))
    later_direction: str = flag("reverse", "the later reading's KL: reverse KL(p || p̃) or "
                                           "forward KL(p̃ || p)", choices=("reverse", "forward"))
    target_top_k: int = flag(0, "exact / later readings: cache the target's top-k tokens only "
                                "(0 = the whole vocabulary)")

    def copsd_kw(self):
        """copsd_rollout's options."""
        return dict(t=self.t, s=self.s, random_s=self.random_s, keep_z=self.keep_z,
                    group_norm=self.group_norm, objective=self.objective,
                    top_k=self.target_top_k or None)

    def copsd_loss_kw(self):
        """copsd_loss's options."""
        return dict(objective=self.objective, direction=self.later_direction)


METHODS = ("self", "copsd", "sft", "sft+self", "sft+copsd", "selfusion", "dopsd", "opdlm")


@dataclass
class Config(MethodConfig):
    resample_every: int = flag(8, "optimiser steps per rollout (on-policy refresh, θ' = the "
                                  "weights then); 0 = sample once from p_0 (Alg. 1/2 literally)")
    seeds: int = flag(3, "seeds; each its own data split, base model and runs")
    out: str = flag("out/sudoku", "checkpoints, cached runs (keyed by their config) and results")
    results: str = flag("results.json", "results file name under --out")
    workers: int = flag(0, "worker processes for independent runs (0: one per CPU core); any "
                           "number gives the same results")
    device: str = flag("cpu", "where models train and decode (cuda: runs and bases are cached "
                              "apart, as a GPU's numbers differ by float rounding)",
                       choices=("cpu", "cuda"))
    regime: str = flag("early", "minimal: unique minimal puzzles, base trained over all mask "
                                "ratios; early: a base that rarely saw mostly-masked responses; "
                                "multi: puzzles with 2-4 solutions, scored by validity",
                       choices=("minimal", "early", "multi"))
    # data
    n_pretrain: int = flag(4000, "pretraining puzzles (with solutions)")
    n_distill: int = flag(2000, "self-distillation prompts (puzzles only)")
    n_test: int = flag(256, "test puzzles (the paper evaluates on 256)")
    most_solutions: int = flag(4, "the multi regime's puzzles keep at most this many solutions")
    # the base model (~1M parameters) and its pretraining
    d_model: int = flag(128, "width of the base model")
    n_layers: int = flag(4, "blocks of the base model")
    n_heads: int = flag(4, "attention heads of the base model")
    mlp_hidden_size: int = flag(512, "MLP width of the base model")
    pretrain_lr: float = flag(1e-3, "AdamW learning rate of pretraining")
    pretrain_batch: int = flag(128, "puzzles per pretraining step")
    base_target: float = flag(0.9, "stop pretraining at this validation blank-cell accuracy "
                                   "(1 token/step)")
    pretrain_max_steps: int = flag(4000, "pretraining steps at most")
    eval_every: int = flag(50, "pretraining steps between validation checks")
    early_t: float = flag(0.6, "early regime: most pretraining mask ratios are t ~ U(0, early_t)")
    early_share: float = flag(0.8, "early regime: the share of pretraining rows with t ~ U(0, "
                                   "early_t) (the rest: U(0, 1))")
    # post-training: every method the same budget, chosen on validation by --study
    methods: tuple = flag(("base", "self", "copsd"), "table rows: base (no training), a method, "
                          "or sft+METHOD (SFT, then METHOD)", choices=("base",) + METHODS)
    readings: bool = flag(False, "add a COPSD row for each other reading of Eq. 6 (--objective)")
    steps: int = flag(20, "optimiser steps of every method (the study's choice on validation)")
    prompts_per_step: int = flag(8, "prompts per optimiser step")
    lr: float = flag(3e-5, "AdamW learning rate of every method (the study's choice)")
    opdlm_lr: float = flag(3e-4, "OPDLM's learning rate (its student starts as a next-token "
                                 "predictor)")
    opdlm_steps: int = flag(400, "OPDLM's own budget (its conversion from an AR model ends "
                                 "after 16000-24000: README)")
    curve_every: int = flag(0, "validation accuracy at 1 and 16 tokens/step every this many "
                               "post-training steps (learning curves; --study: 20); 0 = off")
    # experiments
    ablations: bool = flag(False, "add Table 4's rows: w/o group normalisation, with Z, "
                                  "COPSD-Random")
    s_sweep: bool = flag(False, "add Figure 3's rows: COPSD at each --sweep_s")
    sweep_s: tuple = flag((0.1, 0.3, 0.7, 0.8), "s/T values of Figure 3 besides --s")
    study: bool = flag(False, "every regime, every row, budgets and learning rate chosen per "
                              "regime on validation, figures (hours: prints its estimate first)")
    study_lrs: tuple = flag((3e-5, 1e-4), "--study: the learning rates to choose from")
    study_steps: int = flag(120, "--study: the learning curves' length, the longest budget it "
                                 "can choose")
    study_regimes: tuple = flag(("minimal", "early", "multi"), "--study: the regimes (each is "
                                "independent: split a study over machines, then run it whole "
                                "from the merged cache)", choices=("minimal", "early", "multi"))
    premise_prompts: int = flag(64, "prompts for the self-consistency measurement")
    premise_K: int = flag(16, "completions per prompt for the self-consistency measurement")
    # evaluation
    tokens_per_step: tuple = flag((1, 2, 4, 8, 16), "tokens decoded per step in evaluation "
                                  "(Table 1's columns)")
    cache: str = flag("none", "K/V cache in evaluation (one block of 16: prefix and dual are "
                              "the same)", choices=("none", "prefix", "dual"))
    refresh: int = flag(0, "with --cache: also refresh the whole cache every this many steps of "
                           "a block (0: at the block's start only, as Fast-dLLM)")
    threshold: float = flag(0.0, "confidence-threshold decoding in evaluation: one column, with "
                                 "its tokens per forward; 0 = off")
    solve: str = flag("", "solve this puzzle (16 digits 0-4, 0 = blank) and exit")
    ckpt: str = flag("", "--solve with this checkpoint instead of the newest cached base")


def model_config(cfg):
    return ModelConfig(d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads,
                       n_layers=cfg.n_layers, mlp_hidden_size=cfg.mlp_hidden_size,
                       vocab_size=VOCAB, embedding_size=VOCAB, rope_theta=10000.0,
                       max_sequence_length=PROMPT_LEN + GEN_LEN, mask_token_id=MASK_ID,
                       eos_token_id=0, pad_token_id=0)


def on_gpu(cfg):
    return [cfg.device] if cfg.device != "cpu" else []


def digest(*parts):
    """A cache key. A run on a GPU (--device cuda) adds its device: its numbers differ."""
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


def regime_data(cfg, seed):
    """The regime's splits (make_splits), kept on disk: a rerun need not search again."""
    most = cfg.most_solutions if cfg.regime == "multi" else 1
    key = digest(seed, most, cfg.n_pretrain, cfg.n_distill, cfg.n_test)
    path = os.path.join(cfg.out, f"splits-{key}.npz")
    if os.path.exists(path):
        z = np.load(path)
        return {k: (z[k + "_p"], z[k + "_s"]) for k in ("pretrain", "distill", "val", "test")}
    data = make_splits(seed, cfg.n_pretrain, cfg.n_distill, cfg.n_test, most=most)
    os.makedirs(cfg.out, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **{f"{k}_{w}": v[i] for k, v in data.items() for i, w in enumerate("ps")})
    os.replace(tmp, path)
    return data


# ----------------------------------------------------------------------------------------------
# pretraining the base (cached by what determines it)

PRETRAIN_FIELDS = ["regime", "most_solutions", "n_pretrain", "n_distill", "n_test", "d_model",
                   "n_layers", "n_heads", "mlp_hidden_size", "pretrain_lr", "pretrain_batch",
                   "base_target", "pretrain_max_steps", "eval_every", "early_t", "early_share"]


def pretrain(cfg, seed, causal=False, budget=None):
    """The base MDM (LLaDA's loss, Eq. 3) of the regime, trained until the validation target
    (blank-cell accuracy at 1 token/step). The early regime draws most rows' mask ratio from
    U(0, early_t): a stand-in for an instruct model whose fine-tuning rarely saw a mostly masked
    response, so its first decoding steps are worse than its later ones by construction.
    causal=True: OPDLM's autoregressive teacher of the same architecture (next-token loss on
    the response), trained for `budget` steps (left to right it cannot make a minimal puzzle's
    chained deductions and plateaus below the target). Returns the checkpoint's path."""
    key = digest(seed, causal, [getattr(cfg, f) for f in PRETRAIN_FIELDS], *on_gpu(cfg))
    path = os.path.join(cfg.out, f"{'ar' if causal else 'base'}-{key}")
    if os.path.isdir(path):
        return path
    data = regime_data(cfg, seed)
    torch.manual_seed(seed)
    dev = cfg.device
    model = LLaDA(dataclasses.replace(model_config(cfg), causal=causal)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    puzzles, sols = data["pretrain"]
    seq = torch.cat([encode_prompt(puzzles, dev), torch.as_tensor(sols, device=dev)], 1)
    g = torch.Generator(dev).manual_seed(seed)
    acc, n, eps = 0.0, cfg.pretrain_batch, 1e-3
    progress = bar(range(1, (budget or cfg.pretrain_max_steps) + 1), desc=f"pretrain ({seed})")
    for step in progress:
        model.train()
        batch = seq[torch.randint(len(seq), (n,), generator=g, device=dev)]
        if causal:  # position j - 1 predicts response token j
            logits = model(batch, start=PROMPT_LEN - 1)[:, :-1]
            loss = F.cross_entropy(rearrange(logits, "b l v -> (b l) v"),
                                   batch[:, PROMPT_LEN:].flatten())
        else:
            t = None
            if cfg.regime == "early":
                u, low = (torch.rand(n, generator=g, device=dev),
                          torch.rand(n, generator=g, device=dev) < cfg.early_share)
                t = eps + u * torch.where(low, cfg.early_t - eps, 1 - eps)
            loss, _ = copsd.mdm_loss(model, copsd.Rollout(batch, None, PROMPT_LEN), MASK_ID,
                                     generator=g, t=t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.eval_every == 0 and not causal:  # the AR teacher trains its fixed budget
            acc = evaluate(model, data["val"], columns(cfg, [1]))["1"]["cell_acc"]
            if acc >= cfg.base_target:
                break
        progress.set_postfix(loss=f"{loss.item():.3f}", val_acc=f"{acc:.3f}")
    model.cfg.extra["pretrain_steps"] = step  # config.json keeps it: the AR teacher's budget
    save_pretrained(path, model.cfg, model.state_dict())
    return path


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
    """The premise as a number. The model samples y for each puzzle; y_t masks it at t; its
    early marginal p(.|y_t) is compared, at the cells masked in both views, with the mean of the
    later-view predictions p(.|y^k_{t-s}) over K of its own completions y^k of y_t. A perfectly
    self-consistent MDM has p(.|y_t) = E_k p(.|y^k_{t-s}). Returns Σ_v (p(v) - mean_k p̃_k(v))^2
    averaged over cells, less the K-sample mean's own variance (an unbiased estimate)."""
    g = torch.Generator(model.device).manual_seed(seed)
    prompt = encode_prompt(puzzles, model.device)
    y = copsd.generate(model, prompt, None, MASK_ID, GEN_LEN, GEN_LEN, GEN_LEN // 2,
                       temperature=1.0, generator=g)
    mask_t, mask_ts = copsd.nested_masks((len(y), GEN_LEN), t, s, generator=g, device=y.device)
    y_t = copsd.apply_mask(y, PROMPT_LEN, mask_t, MASK_ID)
    p = F.softmax(model(y_t, start=PROMPT_LEN), -1)
    later = copsd.apply_mask(complete(model, copsd.per_prompt(y_t, K), g), PROMPT_LEN,
                             copsd.per_prompt(mask_ts, K), MASK_ID)
    p_k = rearrange(F.softmax(model(later, start=PROMPT_LEN), -1), "(b k) l v -> b k l v", k=K)
    gap = ((p - p_k.mean(1)) ** 2 - p_k.var(1) / K).sum(-1)
    return float((gap * mask_ts).sum() / mask_ts.sum())


# ----------------------------------------------------------------------------------------------
# post-training from the base: every method (copsd.METHODS) runs the same loop, budget
# (cfg.steps optimiser steps of prompts_per_step x K rows) and optimiser


def loss_options(method, c, teacher):
    """Each method's keyword options for its loss (copsd.METHODS), from the config."""
    return dict(copsd=c.copsd_loss_kw(),
                dopsd=dict(n_steps=2),  # 2 of the rollout's 8 steps: about the others' passes
                opdlm=dict(teacher=teacher)).get(method, {})


def post_train(model, c, data, method, seed, teacher=None, curve=None, start=0, keep=None):
    """Train `model` in place on the distillation puzzles with `method` for c.steps optimiser
    steps (OPDLM: c.opdlm_steps). Every `resample_every` steps a rollout of resample_every x
    prompts_per_step prompts x K responses is drawn with the current weights (θ') and consumed
    one slice per step (resample_every = 0: one rollout from p_0, reused). SFT draws as many
    solved puzzles per step as the others have rows. Every c.curve_every steps the validation
    accuracy at 1 and 16 tokens/step goes into `curve` (step numbers from `start`), and `keep`,
    a directory, receives the weights. Returns the per-step loss and stats."""
    steps, lr = (c.opdlm_steps, c.opdlm_lr) if method == "opdlm" else (c.steps, c.lr)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    puzzles, sols = data["distill"]
    dev = model.device
    prompts, answers = encode_prompt(puzzles, dev), torch.as_tensor(sols, device=dev)
    g = torch.Generator(dev).manual_seed(seed)
    sampler = dict(gen_length=GEN_LEN, block_length=GEN_LEN,
                   steps=GEN_LEN // c.train_tokens_per_step, temperature=c.temperature)
    window = c.resample_every or steps
    K = 1 if method == "sft" else c.K
    rows = c.prompts_per_step * c.K
    loss_fn, options = copsd.METHODS[method][1], loss_options(method, c, teacher)
    history = []
    for step in bar(range(steps), desc=f"{method} ({seed})"):
        if step % window == 0 and (c.resample_every or step == 0):
            model.eval()
            idx = torch.randint(len(prompts), (window * rows // K,), generator=g, device=dev)
            ro = copsd.make_rollout(method, model, prompts[idx], None, MASK_ID, K=K,
                                    answers=answers[idx], copsd_kw=c.copsd_kw(), generator=g,
                                    **sampler)
        model.train()
        part = ro[(step % window) * rows:(step % window + 1) * rows]
        loss, stats = loss_fn(model, part, MASK_ID, generator=g, **options)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(dict(loss=loss.item(), **{k: round(v, 5) for k, v in stats.items()
                                                 if k in ("d", "kd", "div", "kl")}))
        done = start + step + 1
        if curve is not None and c.curve_every and done % c.curve_every == 0:
            ev = evaluate(model, data["val"], columns(c, [1, 16]))
            curve.append(dict(step=done, **{f"val{n}": ev[n]["cell_acc"] for n in ("1", "16")}))
            if keep:
                save_pretrained(os.path.join(keep, f"step-{done}"), model.cfg, model.state_dict())
    return history


# ----------------------------------------------------------------------------------------------
# rows and runs: a row is a list of training stages with its flags; a run is a row for one seed,
# cached under --out by everything that determines it, so that a rerun only reads results


def rows_of(cfg):
    """{row name: (stages, flags)} for the rows asked for."""
    label = {"base": "Base", "self": "Base-Self", "sft": "SFT", "selfusion": "SelFusion",
             "dopsd": "d-OPSD", "opdlm": "OPDLM",
             "copsd": "COPSD" + ("" if cfg.objective == "paper" else f" ({cfg.objective})")}
    rows = {" + ".join(label[s] for s in m.split("+")): ([] if m == "base" else m.split("+"), {})
            for m in cfg.methods}
    if cfg.readings:
        rows.update({name: (["copsd"], flags) for name, flags in
                     ({"COPSD (paper)": dict(objective="paper")} | READINGS).items()
                     if flags != dict(objective=cfg.objective)})
    if cfg.ablations:
        rows.update({"COPSD w/o group normalization": (["copsd"], dict(group_norm=False)),
                     "COPSD with Z": (["copsd"], dict(keep_z=True)),
                     "COPSD-Random": (["copsd"], dict(random_s=True))})
    if cfg.s_sweep:
        rows.update({f"COPSD s/T={s}": (["copsd"], dict(s=s)) for s in cfg.sweep_s})
    return rows


RUN_FIELDS = PRETRAIN_FIELDS + [f.name for f in fields(MethodConfig)] + [
    "steps", "prompts_per_step", "lr", "opdlm_lr", "opdlm_steps", "curve_every"]


def run_row(cfg, seed, stages, flags, keep=False):
    """Train one row from the seed's base (OPDLM: from its AR teacher made bidirectional) and
    evaluate it on the test split. keep: save the weights at every curve point (the study then
    evaluates the test split at the point chosen on validation, not at the end). The training
    is cached by what determines it, each evaluation by its decoding settings too. Returns
    {"test": {column: scores} or None, "history", "curve", "dir"}."""
    c = dataclasses.replace(cfg, **flags)
    key = digest(seed, stages, keep, [getattr(c, f) for f in RUN_FIELDS], *on_gpu(c))
    d = os.path.join(cfg.out, "runs", f"{'+'.join(stages)}-{key}")
    if not os.path.exists(os.path.join(d, "result.json")):
        data, teacher, history, curve = regime_data(c, seed), None, [], []
        if stages == ["opdlm"]:
            ar = ar_teacher(c, seed)
            teacher = from_pretrained(ar, c.device).requires_grad_(False)
            model = from_pretrained(ar, c.device)
            model.cfg = dataclasses.replace(model.cfg, causal=False)
        else:
            model = from_pretrained(pretrain(c, seed), c.device)
        for i, method in enumerate(stages):
            history.append(post_train(model, c, data, method, seed, teacher, curve,
                                      start=i * c.steps, keep=d if keep else None))
        os.makedirs(d, exist_ok=True)
        save_pretrained(os.path.join(d, "final"), model.cfg, model.state_dict())
        atomic_json(os.path.join(d, "result.json"), dict(history=history, curve=curve, dir=d))
    result = read_json(os.path.join(d, "result.json"))
    return dict(result, test=None if keep else test_scores(c, seed, d, "final"))


def ar_teacher(cfg, seed):
    """OPDLM's autoregressive teacher: the base's architecture, causal, pretrained on the same
    data for as many steps as the seed's base took. Returns the checkpoint's path."""
    budget = read_config(pretrain(cfg, seed)).extra["pretrain_steps"]
    return pretrain(cfg, seed, causal=True, budget=budget)


def base_row(cfg, seed, causal=False):
    """The base itself as a row: its test scores, and the premise measured on it. causal: OPDLM's
    AR teacher instead (decoded left to right, whatever the column; no premise): the accuracy
    OPDLM's conversion can reach."""
    c, base = cfg, ar_teacher(cfg, seed) if causal else pretrain(cfg, seed)
    path = os.path.join(base, f"eval-{digest(columns(c), c.premise_prompts, c.premise_K)}.json")
    if os.path.exists(path):
        return read_json(path)
    data, model = regime_data(c, seed), from_pretrained(base, c.device)
    model.eval()
    gap = None if causal else self_consistency(model, data["val"][0][:c.premise_prompts], c.t,
                                               c.s, c.premise_K, seed)
    result = dict(test=evaluate(model, data["test"], columns(c)), history=[], curve=[],
                  steps=model.cfg.extra["pretrain_steps"], premise=gap,
                  val=evaluate(model, data["val"], columns(c, [1, 16])))
    atomic_json(path, result)
    return result


def test_scores(cfg, seed, run_dir, ckpt):
    """A run's checkpoint (final, or step-N kept for the study) on the test split, cached beside
    the run by the decoding settings: a study merged from several machines needs no weights."""
    tag = "" if ckpt == "final" else f"{ckpt.split('-')[1]}-"
    path = os.path.join(run_dir, f"test-{tag}{digest(columns(cfg))}.json")
    if not os.path.exists(path):
        model = from_pretrained(os.path.join(run_dir, ckpt), cfg.device)
        atomic_json(path, evaluate(model, regime_data(cfg, seed)["test"], columns(cfg)))
    return read_json(path)


def evaluate_at(cfg, seed, run_dir, step):
    """A kept checkpoint of a run, on the test split."""
    return test_scores(cfg, seed, run_dir, f"step-{step}")


def one_thread():
    """Worker set-up: one thread per process (as the serial run, so results are identical), no
    progress bars of its own."""
    global QUIET
    QUIET = True
    torch.set_num_threads(1)


def call(args):
    fn, *rest = args
    return fn(*rest)


def parallel(tasks, workers, desc):
    """[fn(*args) for fn, *args in tasks], in `workers` processes when there are several."""
    if workers <= 1 or len(tasks) <= 1:
        return [call(t) for t in tqdm(tasks, desc=desc)]
    pool = multiprocessing.get_context("spawn").Pool(min(workers, len(tasks)), one_thread)
    try:
        return list(tqdm(pool.imap(call, tasks), total=len(tasks), desc=desc))
    finally:
        pool.close()
        pool.join()


# ----------------------------------------------------------------------------------------------
# the experiment: one regime's table (the default), or the whole study


def run(cfg):
    """One regime: the base's premise and gap, then every row over cfg.seeds seeds."""
    t0 = time.time()
    rows = {"Base": ([], {})} | {k: v for k, v in rows_of(cfg).items() if v[0]}
    if "opdlm" in cfg.methods:
        rows["OPDLM's AR teacher"] = (["ar"], {})
    os.makedirs(cfg.out, exist_ok=True)
    # one process per base: they are the longest tasks, and a second wave would idle a core
    parallel([(pretrain, cfg, seed) for seed in range(cfg.seeds)], max(cfg.workers, cfg.seeds),
             "bases")
    if "opdlm" in cfg.methods:  # before the rows, two of which need each
        parallel([(ar_teacher, cfg, seed) for seed in range(cfg.seeds)],
                 max(cfg.workers, cfg.seeds), "AR teachers")
    tasks = [(base_row, cfg, seed, stages == ["ar"]) if stages in ([], ["ar"]) else
             (run_row, cfg, seed, stages, flags)
             for stages, flags in rows.values() for seed in range(cfg.seeds)]
    done = iter(parallel(tasks, cfg.workers, "rows"))
    results = {name: [next(done) for _ in range(cfg.seeds)] for name in rows}
    print_premise(cfg.regime, results["Base"])
    report(results, list(columns(cfg)), cfg.regime)
    path = os.path.join(cfg.out, cfg.results)
    atomic_json(path, dict(config=dataclasses.asdict(cfg), results=results))
    if cfg.curve_every:
        plot_curves({cfg.regime: results}, os.path.splitext(path)[0] + ".png")
    print(f"\nwall time {time.time() - t0:.0f} s; results in {path}"
          + (", learning curves beside it (.png)" if cfg.curve_every else ""))
    return results


READINGS = {"COPSD (score)": dict(objective="score"), "COPSD (exact)": dict(objective="exact"),
            "COPSD (later)": dict(objective="later"),
            "COPSD (later, forward)": dict(objective="later", later_direction="forward")}
MAIN = {"Base-Self": (["self"], {}), "COPSD": (["copsd"], {})} | {
    name: (["copsd"], flags) for name, flags in READINGS.items()}
OTHER = {"SFT": (["sft"], {}), "SFT + Base-Self": (["sft", "self"], {}),
         "SFT + COPSD": (["sft", "copsd"], {}),
         "COPSD w/o group normalization": (["copsd"], dict(group_norm=False)),
         "COPSD with Z": (["copsd"], dict(keep_z=True)),
         "COPSD-Random": (["copsd"], dict(random_s=True)),
         "SelFusion": (["selfusion"], {}), "d-OPSD": (["dopsd"], {}), "OPDLM": (["opdlm"], {})}


def choose(curves):
    """The budget and learning rate of a regime, on validation: the (lr, step) whose accuracy,
    the mean of 1 and 16 tokens/step, averaged over the rows and seeds, is highest.
    curves: {lr: [curve of each (row, seed)]}. The same choice for every method."""
    score_of = {}
    for lr, runs in curves.items():
        for point in zip(*runs):
            score_of[(lr, point[0]["step"])] = np.mean([p["val1"] + p["val16"] for p in point]) / 2
    return max(score_of, key=score_of.get), score_of


def study(cfg):
    """Every regime: bases and premise; the Table 1 rows at each --study_lrs with learning
    curves; the budget and learning rate chosen on validation (choose); then the other rows
    (SFT, Table 4, Figure 3, the related methods) at that choice; test scores; figures."""
    t0 = time.time()
    cfg = dataclasses.replace(cfg, steps=cfg.study_steps)
    regimes = {r: dataclasses.replace(cfg, regime=r, objective="paper",
                                      curve_every=cfg.curve_every or 20)
               for r in cfg.study_regimes}
    seeds = range(cfg.seeds)
    sweep = {f"COPSD s/T={s}": (["copsd"], dict(s=s)) for s in cfg.sweep_s}
    n_runs = len(regimes) * cfg.seeds * (len(MAIN) * len(cfg.study_lrs) + len(OTHER) + len(sweep))
    print(f"the study: {len(regimes)} regimes x {cfg.seeds} seeds, {n_runs} runs of up to "
          f"{cfg.steps} steps (OPDLM {cfg.opdlm_steps}); estimated "
          f"{estimate(cfg, n_runs) / 3600:.1f} h on {cfg.workers} worker(s)")
    parallel([(pretrain, c, s) for c in regimes.values() for s in seeds], cfg.workers, "bases")
    bases = parallel([(base_row, c, s) for c in regimes.values() for s in seeds], cfg.workers,
                     "premise")
    main = [(c, lr, name, s) for c in regimes.values() for lr in cfg.study_lrs for name in MAIN
            for s in seeds]
    runs = parallel([(run_row, dataclasses.replace(c, lr=lr), s, *MAIN[name], True)
                     for c, lr, name, s in main], cfg.workers, "Table 1 rows, each lr")
    out = {}
    for i, (r, c) in enumerate(regimes.items()):
        mine = [(key, res) for key, res in zip(main, runs) if key[0] is c]
        (lr, step), scores = choose({lr: [res["curve"] for key, res in mine if key[1] == lr]
                                     for lr in cfg.study_lrs})
        out[r] = dict(lr=lr, steps=step, choice=[dict(lr=a, step=b, val=v)
                                                 for (a, b), v in scores.items()],
                      base=bases[i * cfg.seeds:(i + 1) * cfg.seeds],
                      runs={(key[2], key[3]): res for key, res in mine if key[1] == lr})
    tests = parallel([(evaluate_at, regimes[r], s, out[r]["runs"][(name, s)]["dir"],
                       out[r]["steps"]) for r in regimes for name in MAIN for s in seeds],
                     cfg.workers, "test at the chosen budget")
    rest = parallel([(run_row, dataclasses.replace(regimes[r], lr=out[r]["lr"],
                                                   steps=out[r]["steps"]), s, *spec)
                     for r in regimes for spec in (OTHER | sweep).values() for s in seeds],
                    cfg.workers, "the other rows")
    tests, rest = iter(tests), iter(rest)
    results = {}
    for r in regimes:
        table = {"Base": out[r]["base"]}
        for name in MAIN:
            table[name] = [dict(out[r]["runs"][(name, s)], test=next(tests)) for s in seeds]
        for name in OTHER | sweep:
            table[name] = [next(rest) for _ in seeds]
        results[r] = dict(lr=out[r]["lr"], steps=out[r]["steps"], choice=out[r]["choice"],
                          table=table)
        print(f"\n=== regime {r}: lr {out[r]['lr']}, {out[r]['steps']} steps (chosen on "
              "validation) ===")
        print_premise(r, table["Base"])
        report(table, list(columns(cfg)), r)
    atomic_json(os.path.join(cfg.out, "study.json"), dict(config=dataclasses.asdict(cfg),
                                                          results=results))
    plot(results, os.path.join(cfg.out, "figures"), list(columns(cfg)), cfg)
    print(f"\nwall time {(time.time() - t0) / 3600:.2f} h; results in {cfg.out}/study.json, "
          f"figures in {cfg.out}/figures")
    return results


def estimate(cfg, n_runs):
    """Seconds the study should take: a few post-training steps and one validation pass of a
    random model, timed here, scaled to every run's steps and curve points."""
    torch.manual_seed(0)
    model, data = LLaDA(model_config(cfg)), make_splits(0, 0, 64, 0, n_val=256)
    c = dataclasses.replace(cfg, steps=cfg.resample_every or 8, curve_every=0)
    t = time.time()
    post_train(model, c, data, "copsd", 0)
    per_step = (time.time() - t) / c.steps
    t = time.time()
    evaluate(model, data["val"], columns(c, [1, 16]))
    per_point = time.time() - t
    runs = n_runs * (cfg.steps * per_step + cfg.steps // (cfg.curve_every or 20) * per_point)
    bases = 3 * cfg.seeds * 600 * per_step / 4  # ~600 pretraining steps, a quarter the cost
    return (runs + bases) / max(cfg.workers, 1)


# ----------------------------------------------------------------------------------------------
# tables and figures


def print_premise(regime, base):
    gap = [100 * (b["test"]["1"]["cell_acc"] - b["test"]["16"]["cell_acc"]) for b in base
           if "1" in b["test"] and "16" in b["test"]]
    print(f"\n{regime}: the base's self-consistency gap at t/T = 0.9 (0 for a self-consistent "
          f"MDM): {np.mean([b['premise'] for b in base]):.4f} ± "
          f"{np.std([b['premise'] for b in base]):.4f}; its loss from 1 to 16 tokens/step: "
          + (f"{np.mean(gap):.1f} points" if gap else "—"))


def report(results, cols, regime):
    for key, what in (("cell_acc", "blank cells filled correctly"),
                      ("solved", "puzzles solved completely")):
        print(f"\n{regime}: {what} (%), mean ± std over seeds")
        width = max(len(r) for r in results) + 2
        print("Model / # Tokens".ljust(width) + "".join(f"{n:>15}" for n in cols))
        for row, per_seed in results.items():
            v = 100 * np.array([[r["test"][n][key] for n in cols] for r in per_seed])
            print(row.ljust(width) + "".join(f"{m:6.2f} ± {s:5.2f}".rjust(15)
                                             for m, s in zip(v.mean(0), v.std(0))))


def pyplot():
    import matplotlib  # the figures only: sudoku.py runs without it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def figure(path, panels, draw, xlabel, ylabel, log_ns=None):
    """One PNG, a panel per {title: data}: draw(ax, data), the axes' labels, a grid, the legend
    in the last panel (log_ns: a log2 x axis with these ticks)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, data) in zip(axes[0], panels.items()):
        draw(ax, data)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        if log_ns:
            ax.set_xscale("log", base=2)
            ax.set_xticks(log_ns, [str(n) for n in log_ns])
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(results, out_dir, cols, cfg):
    """The README's figures, from the study's results: accuracy over tokens per step (Table 1
    and the related methods as a picture), learning curves, Figure 2 (the calibration distance
    over training) and Figure 3 (accuracy over s/T)."""
    os.makedirs(out_dir, exist_ok=True)
    ns = [int(n) for n in cols]
    hues = [pyplot().cm.tab20(j) for j in [*range(0, 20, 2), *range(1, 20, 2)]]
    color = dict(zip(["Base", *MAIN, *OTHER], hues))  # a row keeps its color in every figure
    panels = {f"{r} (lr {res['lr']}, {res['steps']} steps)": res["table"]
              for r, res in results.items()}

    def acc(runs, n):
        v = 100 * np.array([r["test"][n]["cell_acc"] for r in runs])
        return v.mean(), v.std()

    def by_tokens(names):
        def draw(ax, table):
            for row in names:
                m = np.array([acc(table[row], n) for n in cols])
                ax.errorbar(ns, m[:, 0], yerr=m[:, 1], marker="o", ms=3, capsize=2, label=row,
                            color=color[row])
        return draw

    def curves(ax, table):
        for row in list(MAIN) + ["SFT", "SelFusion", "d-OPSD"]:
            runs = [r["curve"] for r in table[row]]
            steps = [p["step"] for p in runs[0]]
            for key, style in (("val1", "-"), ("val16", "--")):
                v = 100 * np.array([[p[key] for p in c] for c in runs]).mean(0)
                ax.plot([0] + steps, [100 * np.mean([b["val"][key[3:]]["cell_acc"]
                                                     for b in table["Base"]])] + list(v),
                        style, color=color[row], label=row if key == "val1" else None)

    def distance(ax, table):
        for row in [name for name in MAIN if name.startswith("COPSD")]:
            d = np.array([[h["d"] for h in r["history"][0]] for r in table[row]]).mean(0)
            ax.plot(np.convolve(d, np.ones(5) / 5, mode="valid"), label=row, color=color[row])

    def s_sweep(ax, table):
        values = sorted([cfg.s] + list(cfg.sweep_s))
        for n, style in (("1", "o-"), ("4", "s-"), ("16", "^-")):
            rows = [table["COPSD" if s == cfg.s else f"COPSD s/T={s}"] for s in values]
            m = np.array([acc(r, n) for r in rows])
            ax.errorbar(values, m[:, 0], yerr=m[:, 1], fmt=style, capsize=2,
                        label=f"COPSD, {n} tokens/step")
            ax.axhline(acc(table["Base"], n)[0], ls=":", color="gray")

    def save(name, draw, ylabel, xlabel, log_ns=None):
        figure(os.path.join(out_dir, name), panels, draw, xlabel, ylabel, log_ns)

    save("table1.png", by_tokens(["Base"] + list(MAIN)), "blank cells correct (%)",
         "tokens per step", ns)
    save("related.png", by_tokens(["Base", "Base-Self", "COPSD", "SFT", "SFT + Base-Self",
                                   "SFT + COPSD", "SelFusion", "d-OPSD", "OPDLM"]),
         "blank cells correct (%)", "tokens per step", ns)
    save("curves.png", curves, "validation blank cells (%)",
         "post-training step (solid: 1, dashed: 16 tokens/step)")
    save("figure2.png", distance, "calibration distance d (5-step mean)", "post-training step")
    save("figure3.png", s_sweep, "blank cells correct (%)", "s/T (t/T = 0.9); gray: Base")


def plot_curves(panels, path):
    """Learning curves of runs with --curve_every, one panel per {title: results}: each trained
    row's validation accuracy (mean over seeds; solid 1, dashed 16 tokens/step) and, as
    horizontal lines, the rows that did not train (the base, OPDLM's AR teacher)."""
    def draw(ax, results):
        for i, (row, runs) in enumerate(results.items()):
            for n, style in (("1", "-"), ("16", "--")):
                label = row if n == "1" else None
                if runs[0]["curve"]:
                    steps = [p["step"] for p in runs[0]["curve"]]
                    v = 100 * np.mean([[p[f"val{n}"] for p in r["curve"]] for r in runs], 0)
                    ax.plot(steps, v, style, color=f"C{i}", label=label)
                elif "val" in runs[0]:
                    ax.axhline(100 * np.mean([r["val"][n]["cell_acc"] for r in runs]),
                               ls=style, lw=1, color=f"C{i}", label=label)

    figure(path, panels, draw, "post-training step (solid: 1, dashed: 16 tokens/step)",
           "validation blank cells (%)")


def solve(cfg):
    puzzle = parse_puzzle(cfg.solve)
    path = cfg.ckpt
    if not path:
        bases = ([e for e in os.scandir(cfg.out) if e.name.startswith("base-")]
                 if os.path.isdir(cfg.out) else [])
        if not bases:
            raise SystemExit(f"--solve: no trained model in {cfg.out}; run `python sudoku.py` "
                             "first or pass --ckpt")
        path = max(bases, key=lambda e: e.stat().st_mtime).path
    model = from_pretrained(path)
    model.eval()
    grid = np.where(puzzle > 0, puzzle, decode(model, puzzle[None], steps=GEN_LEN)[0][0])
    for r in range(4):
        print(" ".join(str(v) for v in grid[4 * r:4 * r + 4]))
    ok = any((grid == s).all() for s in solutions(puzzle))
    print("valid solution" if ok else "not a valid solution")


if __name__ == "__main__":
    cfg = parse_config(Config, description=__doc__)
    cfg = dataclasses.replace(cfg, workers=cfg.workers or os.cpu_count() or 1)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU here")
    torch.set_num_threads(1)  # one thread per run, serial or parallel: the same numbers
    if cfg.solve:
        solve(cfg)
    else:
        study(cfg) if cfg.study else run(cfg)
