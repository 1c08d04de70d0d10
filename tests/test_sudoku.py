"""sudoku.py: grids, puzzles, splits, the metric, the flags, input checking, the default run end
to end (tiny), --solve, faults (a killed worker, divergence, corrupt files)."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import copsd
import sudoku
from conftest import ROOT
from model import from_pretrained


def valid_grid(g):
    a = np.asarray(g).reshape(4, 4)
    boxes = [a[r:r + 2, c:c + 2].ravel() for r in (0, 2) for c in (0, 2)]
    return all(sorted(u) == [1, 2, 3, 4] for u in list(a) + list(a.T) + boxes)


def count_solutions(puzzle):
    """An independent backtracking solver: the number of completions of `puzzle` (0 = blank)."""
    a = list(puzzle)

    def ok(c, v):
        r, k = divmod(c, 4)
        box = [4 * (r // 2 * 2 + i) + k // 2 * 2 + j for i in range(2) for j in range(2)]
        peers = [4 * r + j for j in range(4)] + [4 * i + k for i in range(4)] + box
        return all(a[p] != v for p in peers if p != c)

    def rec(c):
        if c == 16:
            return 1
        if a[c]:
            return rec(c + 1) if ok(c, a[c]) else 0
        n = 0
        for v in range(1, 5):
            if ok(c, v):
                a[c] = v
                n += rec(c + 1)
                a[c] = 0
        return n

    return rec(0)


def test_all_grids():
    g = sudoku.grids()
    assert g.shape == (288, 16)
    assert len({tuple(r) for r in g}) == 288
    assert all(valid_grid(r) for r in g)
    assert count_solutions([0] * 16) == 288  # and they are all of them


def test_make_splits_unique_minimal_disjoint():
    splits = sudoku.make_splits(0, 40, 20, 20, n_val=20)
    assert list(splits) == ["pretrain", "distill", "val", "test"]
    seen = set()
    for name, (puzzles, sols) in splits.items():
        assert puzzles.shape == sols.shape == (20 if name != "pretrain" else 40, 16)
        for p, s in zip(puzzles, sols):
            assert count_solutions(p) == 1
            assert valid_grid(s) and ((p == 0) | (p == s)).all()
            # minimal: removing any given leaves several solutions
            for c in np.nonzero(p)[0]:
                q = p.copy()
                q[c] = 0
                assert count_solutions(q) > 1
            key = p.tobytes()
            assert key not in seen  # distinct across and within splits
            seen.add(key)
    again = sudoku.make_splits(0, 40, 20, 20, n_val=20)
    assert all((again[k][0] == splits[k][0]).all() for k in splits)  # seeded
    other = sudoku.make_splits(1, 40, 20, 20, n_val=20)
    assert not (other["test"][0] == splits["test"][0]).all()


def test_encode_prompt_names_each_cell():
    p = np.array([[0, 1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], [1] * 16])
    tok = sudoku.encode_prompt(p)
    assert tok.shape == (2, 16)
    assert (tok > 4).all() and (tok < sudoku.MASK_ID).all()  # never a response digit, never M
    # a token determines (cell, value): all 80 (cell, value) pairs map to distinct tokens
    allv = sudoku.encode_prompt(np.repeat(np.arange(5)[:, None], 16, 1))
    assert len(set(allv.flatten().tolist())) == 80
    assert sudoku.VOCAB == sudoku.MASK_ID + 1


def two(r):
    """A score's totals (without the per-puzzle lists)."""
    return dict(cell_acc=r["cell_acc"], solved=r["solved"])


def test_score():
    sol = sudoku.grids()[0]
    puzzle = sol.copy()
    puzzle[[0, 5, 10, 15, 3]] = 0  # 5 blanks
    P, S = puzzle[None], sol[None]
    assert two(sudoku.score(S.copy(), P, S)) == dict(cell_acc=1.0, solved=1.0)
    filled = S.copy()
    filled[0, 5] = sol[5] % 4 + 1  # one wrong blank
    r = sudoku.score(filled, P, S)
    assert r["cell_acc"] == pytest.approx(4 / 5) and r["solved"] == 0.0
    # givens are not counted, even where the output disagrees with them
    filled = S.copy()
    filled[0, 1] = sol[1] % 4 + 1
    assert two(sudoku.score(filled, P, S)) == dict(cell_acc=1.0, solved=1.0)
    # pooled over blank cells of all puzzles; solved = fraction of puzzles
    sol2 = sudoku.grids()[100]
    p2 = np.where(np.arange(16) < 12, 0, sol2)  # 12 blanks
    f2 = sol2.copy()
    f2[[0, 1, 2]] = 0  # 3 wrong (a non-digit is wrong)
    r = sudoku.score(np.stack([sol, f2]), np.stack([puzzle, p2]), np.stack([sol, sol2]))
    assert r["cell_acc"] == pytest.approx(14 / 17) and r["solved"] == 0.5
    assert r["blanks"] == [5, 12] and r["right"] == [5, 9]  # per puzzle


def test_threshold_columns_tpf_is_cells_over_forwards():
    """A threshold column's TPF is the blank cells decoded over the model calls each puzzle
    needs, counted here by decoding each puzzle alone through a counting forward; its AUP reads
    the 1 token/step and threshold columns only."""
    torch.manual_seed(0)
    model = sudoku.LLaDA(sudoku.model_config(sudoku.Config(**TINY))).eval()
    with torch.no_grad():
        model.transformer.ff_out.weight.mul_(300)  # confident, unevenly: thresholds matter
    puzzles = sudoku.make_splits(0, 0, 0, 6, n_val=0)["test"][0]
    cols = sudoku.columns([1, 16], (0.9, 0.99))
    res = sudoku.evaluate(model, (puzzles, None), cols)
    calls, forward = [], model.forward
    model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    for name in ("τ=0.9", "τ=0.99"):
        calls.clear()
        for p in puzzles:
            sudoku.decode(model, p[None], cols[name])
        assert res[name]["tpf"] == pytest.approx(16 * len(puzzles) / len(calls))
    assert 1 < res["τ=0.9"]["tpf"] < 16  # some cells at once, not all
    curve = [(res[n]["tpf"], 100 * res[n]["cell_acc"]) for n in ("1", "τ=0.9", "τ=0.99")]
    assert sudoku.aup(res, 100.0) == pytest.approx(copsd.aup(curve, 100.0))


def test_parse_puzzle_valid():
    p = sudoku.parse_puzzle("0321 0030 0400 2100")
    assert p.tolist() == [0, 3, 2, 1, 0, 0, 3, 0, 0, 4, 0, 0, 2, 1, 0, 0]
    assert sudoku.parse_puzzle("....000000000001").sum() == 1


@pytest.mark.parametrize("text,words", [
    ("032100300400210", ["16 digits"]),  # 15 digits
    ("03210030040021000", ["16 digits"]),  # 17
    ("0321003004002x00", ["16 digits", "0-4"]),
    ("0321003004002500", ["16 digits", "0-4"]),
    ("1100000000000000", ["repeat"]),  # row
    ("1000100000000000", ["repeat"]),  # column
    ("1000010000000000", ["repeat"]),  # box
    ("0120040030000000", ["no solution"]),  # cell 0 has no candidate, no unit repeats
])
def test_parse_puzzle_errors(text, words):
    with pytest.raises(SystemExit) as e:
        sudoku.parse_puzzle(text)
    msg = str(e.value.code)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def parse(argv):
    return copsd.parse_config(sudoku.Config, argv)


def test_config_flags_and_hidden_fields():
    """What a reader varies is a flag; the base, its data and recipe keep their defaults (the lab
    notebook, experiments/, makes them flags)."""
    assert parse([]) == sudoku.Config()
    cfg = parse(["--K", "7", "--s", "0.3", "--keep_z", "--methods", "base,copsd", "--no-group_norm",
                 "--tokens_per_step", "1,16", "--dopsd_steps", "3"])
    assert (cfg.K, cfg.s, cfg.keep_z, cfg.methods) == (7, 0.3, True, ("base", "copsd"))
    assert cfg.group_norm is False and cfg.tokens_per_step == (1, 16) and cfg.dopsd_steps == 3
    with pytest.raises(SystemExit):
        parse(["--n_pretrain", "10"])


def test_methods_are_the_registrys():
    """--methods offers exactly copsd.METHODS (OPDLM, toy-only, included), the base and the SFT
    compositions, each row labelled by the registry."""
    (methods,) = [f for f in dataclasses.fields(sudoku.Config) if f.name == "methods"]
    assert methods.metadata["choices"] == ("base", *copsd.METHODS, "sft+self", "sft+copsd")
    assert any(m.toy_only for m in copsd.METHODS.values()) and "opdlm" in sudoku.ROWS
    for m, method in copsd.METHODS.items():
        assert sudoku.label(m) == method.label
    assert sudoku.label("sft+copsd", "later") == "SFT + COPSD (later)"
    assert sudoku.label("copsd", "paper") == "COPSD" and sudoku.label("base") == "Base"


def run_cli(*args, timeout=240):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sudoku.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_help_explains_every_flag():
    r = run_cli("--help", timeout=120)
    assert r.returncode == 0
    help_text = " ".join(r.stdout.split())  # argparse wraps lines
    assert "python sudoku.py --solve" in help_text  # the commands a user runs first
    assert "python -m experiments.study --help" in help_text  # where the study went
    flags = [f for f in dataclasses.fields(sudoku.Config) if "help" in f.metadata]
    for f in flags:
        assert f.metadata["help"].strip(), f.name
        assert f"--{f.name}" in help_text, f.name
    assert len(flags) <= 25 and "--n_pretrain" not in help_text
    for m in sudoku.ROWS:
        assert m in help_text, m


@pytest.mark.parametrize("args,choice", [(["--methods", "base,copsed"], "copsed"),
                                         (["--tokens_per_step", "1,x"], "1,x"),
                                         (["--device", "gpu"], "gpu")])
def test_typo_is_a_one_line_argparse_error(args, choice):
    r = run_cli(*args, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert choice in err and err.startswith("sudoku.py: error: argument")


ROWS = ["Base", "Base-Self", "COPSD"]
# the hidden fields of a tiny configuration (the tests' default run)
TINY = dict(n_pretrain=200, n_distill=64, n_test=32, d_model=32, n_layers=1, n_heads=2,
            mlp_hidden_size=64, pretrain_max_steps=20, eval_every=10, prompts_per_step=4, K=2,
            premise_prompts=8, premise_K=4, steps=2)


def run_tiny(out, timeout=300, **kw):
    """sudoku.run on the tiny configuration, in a process of its own (as `python sudoku.py`)."""
    code = ("import torch, sudoku; torch.set_num_threads(1); "
            f"sudoku.run(sudoku.Config(**{TINY | kw!r}, out={str(out)!r}))")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The default run, tiny, two seeds: one process each."""
    out = str(tmp_path_factory.mktemp("sudoku"))
    r = run_tiny(out, seeds=2)
    assert r.returncode == 0, r.stderr[-2000:]
    return out, r


def test_smoke_run_prints_table_and_writes_json(smoke):
    out, r = smoke
    lines = r.stdout.splitlines()
    assert any("self-consistency gap" in line for line in lines)  # the premise, measured
    header = [i for i, l in enumerate(lines) if l.startswith("Model / # Tokens")]
    assert len(header) == 2  # cell accuracy and puzzles solved
    assert lines[header[0]].split()[-6:] == ["1", "2", "4", "8", "16", "AUP"]
    table_rows = lines[header[0] + 1: header[0] + 1 + len(ROWS)]
    assert [l.split()[0] for l in table_rows] == ROWS
    for l in table_rows:
        assert l.count("±") == 6
    res = json.load(open(os.path.join(out, "results.json")))
    assert list(res["results"]) == ROWS
    assert res["config"]["K"] == 2 and res["config"]["steps"] == 2
    for row, per_seed in res["results"].items():
        assert len(per_seed) == 2
        for n in ("1", "2", "4", "8", "16"):
            s = per_seed[0]["test"][n]
            assert 0 <= s["cell_acc"] <= 1 and 0 <= s["solved"] <= 1
            assert s["tpf"] == pytest.approx(int(n))
        if row != "Base":  # one list per training stage, one entry per optimiser step
            (stage,) = per_seed[0]["history"]
            assert len(stage) == 2 and all(np.isfinite(h["loss"]) for h in stage)
            if row == "COPSD":
                assert all(h["d"] >= 0 for h in stage)
            # the trained weights in model.py's layout, loadable
            m = from_pretrained(per_seed[0]["ckpt"])
            assert m.cfg.d_model == 32 and m.cfg.mask_token_id == sudoku.MASK_ID
    # the table prints the JSON's numbers
    v = 100 * np.mean([s["test"]["16"]["cell_acc"] for s in res["results"]["COPSD"]])
    assert f"{v:6.2f}" in table_rows[2]
    assert len([e for e in os.listdir(out) if e.startswith("base-")]) == 2


def test_progress_tells(smoke):
    """Pretraining shows its step, loss and validation accuracy (tqdm: with an ETA); each seed's
    base line and rows are printed before the table, as each is ready."""
    _, r = smoke
    assert "val_acc=" in r.stderr and "loss=" in r.stderr and "seed 1: base" in r.stderr
    lines = r.stdout.splitlines()
    table = next(i for i, l in enumerate(lines) if "self-consistency gap at" in l)
    for seed in (0, 1):
        mine = [l for l in lines[:table] if l.startswith(f"seed {seed}: ")]
        assert [l.split(":")[1].strip() for l in mine] == ROWS
        assert "self-consistency gap" in mine[0] and "% at 16" in mine[2]


def test_seed_processes_give_the_serial_results(smoke, tmp_path):
    """A seed in a process of its own: the same numbers as here, one after the other; and a
    rerun reads its rows from --out."""
    out, _ = smoke
    a = json.load(open(os.path.join(out, "results.json")))["results"]
    b = sudoku.seed_rows(sudoku.Config(**TINY, seeds=2, out=str(tmp_path)), 1)
    for row in ROWS:
        assert a[row][1]["test"] == b[row]["test"]
        assert a[row][1]["history"] == b[row]["history"]
    t0 = time.time()
    r = run_tiny(out, seeds=2)
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.load(open(os.path.join(out, "results.json")))["results"]
    assert again == a and time.time() - t0 < 60


def test_a_dead_worker_is_a_one_line_error():
    with pytest.raises(SystemExit) as e:
        dict(sudoku.in_processes({"seed 0": (os._exit, 3), "seed 1": (abs, -1)}, 2))
    msg = str(e.value.code)
    assert "\n" not in msg and "died" in msg and "seed 0" in msg


def pool_workers(pid):
    """The pool workers process `pid` spawned (multiprocessing's spawn_main; not its tracker)."""
    found = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f, open(f"/proc/{d}/cmdline", "rb") as c:
                ppid, cmd = int(f.read().rsplit(")", 1)[1].split()[1]), c.read()
        except OSError:  # gone meanwhile
            continue
        if ppid == pid and b"spawn_main" in cmd:
            found.append(int(d))
    return found


def kill_a_worker(cmd, ready, log, timeout=240):
    """Start `cmd`; once ready() and its pool has workers, SIGKILL one (as the OOM killer
    would). Returns its exit status, its stderr, and the seconds from the kill to its exit."""
    with open(log, "w") as err:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        end = time.time() + timeout
        while not (ready() and pool_workers(p.pid)):
            assert p.poll() is None and time.time() < end, "ended before a worker was killed"
            time.sleep(0.02)
        os.kill(pool_workers(p.pid)[0], signal.SIGKILL)
        t0 = time.time()
        rc = p.wait(timeout=120)
        took = time.time() - t0
    with open(log) as f:
        return rc, f.read(), took


def copy_without(out, dest, rows=()):
    """A copy of a run's --out without its results.json and the given rows (JSON and weights)."""
    shutil.copytree(out, dest)
    os.remove(os.path.join(dest, "results.json"))
    for row in rows:
        path = os.path.join(dest, "rows", os.path.basename(row["ckpt"]))
        shutil.rmtree(path)
        os.remove(path + ".json")
    return str(dest)


def test_a_killed_worker_ends_the_run_and_a_rerun_resumes(smoke, tmp_path):
    """A real run whose worker is SIGKILLed mid-run stops in seconds with one line naming what
    was left; a rerun keeps the rows finished before the kill and gives the same numbers."""
    out, _ = smoke
    res = json.load(open(os.path.join(out, "results.json")))["results"]
    self_1, copsd_1 = res["Base-Self"][1], res["COPSD"][1]  # seed 1's: run again, then killed
    copy = copy_without(out, tmp_path / "out", [self_1, copsd_1])
    row = os.path.join(copy, "rows", os.path.basename(self_1["ckpt"]) + ".json")
    cmd = [sys.executable, "-c", "import torch, sudoku; torch.set_num_threads(1); "
           f"sudoku.run(sudoku.Config(**{TINY!r}, seeds=2, out={copy!r}))"]
    # once seed 1's Base-Self row is kept, its COPSD row is in flight
    rc, err, took = kill_a_worker(cmd, lambda: os.path.exists(row), tmp_path / "stderr")
    assert rc == 1 and took < 10 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == ("a worker process died (killed, or out of memory?) "
                                            "while running: seed 1"), err[-2000:]
    kept = os.path.getmtime(row)
    again = sudoku.seed_rows(sudoku.Config(**TINY, seeds=2, out=copy), 1)  # the rerun's seed 1
    assert os.path.getmtime(row) == kept  # resumed: only the COPSD row was made
    for name in ROWS:
        assert again[name]["test"] == res[name][1]["test"], name
        assert again[name]["history"] == res[name][1]["history"], name


@pytest.mark.parametrize("kept", [b'{"test": {"1": 0.2', b"\x00\xff\xfe", b"{}", b"[1, 2]",
                                  b'{"history": []}'])
def test_a_cache_entry_that_does_not_parse_is_made_again(kept, tmp_path, capsys):
    """A truncated, garbage or foreign entry is recomputed with one warning, then kept."""
    path, made = str(tmp_path / "row.json"), []
    with open(path, "wb") as f:
        f.write(kept)

    def make():
        made.append(1)
        return dict(test={"1": 0.5}, history=[])
    assert sudoku.cached(path, make, ("test", "history")) == make() and len(made) == 2
    (warning,) = capsys.readouterr().err.splitlines()
    assert warning.startswith(f"warning: {path} ") and warning.endswith("; recomputing it")
    assert sudoku.cached(path, make, ("test", "history")) == make() and len(made) == 3  # kept


def test_corrupt_rows_and_splits_are_made_again(smoke, tmp_path, capsys):
    """In a run's --out: a truncated row, a row of {}, a garbage base row and a truncated splits
    file are each recomputed with one warning, to the same numbers."""
    out, _ = smoke
    res = json.load(open(os.path.join(out, "results.json")))["results"]
    copy = str(tmp_path / "out")
    shutil.copytree(out, copy)
    rows = os.path.join(copy, "rows")
    (base_row,) = [n for n in os.listdir(rows) if n.startswith("base-") and
                   json.load(open(os.path.join(rows, n)))["test"] == res["Base"][0]["test"]]
    damage = {os.path.join(rows, base_row): b"\xff\xfe garbage",
              res["Base-Self"][0]["ckpt"].replace(out, copy) + ".json": b"{}"}
    for path in [res["COPSD"][0]["ckpt"].replace(out, copy) + ".json"] + [
            os.path.join(copy, n) for n in os.listdir(copy) if n.startswith("splits-")]:
        damage[path] = open(path, "rb").read()[:100]  # truncated
    for path, data in damage.items():
        with open(path, "wb") as f:
            f.write(data)
    again = sudoku.seed_rows(sudoku.Config(**TINY, seeds=2, out=copy), 0)
    for name in ROWS:
        assert again[name]["test"] == res[name][0]["test"], name
        assert again[name]["history"] == res[name][0]["history"], name
    warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning: ")]
    assert len(warnings) == 4 and sum(".npz" in w for w in warnings) == 1, warnings


def test_divergence_stops_before_anything_is_saved(smoke, tmp_path, capsys, monkeypatch):
    """A non-finite loss, gradient or weight stops training with one line naming the step, and
    nothing of it is saved: pretraining and post-training at an infinite learning rate (the
    weights), and from weights with a NaN (the loss)."""
    cfg = sudoku.Config(**TINY, seeds=1, out=str(tmp_path))
    base = a_base(smoke, tmp_path)
    with pytest.raises(FloatingPointError, match="^step 1 of seed 0's base: non-finite weights"):
        sudoku.pretrain(dataclasses.replace(cfg, pretrain_lr=float("inf")), 0)
    assert [n for n in os.listdir(tmp_path) if n.startswith("base-")] == [os.path.basename(base)]
    model = from_pretrained(base)
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = float("nan")
    with pytest.raises(FloatingPointError, match="^step 1 of seed 0's Base-Self: non-finite loss"):
        sudoku.post_train(model, cfg, sudoku.regime_data(cfg, 0), "self", 0)
    run = sudoku.run  # the command line, with the tiny fields it has no flags for, and lr = inf
    monkeypatch.setattr(sudoku, "run",
                        lambda c: run(dataclasses.replace(c, **TINY, lr=float("inf"))))
    with pytest.raises(SystemExit) as e:
        sudoku.main(["--seeds", "1", "--methods", "base,copsd", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err == ("error: step 1 of seed 0's COPSD: non-finite weights; "
                                         "stopped before saving (is the learning rate too high?)")
    assert [n for n in os.listdir(tmp_path / "rows") if not n.startswith("base-")] == []


def test_several_solution_puzzles_and_their_score():
    splits = sudoku.make_splits(0, 20, 10, 10, n_val=10, most=4)
    seen = set()
    for puzzles, sols in splits.values():
        for p, s in zip(puzzles, sols):
            assert 2 <= count_solutions(p) <= 4
            assert valid_grid(s) and ((p == 0) | (p == s)).all()  # one of its solutions
            assert p.tobytes() not in seen
            seen.add(p.tobytes())
    p = splits["test"][0][0]
    a, b = sudoku.solutions(p)[:2]
    blank = (p == 0).sum()
    # any of its solutions solves it; a mix of two is scored against the nearer one
    assert two(sudoku.score(a[None], p[None])) == dict(cell_acc=1.0, solved=1.0)
    assert two(sudoku.score(b[None], p[None])) == dict(cell_acc=1.0, solved=1.0)
    mix = np.where(np.arange(16) < 8, a, b)
    r = sudoku.score(mix[None], p[None])
    near = max(((mix == s) & (p == 0)).sum() for s in (a, b))
    if not ((mix == a).all() or (mix == b).all()):
        assert r["solved"] == 0.0 and r["cell_acc"] == pytest.approx(near / blank)


class Constant(torch.nn.Module):
    """Predictions that ignore the input: a perfectly self-consistent MDM."""
    device = torch.device("cpu")  # as model.LLaDA.device

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, idx, attention_mask=None, start=0, end=None):
        return self.logits.expand(len(idx), -1, -1)[:, start:end]


class Contextual(Constant):
    """Predictions that sharpen as more of the response is revealed: early and later views
    disagree beyond what the later views' own spread explains."""

    def forward(self, idx, attention_mask=None, start=0, end=None):
        shown = (idx[:, sudoku.PROMPT_LEN:] != sudoku.MASK_ID).float().mean(1)[:, None, None]
        return (self.logits * (1 + 8 * shown))[:, start:end]


def test_self_consistency_measures_the_premise():
    g = torch.Generator().manual_seed(0)
    logits = torch.full((1, 32, sudoku.VOCAB), -30.0)
    logits[..., 1:5] = torch.randn(1, 32, 4, generator=g)  # digits only
    puzzles = sudoku.make_splits(0, 0, 0, 32, n_val=0)["test"][0]
    still = sudoku.self_consistency(Constant(logits), puzzles, K=8)
    moving = sudoku.self_consistency(Contextual(logits), puzzles, K=8)
    assert abs(still) < 1e-6 and moving > 1e-3


def test_complete_fills_every_masked_cell_and_keeps_the_rest():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 32, sudoku.VOCAB, generator=g)
    x = torch.randint(1, 5, (6, 32), generator=g)
    x[:, :16] = sudoku.encode_prompt(np.zeros((6, 16), dtype=int))
    x[:, 16:][torch.rand(6, 16, generator=g) < 0.7] = sudoku.MASK_ID
    y = sudoku.complete(Constant(logits), x, g)
    shown = x != sudoku.MASK_ID
    assert torch.equal(y[shown], x[shown]) and not (y == sudoku.MASK_ID).any()


def check_grid(stdout, puzzle):
    lines = stdout.strip().splitlines()
    grid = np.array([[int(v) for v in l.split()] for l in lines[:4]])
    assert grid.shape == (4, 4)
    p = np.array([int(c) for c in puzzle])
    assert (grid.ravel()[p > 0] == p[p > 0]).all()  # givens kept
    ok = count_solutions(grid.ravel()) == 1 if ((grid >= 1) & (grid <= 4)).all() else False
    assert lines[4] == ("valid solution" if ok else "not a valid solution")


def test_solve_with_cached_and_explicit_checkpoint(smoke):
    out, _ = smoke
    puzzle = "0321003004002100"
    r = run_cli("--solve", puzzle, "--out", out, timeout=120)
    assert r.returncode == 0, r.stderr
    check_grid(r.stdout, puzzle)
    res = json.load(open(os.path.join(out, "results.json")))["results"]
    r = run_cli("--solve", puzzle, "--ckpt", res["COPSD"][0]["ckpt"], timeout=120)
    assert r.returncode == 0, r.stderr
    check_grid(r.stdout, puzzle)


@pytest.mark.parametrize("args,word", [(["--solve", "03210030"], "16 digits"),
                                       (["--solve", "1100000000000000"], "repeat")])
def test_solve_bad_input_is_one_line(args, word, tmp_path):
    r = run_cli(*args, "--out", str(tmp_path), timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and word in err[0], r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for a machine without a GPU")
def test_device_cuda_without_gpu_is_one_line(tmp_path):
    r = run_cli("--device", "cuda", "--out", str(tmp_path), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: --device cuda: torch sees no CUDA GPU here"]


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="for a machine without a GPU")


@pytest.mark.parametrize("args,message", [
    (["--seeds", "0"], "--seeds 0: need at least 1"),
    (["--K", "0"], "--K 0: need at least 1 response per prompt"),
    (["--tokens_per_step", "0"], "the evaluation's sampler: 0 tokens per step does not divide "
                                 "the block length 16"),
    (["--tokens_per_step", "1,3"], "the evaluation's sampler: 3 tokens per step does not divide "
                                   "the block length 16"),
    (["--prompts_per_step", "0"], "--prompts_per_step 0: need >= 1"),
    (["--steps", "-1"], "--steps -1: need >= 0 (0: each method's own)"),
    (["--s", "0.9"], "need 0 <= s < t <= 1, got --t 0.9 --s 0.9 (at s >= t the later view masks "
                     "nothing, and COPSD's loss is 0)"),
    (["--methods", "base,self", "--t", "0.5", "--s", "0.6"],
     "the premise's two views need 0 <= s < t <= 1, got --t 0.5 --s 0.6"),
    (["--lr", "-1"], "--lr -1.0: need a finite value >= 0 (0: each method's own)"),
    (["--train_tokens_per_step", "0"], "--train_tokens_per_step 0: need >= 1"),
    (["--train_tokens_per_step", "3"], "--train_tokens_per_step: 3 tokens per step does not "
                                       "divide the block length 16"),
    (["--solve", "0321003004002100", "--ckpt", "nowhere"], "--ckpt nowhere: no such directory"),
    pytest.param(["--device", "cuda"], "--device cuda: torch sees no CUDA GPU here",
                 marks=NO_GPU)])
def test_bad_values_exit_2_with_one_line_before_any_work(args, message, tmp_path, capsys):
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        sudoku.main([*args, "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"
    assert not os.path.exists(tmp_path / "out") and time.time() - t0 < 5


def test_each_method_trains_for_its_own_budget_unless_one_is_given(tmp_path, monkeypatch):
    """--lr / --steps 0 (the default): each method at its own choice (OWN_CHOICE; COPSD's by its
    reading of Eq. 6), each stage of SFT + X its own; set, they replace the method's."""
    own = {"sft": (1e-4, 3), "copsd": (2e-5, 5), "copsd (later)": (3e-5, 4)}
    monkeypatch.setattr(sudoku, "OWN_CHOICE", sudoku.OWN_CHOICE | own)
    cfg = sudoku.Config(**TINY | dict(steps=0), out=str(tmp_path))
    assert sudoku.budget(cfg, "copsd") == (2e-5, 5)
    assert sudoku.budget(dataclasses.replace(cfg, objective="later"), "copsd") == (3e-5, 4)
    assert sudoku.budget(dataclasses.replace(cfg, lr=1e-3), "sft") == (1e-3, 3)
    assert sudoku.budget(dataclasses.replace(cfg, steps=7), "sft") == (1e-4, 7)
    assert sudoku.budget(cfg, "opdlm") == (cfg.opdlm_lr, cfg.opdlm_steps)
    sudoku.pretrain(cfg, 0)
    lrs, steps, adamw = [], [], torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda p, lr, **kw: lrs.append(lr) or adamw(
        p, lr=lr, **kw))
    _, history = sudoku.train(cfg, 0, ["sft", "copsd"], lambda step, _: steps.append(step))
    assert [len(h) for h in history] == [3, 5] and lrs == [1e-4, 2e-5]
    assert steps == list(range(1, 9))


def test_solve_an_empty_puzzle_says_so(tmp_path, capsys):
    """--solve "" is a puzzle asked for, not the default training run."""
    with pytest.raises(SystemExit) as e:
        sudoku.main(["--solve", "", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --solve: ") and err.count("\n") == 1
    assert err.strip().endswith("got an empty puzzle")
    assert not os.path.exists(tmp_path / "out")


def a_base(smoke, dest, seed=0):
    """A copy of the smoke run's base of `seed` (and its splits) in dest; its path there."""
    out, _ = smoke
    base = sudoku.pretrain(sudoku.Config(**TINY, out=out), seed)  # kept: found, not trained
    shutil.copytree(base, os.path.join(dest, os.path.basename(base)))
    for name in os.listdir(out):
        if name.startswith("splits-"):
            shutil.copy(os.path.join(out, name), dest)
    return os.path.join(dest, os.path.basename(base))


def test_a_half_written_base_is_never_taken_for_one(smoke, tmp_path, capsys):
    """save_pretrained's temporary directory, left by a kill (base-KEY.tmpPID): --solve takes
    the real base beside it, and pretraining does not count it as done."""
    base = a_base(smoke, tmp_path)
    half = base + ".tmp4242"
    os.makedirs(half)
    with open(os.path.join(half, "config.json"), "w") as f:
        f.write('{"d_model": 3')  # newer than the base, and half written
    puzzle = "0321003004002100"
    sudoku.main(["--solve", puzzle, "--out", str(tmp_path)])
    check_grid(capsys.readouterr().out, puzzle)
    os.rename(base, base + ".tmp4343")  # the only base left is half-written
    cfg = sudoku.Config(**TINY, out=str(tmp_path))
    assert sudoku.pretrain(cfg, 0) == base and from_pretrained(base).cfg.d_model == 32
    assert (from_pretrained(base).cfg.extra["pretrain_steps"]
            == from_pretrained(base + ".tmp4343").cfg.extra["pretrain_steps"])


@pytest.mark.parametrize("damage,file", [("truncate", "model.safetensors"),
                                         ("garbage", "config.json")])
@pytest.mark.parametrize("how", ["newest base", "--ckpt"])
def test_a_corrupt_checkpoint_is_one_line_naming_the_file(smoke, tmp_path, capsys, damage, file,
                                                          how):
    path = os.path.join(a_base(smoke, tmp_path), file)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2] if damage == "truncate" else b"\x00\xffnot json")
    ckpt = ["--ckpt", os.path.dirname(path)] if how == "--ckpt" else []
    with pytest.raises(SystemExit) as e:
        sudoku.main(["--solve", "0321003004002100", "--out", str(tmp_path), *ckpt])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {path}: ") and err.count("\n") == 1


def test_solve_without_model_is_one_line(tmp_path):
    r = run_cli("--solve", "0321003004002100", "--out", str(tmp_path / "none"), timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("regime", ["minimal", "early", "low", "multi"])
def test_each_regime_pretrains_on_its_puzzles_and_mask_ratios(regime, tmp_path, monkeypatch):
    """The regimes' bases as specified: minimal and multi from t ~ U(0, 1), one row in each of
    the batch's 64 equal intervals (stratified, the default); the ceiling at t = 1; early:
    early_share of the rows from U(0, early_t); low (the premise regime): every row from
    U(0, low_t), on minimal's very puzzles; multi: puzzles of 2-4 solutions."""
    drawn = []
    loss = copsd.mdm_loss

    def spy(*args, t=None, **kw):
        drawn.append(t)
        return loss(*args, t=t, **kw)
    monkeypatch.setattr(copsd, "mdm_loss", spy)
    cfg = sudoku.Config(**TINY | dict(pretrain_max_steps=30, eval_every=1000, pretrain_batch=64),
                        regime=regime, out=str(tmp_path))
    sudoku.pretrain(cfg, 0)
    assert len(drawn) == 30  # no validation check before the end: every step trained
    if regime in ("minimal", "multi"):
        bins = [((t - 1e-3) / (1 - 1e-3) * 64).floor().long().sort().values for t in drawn]
        assert all(torch.equal(b, torch.arange(64)) for b in bins)
    else:
        t = torch.cat(drawn)
        top = cfg.early_t if regime == "early" else cfg.low_t
        share = (t <= top).float().mean().item()
        if regime == "low":
            assert t.max() <= cfg.low_t and t.min() > 0 and share == 1
        else:
            assert t.max() > cfg.early_t and 0.89 <= share <= 0.95  # 0.8 + 0.2 x 0.6 = 0.92
    data = sudoku.regime_data(cfg, 0)
    same = sudoku.regime_data(dataclasses.replace(cfg, regime="minimal"), 0)
    counts = [len(sudoku.solutions(p)) for p in data["test"][0]]
    if regime == "multi":
        assert min(counts) >= 2 and max(counts) <= cfg.most_solutions
    else:
        assert all(np.array_equal(data[k][0], same[k][0]) for k in sudoku.SPLITS)
        assert set(counts) == {1}
    drawn.clear()  # the ceiling: every row at mask ratio 1
    sudoku.pretrain(dataclasses.replace(cfg, pretrain_t=1.0), 0)
    assert all((t == 1).all() for t in drawn)


def test_pretraining_schedule_warms_up_then_decays_by_a_cosine():
    """lr_factor: linear warm-up to the peak over pretrain_warmup steps, a cosine to
    pretrain_decay at pretrain_max_steps, flat after; the defaults (0, 1): constant."""
    cfg = sudoku.Config(pretrain_warmup=10, pretrain_decay=0.1, pretrain_max_steps=110)
    f = [sudoku.lr_factor(cfg, s) for s in range(130)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == 1.0
    assert f[60] == pytest.approx(0.55) and f[110] == pytest.approx(0.1) and f[129] == f[110]
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # decreasing after the warm-up
    assert {sudoku.lr_factor(sudoku.Config(), s) for s in range(0, 5000, 7)} == {1.0}


@pytest.mark.parametrize("regime", ["minimal", "early", "low"])
def test_stratified_mask_ratios_cover_the_batch_evenly_with_each_rows_distribution(regime):
    """pretrain_stratified: the batch's uniforms lie one in each of n equal intervals (minimal:
    t itself), each row's t keeps the regime's range and share (the default); off: the plain
    draws, bit for bit (minimal: none, the MDM loss draws its own)."""
    n, eps = 256, 1e-3
    cfg = sudoku.Config(regime=regime)
    assert cfg.pretrain_stratified
    t = sudoku.mask_ratios(cfg, n, torch.Generator().manual_seed(0))
    assert t.shape == (n,) and t.min() >= eps and t.max() <= 1
    if regime == "minimal":
        u = (t - eps) / (1 - eps)
        assert torch.equal(torch.sort((u * n).floor().long()).values, torch.arange(n))
    elif regime == "low":
        assert t.max() <= cfg.low_t
        u = (t - eps) / (cfg.low_t - eps)
        assert torch.equal(torch.sort((u * n).floor().long()).values, torch.arange(n))
    else:
        assert 0.85 <= (t <= cfg.early_t).float().mean() <= 0.99 and t.max() > cfg.early_t
    plain = sudoku.Config(regime=regime, pretrain_stratified=False)
    again = sudoku.mask_ratios(plain, n, torch.Generator().manual_seed(0))
    if regime == "minimal":
        assert again is None
    else:
        g = torch.Generator().manual_seed(0)
        u, below = torch.rand(n, generator=g), torch.rand(n, generator=g)
        top, share = ((plain.early_t, plain.early_share) if regime == "early"
                      else (plain.low_t, 1.0))
        want = eps + u * torch.where(below < share, top - eps, 1 - eps)
        assert torch.equal(again, want) and not torch.equal(again, t)
