"""train_llada.py on CPU: a tiny LLaDA-format checkpoint and tokenizer.json built here, FSDP2
over gloo.

The runs share one set of flags, so that the one-process run is the reference for the two-process
run (same global batch: allclose) and for the killed-and-resumed run (bit-exact)."""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields, replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import copsd  # noqa: E402
import model as M  # noqa: E402
import sudoku  # noqa: E402
import train_llada as T  # noqa: E402
from conftest import stderr_lines  # noqa: E402
from experiments import bench_llada  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|startoftext|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|mdm_mask|>"]
EOS, MASK = 0, 5  # their ids: special tokens come first in the trained vocabulary
pytestmark = [pytest.mark.filterwarnings("ignore:.*returned a view tensor"),
              pytest.mark.filterwarnings("ignore:.*DTensor random operators")]

# the registry's methods that train_llada.py runs (OPDLM needs a causal teacher of LLaDA's shape)
METHODS = [m for m, x in copsd.METHODS.items() if not x.toy_only]
FLAGS = ["--device", "cpu", "--task", "sudoku", "--n_train", "16", "--n_eval", "4", "--gen_length",
         "16", "--block_length", "8", "--train_tokens_per_step", "2", "--eval_tokens_per_step",
         "2,8", "--eval_batch", "2", "--K", "2", "--prompts_per_step", "4", "--micro_batch", "1",
         "--steps", "4", "--save_every", "2", "--resample_every", "3", "--lr", "1e-3",
         "--max_shard_gb", "0.00005"]


def make_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [T.SUDOKU_PROMPT.format(puzzle="1000002000300004"),
             "<answer>\n1234341221434321\n</answer>", "user assistant"]
    tok.train_from_iterator(texts * 5, trainer)
    assert [tok.token_to_id(s) for s in SPECIALS] == list(range(6))
    tok.save(path)
    return tok.get_vocab_size()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A sharded LLaDA-layout checkpoint of a tiny model (grouped-query attention, padded
    embedding)."""
    base = tmp_path_factory.mktemp("tiny")
    vocab = make_tokenizer(str(base / "tokenizer.json"))
    cfg = M.ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=64,
                        vocab_size=vocab, embedding_size=vocab + 16, rope_theta=10000.0,
                        max_sequence_length=1024, mask_token_id=MASK, eos_token_id=EOS,
                        pad_token_id=EOS)
    torch.manual_seed(0)
    d = str(base / "llada")
    M.save_pretrained(d, cfg, M.LLaDA(cfg).state_dict(), max_shard_bytes=40_000)
    shutil.copy(base / "tokenizer.json", d)  # after: save_pretrained replaces the directory
    return d


def weights(hf_dir):
    out = {}
    for f in sorted(os.listdir(hf_dir)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(hf_dir, f)))
    return out


# a kill in the middle of a step: the script, with the optimiser's step number `crash` replaced
# by an immediate exit (after that step's backward passes, before its update)
KILLED = """
import os, sys, torch, train_llada
step, calls = torch.optim.AdamW.step, [0]
def killed(self, *a, **k):
    calls[0] += 1
    if calls[0] == {crash}:
        os._exit(3)
    return step(self, *a, **k)
torch.optim.AdamW.step = killed
sys.exit(train_llada.main(sys.argv[1:]))
"""


def run(args, nproc=1, check=True, crash=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
                              if nproc > 1 else [])
    script = ([os.path.join(ROOT, "train_llada.py")] if crash is None
              else ["-c", KILLED.format(crash=crash)])
    p = subprocess.run(cmd + script + args, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def latest(out):
    with open(os.path.join(out, "latest")) as f:
        return os.path.join(out, f.read().strip())


@pytest.fixture(scope="session")
def one_process(tiny_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("one") / "run")
    p = run(FLAGS + ["--model_dir", tiny_dir, "--out", out])
    return out, p


def test_sharded_round_trip(tiny_dir, tmp_path):
    files = os.listdir(tiny_dir)
    assert M.INDEX in files and sum(f.endswith(".safetensors") for f in files) >= 3
    m = M.from_pretrained(tiny_dir)
    again = str(tmp_path / "again")
    M.save_pretrained(again, m.cfg, m.state_dict(), max_shard_bytes=40_000)
    a, b = weights(tiny_dir), weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # through the script: FSDP2 load of each rank's rows, full-state gather, export;
    # lr 0 changes nothing
    out = str(tmp_path / "lr0")
    run(FLAGS + ["--model_dir", tiny_dir, "--out", out, "--steps", "1", "--lr", "0", "--skip_eval"])
    c = weights(os.path.join(latest(out), "hf"))
    assert c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a)
    assert M.read_config(os.path.join(latest(out), "hf")) == M.read_config(tiny_dir)


def test_copsd_one_process(one_process, tiny_dir):
    out, p = one_process
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["d"] > 0 for r in log)
    assert (sorted(e for e in os.listdir(out) if e.startswith("step-"))
            == ["step-000002", "step-000004"])
    hf = os.path.join(latest(out), "hf")
    assert {"config.json", M.INDEX, "tokenizer.json"} <= set(os.listdir(hf))
    before, after = weights(tiny_dir), weights(hf)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    res = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]
    assert set(res[-1]["results"]) == {"2", "8"} and 0 <= res[-1]["results"]["2"]["cell_acc"] <= 1
    # --eval_only on the run directory loads its latest export
    q = run(FLAGS + ["--model_dir", out, "--out", out, "--eval_only"])
    assert "cell_acc" in q.stdout and len(open(os.path.join(out, "results.jsonl")).readlines()) == 2


def test_two_processes_match_one(one_process, tiny_dir, tmp_path):
    out1, _ = one_process
    out2 = str(tmp_path / "two")
    # recompute: same numbers
    run(FLAGS + ["--model_dir", tiny_dir, "--out", out2, "--skip_eval", "--act_ckpt"], nproc=2)
    a, b = weights(os.path.join(latest(out1), "hf")), weights(os.path.join(latest(out2), "hf"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    la = [json.loads(line)["loss"] for line in open(os.path.join(out1, "log.jsonl"))]
    lb = [json.loads(line)["loss"] for line in open(os.path.join(out2, "log.jsonl"))]
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-6)


def test_resume_after_kill_is_bit_exact(one_process, tiny_dir, tmp_path):
    out1, _ = one_process
    out = str(tmp_path / "killed")
    # killed in step 4's update;
    # its last checkpoint (after step 2) is mid-rollout-window (steps 1-3)
    p = run(FLAGS + ["--model_dir", tiny_dir, "--out", out, "--skip_eval"], check=False, crash=4)
    assert p.returncode == 3, p.stderr[-2000:]
    assert os.path.basename(latest(out)) == "step-000002"
    assert os.path.isfile(os.path.join(latest(out), "rollout-rank0.safetensors"))
    run(FLAGS + ["--model_dir", tiny_dir, "--out", out, "--resume", "--skip_eval"])
    a, b = weights(os.path.join(latest(out1), "hf")), weights(os.path.join(latest(out), "hf"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the log as the weights: the killed run's step 3 was logged, then done again after step 2
    assert log_steps(out) == [1, 2, 3, 4]


def log_steps(out):
    return [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl"))]


def test_resume_extends_a_finished_run(one_process, tiny_dir, tmp_path):
    """--resume --steps N+k continues a finished run. Its last window (--resample_every 3) was cut
    at --steps: 3 steps end on a window's boundary, so 3 -> 4 is the 4-step run exactly; 4 -> 5
    draws step 5's rollouts with the resumed weights (the 5-step run drew them at step 4)."""
    out1, _ = one_process
    out = str(tmp_path / "three")
    args = FLAGS + ["--model_dir", tiny_dir, "--out", out, "--skip_eval"]
    assert T.main(args + ["--steps", "3"]) == 0
    assert T.main(args + ["--resume"]) == 0
    a, b = weights(os.path.join(latest(out1), "hf")), weights(os.path.join(latest(out), "hf"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert log_steps(out) == [1, 2, 3, 4]
    assert T.main(args + ["--resume", "--steps", "5"]) == 0  # was KeyError: (4, 0)
    assert log_steps(out) == [1, 2, 3, 4, 5] and latest(out).endswith("step-000005")
    assert T.main(args + ["--resume", "--steps", "4"]) == 2  # a checkpoint past --steps


@pytest.mark.parametrize("case", ["loss", "weights", "lr"])
def test_non_finite_training_stops_before_saving(tiny_dir, tmp_path, capsys, monkeypatch, case):
    """A NaN loss (injected at step 3), a NaN weight (injected in step 2's update) or a gradient
    made infinite by --lr 1e6 stop the run with one line naming the step, before anything
    non-finite is saved."""
    calls, step = [], torch.optim.AdamW.step

    def nan_loss(model, ro, mask_id, generator=None, **kw):
        loss, stats = copsd.mdm_loss(model, ro, mask_id, generator=generator, **kw)
        calls.append(1)
        return loss * (float("nan") if len(calls) == 3 else 1.0), stats

    def nan_weight(self, *a, **k):
        out = step(self, *a, **k)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].to_local().view(-1)[0] = float("nan")
        return out
    if case == "loss":
        monkeypatch.setitem(copsd.METHODS, "self", replace(copsd.METHODS["self"], loss=nan_loss))
    if case == "weights":
        monkeypatch.setattr(torch.optim.AdamW, "step", nan_weight)
    extra, message = {"loss": (["--method", "self", "--micro_batch", "4"],
                               "error: step 3: non-finite loss and gradient_norm; stopped"),
                      "weights": ([], "error: step 2: non-finite weights; stopped"),
                      "lr": (["--lr", "1e6"], "error: step 2: non-finite gradient_norm")}[case]
    out = str(tmp_path / "out")
    code = T.main(FLAGS + ["--model_dir", tiny_dir, "--out", out, "--skip_eval"] + extra)
    err = stderr_lines(capsys.readouterr().err)
    assert code == 2 and err[-1].startswith(message), err[-1]
    saved = [e for e in os.listdir(out) if e.startswith("step-")]
    assert saved == (["step-000002"] if case == "loss" else [])
    for d in saved:
        assert all(torch.isfinite(t).all() for t in weights(os.path.join(out, d, "hf")).values())


WTE = "model.transformer.wte.weight"


def nan_copy(tiny_dir, tmp_path):
    """tiny_dir with one NaN in the embedding's last row: only rank 1's of 2 reads it."""
    d = str(tmp_path / "nan")
    shutil.copytree(tiny_dir, d)
    shard = os.path.join(d, json.load(open(os.path.join(d, M.INDEX)))["weight_map"][WTE])
    t = load_file(shard)
    t[WTE][-1, 0] = float("nan")
    save_file(t, shard)
    return d


def test_non_finite_checkpoint_is_refused(tiny_dir, tmp_path, capsys):
    """A checkpoint holding a NaN neither trains nor scores (it used to save and report 0%); with
    2 processes the NaN sits in rank 1's rows only, and both ranks stop (none waits forever)."""
    d = nan_copy(tiny_dir, tmp_path)
    for extra in [["--eval_only"], ["--skip_eval"]]:
        out = str(tmp_path / "out")
        assert T.main(FLAGS + ["--model_dir", d, "--out", out] + extra) == 2
        err = stderr_lines(capsys.readouterr().err)
        assert len(err) == 1 and WTE in err[0] and "NaN" in err[0], err
        assert not os.path.exists(out) or not os.listdir(out)
    p = run(FLAGS + ["--model_dir", d, "--out", out, "--skip_eval"], nproc=2, check=False)
    assert p.returncode != 0 and p.stderr.count(f"{WTE} holds NaN or inf") == 2, p.stderr[-2000:]


@pytest.mark.parametrize("method", [m for m in METHODS if m != "copsd"])
def test_other_methods(tiny_dir, tmp_path, method):
    """Base-Self, SFT and the related methods (every registry method this script runs) go
    through the same loop (one process, in-process)."""
    out = str(tmp_path / method)
    args = FLAGS + ["--model_dir", tiny_dir, "--out", out, "--method", method, "--steps", "2",
                    "--skip_eval", "--n_train", "8"]
    assert T.main(args) == 0
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    before, after = weights(tiny_dir), weights(os.path.join(latest(out), "hf"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_update_flops_counts_the_views_each_loss_runs():
    """An update's FLOPs scale with the rows each loss runs the model on with gradient, counted
    here around the model: dParallel's and d3LLM's losses run a masked view and its complement
    of every row, twice the single view of the MDM loss (SFT, Base-Self)."""
    c = M.ModelConfig(d_model=32, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=64,
                      vocab_size=64, embedding_size=64, mask_token_id=MASK, eos_token_id=EOS,
                      pad_token_id=EOS)
    model, cfg = M.LLaDA(c), T.TrainConfig(K=2, block_length=8)
    sp = copsd.Sampler(gen_length=16, block_length=8, steps=8)
    prompt = torch.randint(6, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    ro = copsd.make_rollout("d3llm", model, prompt, None, MASK, sp, cfg)  # with trajectories
    rows, forward = [], model.forward

    def counted(x, *a, **k):
        rows.append(len(x) * torch.is_grad_enabled())
        return forward(x, *a, **k)
    model.forward = counted
    grad_rows, flops = {}, {}
    for m in ["sft", "self", "dparallel", "d3llm"]:
        rows.clear()
        copsd.METHODS[m].loss(model, ro, MASK, **copsd.loss_options(m, cfg, sp))
        grad_rows[m], flops[m] = sum(rows), T.update_flops(c, replace(cfg, method=m), ro)
    assert grad_rows["sft"] == grad_rows["self"] == len(ro)
    assert grad_rows["dparallel"] == grad_rows["d3llm"] == 2 * len(ro)
    for m in flops:
        assert flops[m] == flops["sft"] * grad_rows[m] // len(ro), m


def confident_copy(tiny_dir, tmp_path):
    """tiny_dir's model with large random weights: confident, prompt-dependent predictions, so
    threshold decoding decodes a different number of tokens per step for each prompt."""
    m, g = M.from_pretrained(tiny_dir), torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 8 / p.shape[1] ** 0.5)
    d = str(tmp_path / "confident")
    M.save_pretrained(d, m.cfg, m.state_dict())
    shutil.copy(os.path.join(tiny_dir, "tokenizer.json"), d)
    return d


def test_threshold_grid_tokens_per_forward_and_aup(tiny_dir, tmp_path, monkeypatch):
    """--eval_threshold 0.5,0.9: one evaluation, one record with the fixed columns and a column
    per threshold. Each column's tpf is its generated tokens over the model calls they took,
    counted here around copsd.generate and the model, one prompt per call (the prompts need
    different numbers of calls); a batch of all the prompts, where rows wait for each other,
    gives the same. aup is copsd.aup of the recorded points, (tpf, accuracy in %) of each
    threshold column (the tiny model solves nothing: a stand-in score gives distinct
    accuracies)."""
    d, out = confident_copy(tiny_dir, tmp_path), str(tmp_path / "out")
    args = FLAGS + ["--model_dir", d, "--out", out, "--eval_only", "--eval_threshold", "0.5,0.9"]
    calls, counts = [0], {}
    forward, generate = M.LLaDA.forward, copsd.generate

    def counted_forward(self, *a, **k):
        calls[0] += 1
        return forward(self, *a, **k)

    def counted_generate(model, prompt, attn, mask_id, sp, **kw):
        before, out = calls[0], generate(model, prompt, attn, mask_id, sp, **kw)
        seq = out[0] if kw.get("record") else out
        assert len(seq) == 1  # one prompt per call: its calls are the model's
        n = counts.setdefault(sp, [])
        n.append((int((seq[:, prompt.shape[1]:] != mask_id).sum()), calls[0] - before))
        return out
    accuracy = iter([0.5, 0.45, 0.6, 0.3] * 2)
    monkeypatch.setattr(M.LLaDA, "forward", counted_forward)
    monkeypatch.setattr(copsd, "generate", counted_generate)
    monkeypatch.setattr(T, "score", lambda task, texts, rows: dict(cell_acc=next(accuracy)))
    assert T.main(args + ["--eval_batch", "1"]) == 0
    monkeypatch.setattr(copsd, "generate", generate)
    assert T.main(args + ["--eval_batch", "4"]) == 0
    one, batched = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]
    columns = T.eval_samplers(copsd.parse_config(T.TrainConfig, args), M.read_config(d))
    assert list(one["results"]) == list(columns) == ["2", "8", "τ=0.5", "τ=0.9"]
    for name, sp in columns.items():
        tokens, forwards = map(sum, zip(*counts[sp]))
        assert len(counts[sp]) == 4 and tokens == 4 * 16
        assert one["results"][name]["tpf"] == pytest.approx(tokens / forwards), name
        assert batched["results"][name]["tpf"] == pytest.approx(tokens / forwards), name
    per_prompt = {sp.threshold: {f for _, f in counts[sp]} for sp in columns.values()}
    assert len(per_prompt[0.5]) > 1 and len(per_prompt[0.9]) > 1  # what a mean of ratios misses
    for rec in one, batched:
        assert rec["aup_points"] == [[r["tpf"], 100 * r["cell_acc"]]  # no "1" column here
                                     for n, r in rec["results"].items() if n.startswith("τ=")]
        assert rec["aup"] == pytest.approx(copsd.aup(rec["aup_points"])) and rec["aup"] > 0


def bad_copy(tiny_dir, tmp_path):
    d = str(tmp_path / "bad")
    shutil.copytree(tiny_dir, d)
    with open(os.path.join(d, M.INDEX)) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[1]
    return d, os.path.join(d, shard)


def error_of(capsys, *args):
    code = T.main(["--device", "cpu", "--eval_only", "--n_eval", "2", *args])
    err = stderr_lines(capsys.readouterr().err)
    assert code != 0 and err and err[-1].startswith("error:"), err
    return err[-1]


def test_missing_shard(tiny_dir, tmp_path, capsys):
    d, shard = bad_copy(tiny_dir, tmp_path)
    os.remove(shard)
    msg = error_of(capsys, "--model_dir", d)
    assert os.path.basename(shard) in msg and "missing" in msg


def test_truncated_shard(tiny_dir, tmp_path, capsys):
    d, shard = bad_copy(tiny_dir, tmp_path)
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    assert os.path.basename(shard) in error_of(capsys, "--model_dir", d)


@pytest.mark.parametrize("change", ["shape", "dtype"])
def test_wrong_tensor(tiny_dir, tmp_path, capsys, change):
    d, shard = bad_copy(tiny_dir, tmp_path)
    tensors = load_file(shard)
    name = sorted(n for n in tensors if tensors[n].ndim == 2)[0]
    t = tensors[name]
    tensors[name] = t[:, :-1].contiguous() if change == "shape" else t.to(torch.int32)
    save_file(tensors, shard)
    msg = error_of(capsys, "--model_dir", d)
    assert name in msg and os.path.basename(shard) in msg and change in msg


def test_missing_files(tiny_dir, tmp_path, capsys):
    assert "config.json" in error_of(capsys, "--model_dir", str(tmp_path / "nowhere"))
    d, _ = bad_copy(tiny_dir, tmp_path)
    os.remove(os.path.join(d, "tokenizer.json"))
    assert "tokenizer.json" in error_of(capsys, "--model_dir", d)


def test_bad_flags(tiny_dir, capsys):
    assert "does not divide --block_length" in error_of(capsys, "--model_dir", tiny_dir,
                                                        "--eval_tokens_per_step", "3")
    assert "--prompts_per_step" in error_of(capsys, "--model_dir", tiny_dir, "--prompts_per_step",
                                            "3", "--micro_batch", "2")


def test_method_choices_are_the_methods_that_run(capsys):
    """--method offers exactly the registry's methods but the toy-only: opdlm (no causal teacher
    of LLaDA's shape) is refused by argparse, naming the choices, which are the registry's."""
    assert "opdlm" not in METHODS and set(METHODS) == set(copsd.METHODS) - {"opdlm"}
    with pytest.raises(SystemExit):
        T.main(["--method", "opdlm"])
    err = capsys.readouterr().err
    assert "invalid choice: 'opdlm'" in err
    assert re.findall(r"\w+", err.split("choose from")[1]) == METHODS


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        T.main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "torchrun --nproc_per_node=4 train_llada.py" in out
    flags = [f for f in fields(T.TrainConfig) if "help" in f.metadata]
    assert len(flags) <= 50  # the fields without a flag() are set in the file
    for f in flags:
        assert f.metadata["help"].strip() and f"--{f.name}" in out, f.name
    for m in METHODS:
        assert m in out
    with pytest.raises(SystemExit):
        T.main(["--remasking", "topk"])
    assert "invalid choice: 'topk'" in capsys.readouterr().err


def tables(text):
    """The markdown tables of `text`: a list of {first cell: [the other cells]}."""
    out = []
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0].startswith("---"):
            continue
        if cells[0] in ("phase", "cache"):  # a header: a new table
            out.append({})
        elif len(out) == 1:  # the phase table, keyed by the phase
            out[-1][cells[0]] = cells[1:]
        else:  # the sampler table, keyed by cache, CUDA graph, threshold, refresh and batch
            out[-1][" ".join(cells[:5])] = cells[5:]
    return out


BENCH = ["--random_init", "--device", "cpu", "--steps", "3", "--prompts_per_step", "2", "--K",
         "2", "--gen_length", "32", "--block_length", "16", "--bench_prompt_len", "16",
         "--micro_batch", "1"]


def test_bench_rates_are_consistent_with_their_times(tiny_dir, tmp_path, capsys):
    """experiments.bench_llada with default flags (--resample_every 0): every measured step
    samples, so every rate is finite and is the phase's tokens per step over its printed time;
    the sampler table likewise, for every cache and batch. MFU and the floor need the GPU's
    ceilings: given here, as a CPU has none."""
    args = BENCH + ["--config", tiny_dir, "--bench_batches", "1,3", "--out", str(tmp_path),
                    "--peak_flops", "989e12", "--peak_bandwidth", "4.8e12"]
    assert bench_llada.main(args) == 0
    text = capsys.readouterr().out
    assert "ceilings per GPU (CPU): 989 TFLOP/s, 4.8 TB/s" in text
    phases, samplers = tables(text)
    rows = {name: [float(v) for v in vals] for name, vals in phases.items()}
    tokens = {"sampling (generated tokens)": 2 * 2 * 32, "update (rows x (P+L) tokens)": 2 * 2 * 48,
              "step": 2 * 2 * 32}
    assert set(rows) == set(tokens)
    for name, (secs, rate, tflops, mfu) in rows.items():
        assert 0 < secs < 60 and 0 < rate < 1e9 and tflops >= 0
        assert rate * secs == pytest.approx(tokens[name], rel=0.02), name
        assert mfu == pytest.approx(100 * tflops * 1e12 / 989e12, rel=0.01), name
    assert rows["step"][0] == pytest.approx(rows["sampling (generated tokens)"][0]
                                            + rows["update (rows x (P+L) tokens)"][0], rel=0.02)
    # none, prefix, dual, dual + graph (+ refresh 2, + threshold); B = 1, 3
    assert len(samplers) == 6 * 2
    for key, (rate, tpf, secs, floor, ratio, mem) in samplers.items():
        B = int(key.split()[-1])
        assert float(rate) * float(secs) == pytest.approx(B * 32, rel=0.02), key
        assert float(tpf) == 2.0 if key.split()[2] == "—" else float(tpf) >= 1.0
        assert float(floor.split()[0]) > 0 and float(ratio) > 0
    # no ceilings known (a CPU, no flags): no MFU and no floor, rather than a wrong one
    assert bench_llada.main(BENCH + ["--config", tiny_dir, "--bench_batches", "1", "--out",
                                     str(tmp_path / "unknown")]) == 0
    phases, samplers = tables(capsys.readouterr().out)
    assert all(vals[3] == "—" for vals in phases.values())
    assert len(samplers) == 6 and all(vals[3:5] == ["—", "—"] for vals in samplers.values())


def test_bench_times_each_evaluation_column(tiny_dir, tmp_path, capsys):
    """--bench_eval: a row per column of one evaluation (fixed and threshold), each its batch's
    generated tokens over its printed time; a fixed column decodes its n tokens per forward."""
    assert bench_llada.main(BENCH + ["--config", tiny_dir, "--out", str(tmp_path),
                                     "--no-bench_sampler", "--bench_eval", "--eval_batch", "3",
                                     "--eval_tokens_per_step", "2,4", "--eval_threshold",
                                     "0.5,0.9"]) == 0
    text = capsys.readouterr().out.split("evaluation columns:")[1]
    rows = {line.split("|")[1].strip(): line.split("|")[2:5] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| column")}
    assert list(rows) == ["2", "4", "τ=0.5", "τ=0.9"]
    for name, (rate, tpf, secs) in rows.items():
        assert float(rate) * float(secs) == pytest.approx(3 * 32, rel=0.02), name
        assert float(tpf) == float(name) if "τ" not in name else float(tpf) >= 1.0


def test_bench_help_adds_its_flags_to_the_trainers(capsys):
    with pytest.raises(SystemExit) as e:
        bench_llada.main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "python -m experiments.bench_llada" in out
    for f in fields(bench_llada.BenchConfig):
        assert ("help" not in f.metadata) or f"--{f.name}" in out, f.name
    assert "--bench_batches" in out and "--peak_flops" in out and "--bench " not in out


def test_gpu_ceilings_by_name_and_by_flag():
    """Each GPU's own dense bf16 peak and bandwidth (an H200 is not an H100), found in
    torch.cuda.get_device_name()'s answer; none for a GPU not in the table; the flags win."""
    assert M.gpu_ceilings("NVIDIA H100 80GB HBM3") == (989e12, 3.35e12)
    assert M.gpu_ceilings("NVIDIA H200") == (989e12, 4.8e12)
    assert M.gpu_ceilings("NVIDIA A100-SXM4-80GB") == (312e12, 2.039e12)
    assert M.gpu_ceilings("NVIDIA A100-SXM4-40GB") == (312e12, 1.555e12)
    assert M.gpu_ceilings("NVIDIA B200") == (2.25e15, 8e12)
    assert M.gpu_ceilings("Tesla T4") == (0, 0)
    cpu = torch.device("cpu")
    assert T.ceilings(T.TrainConfig(), cpu) == (0, 0)
    assert T.ceilings(T.TrainConfig(peak_flops=1e15, peak_bandwidth=2e12), cpu) == (1e15, 2e12)


def test_sampler_floor_counts_the_refreshed_forwards(tiny_dir):
    """A cache refreshed at every step (refresh=1) runs every call over the whole sequence: the
    FLOPs of no cache, and no cached reads; refresh 2 lies between the plain cache and none.
    The counts are generate's own (its stats), for 8 steps per block."""
    c, sp = M.read_config(tiny_dir), copsd.Sampler(gen_length=32, block_length=16, steps=16)
    model, P = M.LLaDA(c), 16
    prompt = torch.randint(0, MASK, (4, P), generator=torch.Generator().manual_seed(0))

    def stats(cache, refresh=0):
        out = {}
        copsd.generate(model, prompt, None, MASK, sp, cache=cache, refresh=refresh, stats=out)
        return out

    none, runs = stats("none"), [stats("dual", r) for r in (0, 2, 1)]
    assert [s["full"] for s in runs] == [[1, 1], [4, 4], [8, 8]] and none["full"] == [8, 8]
    dual, exact = replace(sp, cache="dual"), replace(sp, cache="none")
    flops = [M.sampler_flops(c, dual, 4, P, s) for s in runs]
    assert flops[0] < flops[1] < flops[2] == M.sampler_flops(c, exact, 4, P, none)
    by = [M.sampler_bytes(c, dual, 4, P, s) for s in runs]
    assert by[0] > by[1] > by[2] == M.sampler_bytes(c, exact, 4, P, none)


# ----------------------------------------------------------------------------------------------
# LLaDA-8B's Sudoku task as d1 and the paper evaluate it

# d1's user message for one puzzle (its eval/sudoku.py instruction, a blank line, the question)
D1_MESSAGE = """
Please solve the following 4x4 Sudoku puzzle. The puzzle is provided as a 16-character string \
reading left-to-right, top-to-bottom, where '0' represents empty cells.

Rules:
- Fill empty cells with digits 1-4
- Each row must contain digits 1-4 exactly once
- Each column must contain digits 1-4 exactly once
- Each 2x2 box must contain digits 1-4 exactly once

Important: Your solution must be a COMPLETE 16-character string with only the digits 1-4, \
representing your final solved grid.

Respond in this exact format:
<reasoning>
Your step-by-step solving process
</reasoning>
<answer>
[16-character solution string with no spaces or separators]
</answer>


Solve the following Sudoku puzzle: 3102200002100320
"""


def test_d1_prompt_and_puzzles():
    cfg = copsd.parse_config(T.TrainConfig, ["--n_train", "40", "--n_eval", "30"])
    train, ev = T.make_data(cfg)
    assert len(train) == 40 and len(ev) == 30
    seen = set()
    for r in train + ev:
        p = r["puzzle"]
        assert (p == 0).sum() == 8 and len(sudoku.solutions(p)) == 1  # d1: 8 blanks; unique
        assert ((p == 0) | (p == r["solution"])).all() and p.tobytes() not in seen  # disjoint
        seen.add(p.tobytes())
        assert r["prefill"] == "<reasoning>"
    assert T.SUDOKU_PROMPT.format(puzzle="3102200002100320") == D1_MESSAGE
    # LLaDA's chat template trims the message; d1 prefills the reasoning
    text = T.prompt_text({"prompt": D1_MESSAGE, "prefill": "<reasoning>"})
    assert text == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n"
                    + D1_MESSAGE.strip()
                    + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<reasoning>")
    minimal = T.make_data(copsd.parse_config(T.TrainConfig, ["--n_train", "4", "--n_eval", "4",
                                                          "--sudoku_puzzles", "minimal"]))[1]
    assert all((r["puzzle"] == 0).sum() >= 10 for r in minimal)  # the toy's harder puzzles


def test_d1_answer_parsing_and_score():
    puzzle = np.array([int(c) for c in "3102200002100320"])
    sol = "3142243142131324"
    rows = [{"puzzle": puzzle, "solution": np.array([int(c) for c in sol])}]

    def acc(text):
        return T.score("sudoku", [text], rows)["cell_acc"]

    assert acc(f"\nsteps\n</reasoning>\n<answer>\n{sol}\n</answer><|eot_id|><|endoftext|>") == 1.0
    assert acc(f"</reasoning>\n<answer>\n{sol}<|eot_id|>") == 1.0  # no </answer>: the EOT ends it
    assert acc(f"reasoning that ends with the grid {sol}") == 1.0  # a bare 16-digit run
    assert acc(f"<answer>\n{sol[:4]} {sol[4:8]}\n{sol[8:]}\n</answer>") == 1.0  # spaces dropped
    # malformed answers score 0 and raise nothing: no answer, brackets, a dropped digit
    assert acc("I cannot solve this") == 0.0
    assert acc("<answer>[" + sol + "]</answer>") < 1.0  # compared cell by cell, "[" shifts all
    dropped = sol[:2] + sol[3:]  # 15 digits: padded with 0, so the cells after the gap are wrong
    blanks = [i for i in range(16) if puzzle[i] == 0]
    expect = sum((dropped + "0")[i] == sol[i] for i in blanks) / len(blanks)
    assert acc(f"<answer>\n{dropped}\n</answer>") == pytest.approx(expect) and expect < 1


# ----------------------------------------------------------------------------------------------
# bad input: exit status 2 and one line naming the problem, never a traceback

def bad_files(tmp_path, tiny_dir):
    """Config and JSONL files that are wrong in one way each, in tmp_path."""
    cfg = json.load(open(os.path.join(tiny_dir, "config.json")))
    files = {"string.json": json.dumps({**cfg, "d_model": "32"}), "list.json": "[1, 2]",
             "negative.json": json.dumps({**cfg, "n_layers": -2}),
             "latin1.jsonl": '{"prompt": "caf\xe9", "answer": "1"}\n'.encode("latin-1"),
             "null.jsonl": '{"prompt": "1 + 1?", "answer": "2"}\n{"prompt": null}\n',
             "no_answer.jsonl": '{"prompt": "1 + 1?", "answer": "2"}\n{"prompt": "2 + 2?"}\n'}
    for name, text in files.items():
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())


BAD_VALUES = [
    (["--out", "{tmp}/list.json"], "a file, not a directory"),
    (["--K", "0"], "--K 0"), (["--train_tokens_per_step", "0"], "--train_tokens_per_step 0"),
    (["--eval_tokens_per_step", "0"], "tokens per step 0"),
    (["--prompts_per_step", "0"], "--prompts_per_step 0"),
    (["--micro_batch", "0"], "--micro_batch 0"),
    (["--eval_threshold", "2"], "--eval_threshold 2"), (["--lr", "-1"], "--lr -1"),
    (["--block_length", "0"], "--block_length 0"), (["--gen_length", "0"], "--gen_length 0"),
    (["--save_every", "0"], "--save_every 0"), (["--seed", "-1"], "--seed -1"),
    (["--steps", "0"], "--steps 0"), (["--steps", "-1"], "--steps -1"),
    (["--eval_batch", "0"], "--eval_batch 0"), (["--cache_refresh", "-1"], "--cache_refresh -1"),
    (["--random_init", "--config", "{tmp}/string.json"], "d_model='32'"),
    (["--random_init", "--config", "{tmp}/list.json"], "not a list"),
    (["--random_init", "--config", "{tmp}/negative.json"], "n_layers=-2"),
    (["--task", "gsm8k", "--data", "{tmp}/latin1.jsonl"], "latin1.jsonl:1"),
    (["--task", "gsm8k", "--data", "{tmp}/null.jsonl"], "null.jsonl:2"),
    (["--task", "gsm8k", "--data", "{tmp}/no_answer.jsonl", "--eval_only"], "1 of 2 rows"),
    (["--model_dir", "{tmp}/nowhere"], "nowhere"),
]


@pytest.mark.parametrize("args, expect", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_values_exit_2_with_one_line(tiny_dir, tmp_path, capsys, args, expect):
    bad_files(tmp_path, tiny_dir)
    args = [a.format(tmp=tmp_path) for a in args]
    code = T.main(FLAGS + ["--model_dir", tiny_dir, "--out", str(tmp_path / "out")] + args)
    err = stderr_lines(capsys.readouterr().err)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert expect in err[0] and "Traceback" not in err[0], err


def corrupt(out, what):
    """Make one file of a finished run directory (checkpoints at steps 2 and 4) wrong; returns
    what the error must name."""
    index = os.path.join("step-000004", "hf", M.INDEX)

    def write(name, data):
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)

    def cut(name):
        with open(os.path.join(out, name), "r+b") as f:
            f.truncate(os.path.getsize(os.path.join(out, name)) // 2)
    if what.startswith("latest"):
        write("latest", {"latest ..": b"../other/step-000004", "latest garbage": b"\xff\x00step",
                         "latest absolute": os.path.join(out, "step-000004").encode()}[what])
        return "latest"
    if what.startswith("meta.json"):
        write("step-000004/meta.json", b'{"step": 4, ' if what == "meta.json garbage" else b"[4]")
        return "meta.json"
    if what == "index garbage":
        write(index, b"\x00\x01")
        return M.INDEX
    if what == "index outside":  # the shards of another checkpoint (they would load)
        shards = json.load(open(os.path.join(out, index)))["weight_map"]
        write(index, json.dumps({"weight_map": {k: f"../../step-000002/hf/{v}"
                                                for k, v in shards.items()}}).encode())
        return "../../step-000002/hf/"
    if what == "dcp truncated":
        cut(os.path.join("step-000004", "dcp", sorted(os.listdir(f"{out}/step-000004/dcp"))[0]))
        return "dcp"
    write("latest", b"step-000002")  # its rollouts: saved mid-window
    cut("step-000002/rollout-rank0.safetensors")
    return "rollout-rank0.safetensors"


CORRUPTIONS = ["latest ..", "latest absolute", "latest garbage", "meta.json garbage",
               "meta.json list", "index garbage", "index outside", "dcp truncated",
               "rollouts truncated"]


@pytest.mark.parametrize("what", CORRUPTIONS)
def test_corrupt_run_directory(one_process, tiny_dir, tmp_path, capsys, caplog, what):
    """A resume (or an evaluation of the run directory) whose files do not read, or whose
    `latest` points outside --out: one line naming the file, exit status 2."""
    out = str(tmp_path / "run")
    shutil.copytree(one_process[0], out)
    name = corrupt(out, what)
    for extra in [["--resume", "--skip_eval"], ["--eval_only", "--model_dir", out]]:
        code = T.main(FLAGS + ["--model_dir", tiny_dir, "--out", out] + extra)
        err = stderr_lines(capsys.readouterr().err)
        if extra[0] == "--eval_only" and ("dcp" in what or "rollouts" in what or "meta" in what):
            assert code == 0  # evaluation reads the export only
            continue
        assert code == 2 and err[-1].startswith("error: ") and name in err[-1], err
        assert not any("Traceback" in line for line in err), err
        assert not [r for r in caplog.records if r.exc_info]  # no traceback logged either
