"""
4x4 Sudoku on a laptop CPU: the paper's Sudoku tables (Table 1, Table 4, Figure 3) in minutes.

    python sudoku.py                  # data, base model, Base-Self and COPSD: Table 1, 3 seeds
    python sudoku.py --ablations      # + Table 4's rows (w/o group norm, with Z, COPSD-Random)
    python sudoku.py --s_sweep        # + Figure 3: s/T at t/T = 0.9
    python sudoku.py --methods base,self,copsd,sft,sft+copsd,selfusion,dopsd,opdlm
    python sudoku.py --solve 1000002000300004   # a puzzle of your own, 0 = blank

Methods (--methods): self = Base-Self, naive self-distillation (Alg. 1); copsd (Alg. 2); sft =
the MDM loss on ground-truth solutions; sft+X = SFT, then X; the related methods selfusion, dopsd
(d-OPSD) and opdlm (OPDLM, from an autoregressive teacher of the same size).

A small LLaDA (model.py, ~1M parameters) is pretrained from scratch with the MDM loss on puzzles
with their solutions until it reaches a validation target: imperfect, and losing accuracy as more
tokens are decoded per step, like LLaDA-8B-Instruct on Sudoku. From that same base each method
then trains on puzzles alone (no solutions) with the same sampling and update budget.
"""

import argparse
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import time
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

import copsd
from model import LLaDA, ModelConfig, from_pretrained, save_pretrained

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


def minimal_puzzle(grid, rng):
    """Remove givens in random order while the solution stays unique: a minimal puzzle (4-6
    givens). Easy puzzles (6-10 givens) a small model solves in one pass as well as cell by cell,
    so parallel decoding loses nothing; minimal ones need chained deductions (a cell's value
    follows from other blanks' values), which a shallow model cannot make in one pass."""
    p = grid.copy()
    for c in rng.permutation(16):
        v, p[c] = p[c], 0
        if len(solutions(p)) > 1:
            p[c] = v
    return p


def make_splits(seed, n_pretrain, n_distill, n_test, n_val=256):
    """Disjoint sets of unique minimal puzzles: pretraining (with solutions), self-distillation
    prompts (puzzles only), validation and test. {split: (puzzles, solutions)}, (n, 16) each."""
    rng = np.random.default_rng(seed)
    need, seen, puzzles = n_pretrain + n_distill + n_val + n_test, set(), []
    with tqdm(total=need, desc="puzzles", leave=False) as bar:
        for _ in range(50 * need):
            p = minimal_puzzle(grids()[rng.integers(len(grids()))], rng)
            if p.tobytes() not in seen:
                seen.add(p.tobytes())
                puzzles.append(p)
                bar.update()
                if len(puzzles) == need:
                    break
    if len(puzzles) < need:
        raise SystemExit(f"only {len(puzzles)} distinct minimal puzzles found; ask for fewer")
    puzzles = np.array(puzzles)
    sols = np.array([solutions(p)[0] for p in puzzles])
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


def encode_prompt(puzzles):
    p = torch.as_tensor(np.asarray(puzzles), dtype=torch.long)
    return 5 + 5 * torch.arange(16) + p


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
def decode(model, puzzles, n):
    prompt = encode_prompt(puzzles)
    if model.cfg.causal:  # OPDLM's AR teacher: left to right, one token per step whatever n
        x = prompt
        for _ in range(GEN_LEN):
            x = torch.cat([x, model(x, start=x.shape[1] - 1).argmax(-1)], 1)
        return x[:, PROMPT_LEN:].numpy()
    seq = copsd.generate(model, prompt, None, MASK_ID, gen_length=GEN_LEN, block_length=GEN_LEN,
                         steps=GEN_LEN // n)
    return seq[:, PROMPT_LEN:].numpy()  # tokens 1-4 are the digits (anything else scores wrong)


def score(filled, puzzles, sols):
    blank = puzzles == 0
    right = (filled == sols) | ~blank
    return dict(cell_acc=float((right & blank).sum() / blank.sum()),
                solved=float(right.all(1).mean()))


def evaluate(model, split, ns, batch=512):
    model.eval()
    puzzles, sols = split
    out = {}
    for n in ns:
        filled = np.concatenate([decode(model, puzzles[i:i + batch], n)
                                 for i in range(0, len(puzzles), batch)])
        out[n] = score(filled, puzzles, sols)
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
    for klass in cls.__mro__[:-1]:
        group = ap if klass is cls else ap.add_argument_group(klass.__doc__.split("\n")[0])
        for f in fields(klass):
            if f.name in vars(klass).get("__annotations__", {}):
                add_flag(group, f)
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

    def copsd_kw(self):
        """copsd_rollout's options."""
        return dict(t=self.t, s=self.s, random_s=self.random_s, keep_z=self.keep_z,
                    group_norm=self.group_norm)


METHODS = ("self", "copsd", "sft", "sft+self", "sft+copsd", "selfusion", "dopsd", "opdlm")


@dataclass
class Config(MethodConfig):
    seeds: int = flag(3, "seeds; each its own data split, base model and runs")
    out: str = flag("out/sudoku", "checkpoints (bases cached by their config) and results")
    results: str = flag("results.json", "results file name under --out")
    # data
    n_pretrain: int = flag(4000, "pretraining puzzles (with solutions)")
    n_distill: int = flag(2000, "self-distillation prompts (puzzles only)")
    n_test: int = flag(256, "test puzzles (the paper evaluates on 256)")
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
    # post-training: every method the same budget
    methods: tuple = flag(("base", "self", "copsd"), "table rows: base (no training), a method, "
                          "or sft+METHOD (SFT, then METHOD)", choices=("base",) + METHODS)
    steps: int = flag(40, "optimiser steps of every method")
    prompts_per_step: int = flag(16, "prompts per optimiser step")
    lr: float = flag(1e-5, "AdamW learning rate of every method")
    opdlm_lr: float = flag(3e-4, "OPDLM's learning rate (its student starts as a next-token "
                                 "predictor)")
    # experiments
    ablations: bool = flag(False, "add Table 4's rows: w/o group normalisation, with Z, "
                                  "COPSD-Random")
    s_sweep: bool = flag(False, "add Figure 3's rows: COPSD at each --sweep_s")
    sweep_s: tuple = flag((0.1, 0.3, 0.5, 0.7, 0.8), "s/T values of Figure 3")
    tokens_per_step: tuple = flag((1, 2, 4, 8, 16), "tokens decoded per step in evaluation "
                                  "(Table 1's columns)")
    solve: str = flag("", "solve this puzzle (16 digits 0-4, 0 = blank) and exit")
    ckpt: str = flag("", "--solve with this checkpoint instead of the newest cached base")


def model_config(cfg):
    return ModelConfig(d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads,
                       n_layers=cfg.n_layers, mlp_hidden_size=cfg.mlp_hidden_size,
                       vocab_size=VOCAB, embedding_size=VOCAB, rope_theta=10000.0,
                       max_sequence_length=PROMPT_LEN + GEN_LEN, mask_token_id=MASK_ID,
                       eos_token_id=0, pad_token_id=0)


# ----------------------------------------------------------------------------------------------
# pretraining the base (cached by its config)


def pretrain(cfg, data, seed, causal=False, budget=None):
    """The base MDM (LLaDA's loss, Eq. 3), trained until the validation target (blank-cell
    accuracy at 1 token/step), or, causal=True, OPDLM's autoregressive teacher of the same
    architecture (next-token loss on the response) trained for `budget` steps: the same data and
    steps as that seed's base (left to right it cannot make a minimal puzzle's chained deductions
    and plateaus below the target). Cached under cfg.out by a hash of what determines it."""
    used = ["n_pretrain", "n_distill", "n_test", "d_model", "n_layers", "n_heads",
            "mlp_hidden_size", "pretrain_lr", "pretrain_batch", "base_target",
            "pretrain_max_steps", "eval_every"]
    key = [seed] + [getattr(cfg, f) for f in used] + [causal] * causal
    name = "ar" if causal else "base"
    digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:10]
    path = os.path.join(cfg.out, f"{name}-{digest}")
    if os.path.isdir(path):
        return from_pretrained(path), path
    torch.manual_seed(seed)
    model = LLaDA(dataclasses.replace(model_config(cfg), causal=causal))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    puzzles, sols = data["pretrain"]
    seq = torch.cat([encode_prompt(puzzles), torch.as_tensor(sols)], 1)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(1, (budget or cfg.pretrain_max_steps) + 1),
               desc=f"pretrain {name} (seed {seed})")
    acc = 0.0
    for step in bar:
        model.train()
        batch = seq[torch.randint(len(seq), (cfg.pretrain_batch,), generator=g)]
        if causal:  # position j - 1 predicts response token j
            logits = model(batch, start=PROMPT_LEN - 1)[:, :-1]
            loss = F.cross_entropy(rearrange(logits, "b l v -> (b l) v"),
                                   batch[:, PROMPT_LEN:].flatten())
        else:
            loss, _ = copsd.mdm_loss(model, copsd.Rollout(batch, None, PROMPT_LEN), MASK_ID,
                                     generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.eval_every == 0 and not causal:  # the AR teacher trains its fixed budget
            acc = evaluate(model, data["val"], [1])[1]["cell_acc"]
            if acc >= cfg.base_target:
                break
        bar.set_postfix(loss=f"{loss.item():.3f}", val_acc=f"{acc:.3f}")
    bar.close()
    if causal:
        acc = evaluate(model, data["val"], [1])[1]["cell_acc"]
    print(f"{name} (seed {seed}): {step} steps, val blank-cell accuracy {acc:.3f} at 1 token/step")
    model.cfg.extra["pretrain_steps"] = step  # config.json keeps it: the AR teacher's budget
    save_pretrained(path, model.cfg, model.state_dict())
    return model, path


# ----------------------------------------------------------------------------------------------
# post-training from the base: every method (copsd.METHODS) runs the same loop, budget
# (cfg.steps optimiser steps of prompts_per_step x K rows) and optimiser


def loss_options(method, c, teacher):
    """Each method's keyword options for its loss (copsd.METHODS), from the config."""
    return dict(dopsd=dict(n_steps=2),  # 2 of the rollout's 8 steps: about the others' passes
                opdlm=dict(teacher=teacher)).get(method, {})


def post_train(model, cfg, data, method, seed, teacher=None, **overrides):
    """Train `model` in place on the distillation puzzles with `method` for cfg.steps optimiser
    steps. Every `resample_every` steps a rollout of resample_every * prompts_per_step prompts x
    K responses is drawn with the current weights (θ') and consumed one slice per step
    (resample_every = 0: one rollout from p_0 before training, reused). SFT draws as many solved
    puzzles per step as the others have rows. Returns the per-step loss and stats."""
    c = dataclasses.replace(cfg, **overrides)
    opt = torch.optim.AdamW(model.parameters(), lr=c.opdlm_lr if method == "opdlm" else c.lr,
                            weight_decay=0.0)
    puzzles, sols = data["distill"]
    prompts, answers = encode_prompt(puzzles), torch.as_tensor(sols)
    g = torch.Generator().manual_seed(seed)
    sampler = dict(gen_length=GEN_LEN, block_length=GEN_LEN,
                   steps=GEN_LEN // c.train_tokens_per_step, temperature=c.temperature)
    window = c.resample_every or c.steps
    K = 1 if method == "sft" else c.K
    rows = c.prompts_per_step * c.K
    loss_fn, options = copsd.METHODS[method][1], loss_options(method, c, teacher)
    bar, history = tqdm(range(c.steps), desc=f"{method} (seed {seed})", leave=False), []
    for step in bar:
        if step % window == 0 and (c.resample_every or step == 0):
            model.eval()
            idx = torch.randint(len(prompts), (window * rows // K,), generator=g)
            ro = copsd.make_rollout(method, model, prompts[idx], None, MASK_ID, K=K,
                                    answers=answers[idx], copsd_kw=c.copsd_kw(), generator=g,
                                    **sampler)
        model.train()
        part = ro[(step % window) * rows:(step % window + 1) * rows]
        loss, stats = loss_fn(model, part, MASK_ID, generator=g, **options)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stats = {k: round(v, 5) for k, v in stats.items() if k in ("d", "kd", "div", "kl")}
        bar.set_postfix(loss=f"{loss.item():.3f}", **stats)
        history.append(dict(loss=loss.item(), **stats))
    return history


# ----------------------------------------------------------------------------------------------
# the experiment and its tables

ROWS = {"base": "Base", "self": "Base-Self", "copsd": "COPSD", "sft": "SFT",
        "sft+self": "SFT + Base-Self", "sft+copsd": "SFT + COPSD", "selfusion": "SelFusion",
        "dopsd": "d-OPSD", "opdlm": "OPDLM"}


def rows_to_run(cfg):
    """(row name, [method stages], overrides) for every row asked for; "sft+copsd" is SFT and
    then COPSD, each with the full budget (Table 1's lower half)."""
    rows = [(ROWS[m], [] if m == "base" else m.split("+"), {}) for m in cfg.methods]
    if cfg.ablations:
        rows += [("COPSD w/o group normalization", ["copsd"], dict(group_norm=False)),
                 ("COPSD with Z", ["copsd"], dict(keep_z=True)),
                 ("COPSD-Random", ["copsd"], dict(random_s=True))]
    if cfg.s_sweep:
        rows += [(f"COPSD s/T={s}", ["copsd"], dict(s=s)) for s in cfg.sweep_s]
    return rows


def print_table(results, ns, key, title):
    width = max(len(r) for r in results) + 2
    print(f"\n{title}\n" + "Model / # Tokens".ljust(width) + "".join(f"{n:>15}" for n in ns))
    for row, per_seed in results.items():
        cells = []
        for n in ns:
            v = 100 * np.array([r[str(n)][key] for r in per_seed])
            cells.append(f"{v.mean():6.2f} ± {v.std():5.2f}".rjust(15))
        print(row.ljust(width) + "".join(cells))


def cached_splits(cfg, seed):
    """make_splits, kept on disk: a rerun need not search for the puzzles again."""
    path = os.path.join(cfg.out, f"splits-{seed}-{cfg.n_pretrain}-{cfg.n_distill}-{cfg.n_test}.npz")
    if os.path.exists(path):
        z = np.load(path)
        return {k: (z[k + "_p"], z[k + "_s"]) for k in ("pretrain", "distill", "val", "test")}
    data = make_splits(seed, cfg.n_pretrain, cfg.n_distill, cfg.n_test)
    np.savez(path + ".tmp.npz", **{f"{k}_{w}": v[i] for k, v in data.items()
                                   for i, w in enumerate("ps")})
    os.replace(path + ".tmp.npz", path)
    return data


def cached_eval(base, base_path, data, ns):
    """The base's evaluation, kept beside its checkpoint (it depends only on the two)."""
    key = hashlib.sha1(data["test"][0].tobytes()).hexdigest()[:8]
    path = os.path.join(base_path, f"eval-{key}.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if all(str(n) in saved for n in ns):
            return {n: saved[str(n)] for n in ns}
    ev = evaluate(base, data["test"], ns)
    with open(path, "w") as f:
        json.dump({str(n): r for n, r in ev.items()}, f)
    return ev


def run(cfg):
    t0 = time.time()
    torch.set_num_threads(min(os.cpu_count() or 1, 8))
    ns = cfg.tokens_per_step
    rows = rows_to_run(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    results = {name: [] for name, _, _ in rows}
    for seed in range(cfg.seeds):
        data = cached_splits(cfg, seed)
        base, base_path = pretrain(cfg, data, seed)
        base_eval = cached_eval(base, base_path, data, ns)
        print(f"base (seed {seed}) blank-cell accuracy by tokens/step: "
              + "  ".join(f"{n}: {100 * r['cell_acc']:.1f}%" for n, r in base_eval.items()))
        for name, stages, overrides in rows:
            teacher, history = None, []
            if not stages:
                ev = base_eval
            else:
                model = from_pretrained(base_path)
                if stages == ["opdlm"]:  # OPDLM: the student is the AR teacher made bidirectional
                    budget = base.cfg.extra.get("pretrain_steps", cfg.pretrain_max_steps)
                    teacher, ar_path = pretrain(cfg, data, seed, causal=True, budget=budget)
                    teacher.requires_grad_(False)
                    model = from_pretrained(ar_path)
                    model.cfg = dataclasses.replace(model.cfg, causal=False)
                history = [post_train(model, cfg, data, method, seed, teacher, **overrides)
                           for method in stages]
                ev = evaluate(model, data["test"], ns)
                slug = name.lower().replace(" ", "-").replace("/", "")
                save_pretrained(os.path.join(cfg.out, f"seed{seed}-{slug}"), model.cfg,
                                model.state_dict())
            results[name].append({**{str(n): r for n, r in ev.items()}, "history": history})
            print(f"  {name} (seed {seed}): "
                  + "  ".join(f"{n}: {100 * r['cell_acc']:.1f}%" for n, r in ev.items()))
    with open(os.path.join(cfg.out, cfg.results), "w") as f:
        json.dump(dict(config=dataclasses.asdict(cfg), results=results,
                       seconds=time.time() - t0), f, indent=2)
    print_table(results, ns, "cell_acc",
                f"Sudoku: blank cells filled correctly (%), mean ± std over {cfg.seeds} seeds")
    print_table(results, ns, "solved", "Sudoku: puzzles solved completely (%)")
    print(f"\nwall time {time.time() - t0:.0f} s; results in {os.path.join(cfg.out, cfg.results)}")
    return results


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
    grid = np.where(puzzle > 0, puzzle, decode(model, puzzle[None], 1)[0])
    for r in range(4):
        print(" ".join(str(v) for v in grid[4 * r:4 * r + 4]))
    ok = any((grid == s).all() for s in solutions(puzzle))
    print("valid solution" if ok else "not a valid solution")


if __name__ == "__main__":
    cfg = parse_config(Config, description=__doc__)
    solve(cfg) if cfg.solve else run(cfg)
