"""
COPSD on LLaDA-8B-Instruct: the same model.py and copsd.py as the Sudoku toy, sharded with FSDP2.

    torchrun --nproc_per_node=4 train_llada.py --model_dir ./LLaDA-8B-Instruct --out runs/copsd
    torchrun --nproc_per_node=4 train_llada.py --model_dir runs/copsd --eval_only
    python train_llada.py --model_dir DIR --task gsm8k --data gsm8k.jsonl --method self

One process per GPU. The model is built on the meta device, sharded (`fully_shard` per block and
at the root), and each rank reads only its own rows of the safetensors (model.load_weights).
Training is on-policy (Alg. 2): every `resample_every` steps the current weights θ' sample K
responses per prompt and cache what the method needs; optimiser steps then train on them. Every
random draw comes from a generator keyed by (seed, step, micro-batch), never by rank or a global
RNG state, so 1 and N processes with the same global batch compute the same thing, and a resumed
run repeats exactly what the killed one would have done. Timings: experiments/bench_llada.py.
"""

import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

import copsd
import model as M
import sudoku  # the Sudoku task's puzzles and scorer
from copsd import flag

# FSDP2 warns that our logits are a view (an in-place op on them would skip a hook; we do none),
# and that DTensor random init on a CPU mesh is per shard (only --random_init on CPU: fine there)
warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
warnings.filterwarnings("ignore", message=".*DTensor random operators.*")

# ----------------------------------------------------------------------------------------------
# configuration: defaults are the paper's settings where it gives them; the fields after the
# flags are set here, in the file (LLaDA's generate options and details of the run)


@dataclass
class TrainConfig(copsd.MethodConfig):
    """the trainer (train_llada.py)"""
    model_dir: str = flag("", "LLaDA's HF layout, or a run directory of this script (its latest "
                              "checkpoint)")
    random_init: bool = flag(False, "random weights of --config's shape (default LLaDA-8B's): "
                                    "no download")
    config: str = flag("", "config.json (or a model directory) for --random_init")
    out: str = flag("runs/copsd", "run directory: checkpoints, log.jsonl, results.jsonl")
    resume: bool = flag(False, "continue from --out's latest checkpoint")
    eval_only: bool = flag(False, "evaluate --model_dir and exit")
    skip_eval: bool = flag(False, "no evaluation after training")
    device: str = flag("cuda", "cuda (NCCL) or cpu (gloo, for tests)", choices=("cuda", "cpu"))
    seed: int = flag(0, "seed of every random draw (keyed by step and micro-batch)")
    # prompts
    task: str = flag("sudoku", "built-in Sudoku prompts (d1's format), or GSM8K-style JSONL",
                     choices=("sudoku", "gsm8k"))
    data: str = flag("", 'JSONL of {"prompt": ..., "answer": ...} to train on (gsm8k)')
    eval_data: str = flag("", "JSONL to evaluate on; default --data")
    n_train: int = flag(2000, "Sudoku prompts for self-distillation")
    n_eval: int = flag(256, "Sudoku evaluation puzzles (the paper: 256)")
    sudoku_puzzles: str = flag("d1", "d1: unique puzzles with 8 blanks, as d1 and the paper "
                                     "evaluate; minimal: the toy's (4-6 givens, much harder)",
                               choices=("d1", "minimal"))
    # the method (Sec. 4; Table 3/4 ablations)
    method: str = flag("copsd", "copsd.METHODS' entry (copsd: Alg. 2; self: Base-Self, Alg. 1; "
                                "sft: the ground truth), all but the toy-only",
                       choices=tuple(m for m, x in copsd.METHODS.items() if not x.toy_only))
    target_top_k: int = flag(64, "exact / later readings: cache the target's top-k tokens only "
                                 "(0 = the whole vocabulary: 126k floats per position at 8B)")
    # the sampler (LLaDA's generate; Table 1's settings)
    gen_length: int = flag(256, "response tokens")
    block_length: int = flag(32, "tokens per block of the sampler")
    remasking: str = flag("low_confidence", "which masked positions a step decodes",
                          choices=("low_confidence", "random"))
    rollout_cache: str = flag("dual", "K/V cache of training rollouts (Fast-dLLM; README: a 4.9x "
                                      "shorter 8B COPSD step, 1-3 points on the toy)",
                              choices=("none", "prefix", "dual"))
    eval_cache: str = flag("none", "K/V cache in evaluation (none: exact, as the paper's Table 1)",
                           choices=("none", "prefix", "dual"))
    cache_refresh: int = flag(0, "with a cache (rollouts, evaluation): also the full forward "
                                 "every this many steps of a block (0: at its start only, as "
                                 "Fast-dLLM; README: its price and what it buys)")
    eval_tokens_per_step: tuple = flag((2, 4, 8, 16), "tokens per step in evaluation (Table 1)")
    eval_threshold: tuple = flag((), "confidence thresholds of threshold decoding in evaluation "
                                     "(Fast-dLLM): a column each, with its tokens per forward, "
                                     "and AUP over them and the 1 token/step column if asked "
                                     "for (d3LLM's leaderboard)", kind=float)
    eval_batch: int = flag(16, "prompts per rank per forward in evaluation")
    # optimisation
    steps: int = flag(100, "optimiser steps")
    prompts_per_step: int = flag(8, "prompts per optimiser step, over all ranks")
    micro_batch: int = flag(2, "prompts (x K rows) per forward, in sampling and update")
    optimizer: str = flag("adamw", "optimiser", choices=("adamw", "sgd"))
    lr: float = flag(1e-6, "learning rate")
    act_ckpt: bool = flag(False, "activation checkpointing per block")
    # checkpoints
    save_every: int = flag(50, "steps between checkpoints")
    max_shard_gb: float = flag(5.0, "largest safetensors shard of an export (GB)")
    # measurement: MFU and the sampler's floor
    peak_flops: float = flag(0.0, "peak FLOP/s per GPU; 0 = the GPU's by its name "
                                  "(model.GPU_CEILINGS: bf16 dense), none on a CPU")
    peak_bandwidth: float = flag(0.0, "memory bandwidth per GPU, bytes/s; 0 = by its name")
    # not flags: LLaDA's generate options (copsd.Sampler) ...
    cfg_scale: float = 0.0  # classifier-free guidance against the prompt masked
    logits_eos_inf: bool = False  # never predict EOS
    confidence_eos_eot_inf: bool = False  # EOS and EOT predictions rank last
    eot_id: int = 126348  # the <|eot_id|> token's id (LLaDA-8B's)
    confidence_dtype: str = "float64"  # of the confidence softmax (LLaDA's code: bf16, with ties)
    cuda_graph: bool = True  # the dual cache's block steps replay one captured CUDA graph
    # ... and details of the run
    tokenizer: str = ""  # tokenizer.json; "": the model directory's
    data_seed: int = 0  # seed of the Sudoku puzzles
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # gradient norm clip; 0 = off
    master_dtype: str = "float32"  # the sharded master weights (compute is bf16)
    reshard_when_sampling: bool = False  # free gathered weights after every sampler forward
    keep_last: int = 2  # checkpoints kept
    save_dtype: str = "float32"  # of the exported weights (bf16 would erase small updates)


# the lowest value of each numeric flag that has one (beyond copsd.MethodConfig's)
LOWEST = dict.fromkeys(["steps", "prompts_per_step", "micro_batch", "eval_batch", "save_every",
                        "gen_length", "block_length", "n_train", "n_eval"], 1) | dict.fromkeys(
    ["lr", "seed", "cache_refresh", "max_shard_gb", "peak_flops", "peak_bandwidth"], 0)


def check(cfg, world, prompts=True):
    """Bad flags, before any work: one line, the first problem (copsd.MethodConfig's, ours, the
    samplers'). prompts=False: a run on random prompts that evaluates nothing (the bench)."""
    v, bl = vars(cfg), max(cfg.block_length, 1)
    ns = [cfg.train_tokens_per_step] + (list(cfg.eval_tokens_per_step) if prompts else [])
    errors = cfg.problems([cfg.method]) + [why for bad, why in [
        *[(not lo <= v[k] < math.inf, f"--{k} {v[k]}: need a finite value >= {lo}")
          for k, lo in LOWEST.items()],
        (os.path.exists(cfg.out) and not os.path.isdir(cfg.out),
         f"--out {cfg.out}: a file, not a directory"),
        *[(n < 1 or bl % n, f"tokens per step {n} does not divide --block_length {bl}")
          for n in ns],
        (cfg.prompts_per_step % (world * max(cfg.micro_batch, 1)),
         f"--prompts_per_step {cfg.prompts_per_step} must be a multiple of {world} ranks x "
         f"--micro_batch {cfg.micro_batch}"),
        (not (cfg.random_init or cfg.model_dir or cfg.resume),
         "give --model_dir DIR (or --random_init)"),
        (prompts and cfg.task == "gsm8k" and not (cfg.data or cfg.eval_data),
         "--task gsm8k needs --data prompts.jsonl"),
        (cfg.resume and cfg.eval_only, "--resume and --eval_only exclude each other"),
        *[(not 0 < τ <= 1, f"--eval_threshold {τ:g}: a probability in (0, 1]")
          for τ in cfg.eval_threshold]] if bad]
    if not errors:  # the samplers' own checks, now that what they divide by is in range
        try:
            rollout_sampler(cfg, M.ModelConfig()), prompts and eval_samplers(cfg, M.ModelConfig())
        except ValueError as e:
            errors.append(str(e))
    if errors:
        raise SystemExit("error: " + errors[0])


# ----------------------------------------------------------------------------------------------
# processes: torchrun's environment, or a world of one for `python train_llada.py`


def init_distributed(cfg):
    cuda = cfg.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no GPU is visible (use --device cpu)")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:  # one process: an in-memory store, no ports
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return dev, init_device_mesh(dev.type, (dist.get_world_size(),))


def generator(dev, *key):
    """A generator seeded by a key like (seed, "rollout", step, micro-batch): the same draws for
    the same work, whichever rank does it and however often the run was restarted."""
    g = torch.Generator(device=dev)
    g.manual_seed(int(hashlib.sha256(repr(key).encode()).hexdigest()[:15], 16))
    return g


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# prompts: LLaDA-8B-Instruct's chat template, built-in Sudoku (d1's format), GSM8K-style JSONL

CHAT = ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")

# d1's Sudoku instruction (Zhao et al. 2025, eval/sudoku.py), verbatim: the user message is it,
# a blank line and "Solve the following Sudoku puzzle: {16 digits, 0 = blank}"; the template
# trims the message, and d1's evaluation prefills the answer with "<reasoning>"
SUDOKU_PROMPT = "\n".join([
    "",
    "Please solve the following 4x4 Sudoku puzzle. The puzzle is provided as a 16-character "
    "string reading left-to-right, top-to-bottom, where '0' represents empty cells.",
    "",
    "Rules:",
    "- Fill empty cells with digits 1-4",
    "- Each row must contain digits 1-4 exactly once",
    "- Each column must contain digits 1-4 exactly once",
    "- Each 2x2 box must contain digits 1-4 exactly once",
    "",
    "Important: Your solution must be a COMPLETE 16-character string with only the digits 1-4, "
    "representing your final solved grid.",
    "",
    "Respond in this exact format:",
    "<reasoning>",
    "Your step-by-step solving process",
    "</reasoning>",
    "<answer>",
    "[16-character solution string with no spaces or separators]",
    "</answer>",
    "",
]) + "\n\nSolve the following Sudoku puzzle: {puzzle}\n"

# d1's answer extraction (eval/parse_and_get_acc.py): the first pattern that matches, on the
# generation decoded with its special tokens
D1_ANSWER = [r"<answer>.*?```\s*([\d\s]+)```",
             r"<answer>(.*?)(?:<\|eot_id\|>|<\|endoftext\|>|</answer>)",
             r"</answer>\s*(.*?)(?:<\|eot_id\|>|<\|endoftext\|>|$)",
             r".*?(\d{16})\s*</answer>",
             r"\b(\d{16})\b"]


def load_tokenizer(path, mcfg):
    if not os.path.isfile(path):
        raise M.CheckpointError(f"{path}: no such file (the model directory's tokenizer.json)")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:
        raise M.CheckpointError(f"{path}: not a tokenizers file ({e})") from None
    mask = tok.token_to_id("<|mdm_mask|>")
    if mask is not None and mask != mcfg.mask_token_id:
        raise M.CheckpointError(f"{path}: <|mdm_mask|> is id {mask}, config.json says "
                                f"{mcfg.mask_token_id}")
    return tok


def load_jsonl(path):
    """A JSONL file's rows {"prompt": str, "answer": str if given}; a bad line: a one-line error."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path}: no such file")
    rows = []
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:  # bytes: json decodes UTF-8 itself, so a bad byte is an error of this line
                r = json.loads(line)
                if not (isinstance(r["prompt"], str)
                        and isinstance(r.get("answer", ""), (str, int, float))):
                    raise TypeError("the prompt must be a string, the answer a string or number")
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise SystemExit(f'error: {path}:{i}: not a JSON object with a "prompt" ({e})'
                                 ) from None
            rows.append({k: str(r[k]) for k in ("prompt", "answer") if k in r})
    return rows


def sudoku_rows(puzzles, sols):
    """Sudoku prompts in d1's format; SFT's response closes the prefilled reasoning and gives
    the solution (the data has no reasoning to imitate)."""
    return [{"prompt": SUDOKU_PROMPT.format(puzzle="".join(map(str, p))), "prefill": "<reasoning>",
             "puzzle": p, "solution": s,
             "answer": "\n</reasoning>\n<answer>\n" + "".join(map(str, s)) + "\n</answer>"}
            for p, s in zip(puzzles, sols)]


def make_data(cfg):
    """(train, eval) lists of {"prompt", "answer", ...}; answers where scored or imitated."""
    if cfg.task == "sudoku":
        sp = sudoku.make_splits(cfg.data_seed, 0, cfg.n_train, cfg.n_eval, n_val=0,
                                blanks=8 if cfg.sudoku_puzzles == "d1" else None)
        return sudoku_rows(*sp["distill"]), sudoku_rows(*sp["test"])
    train = load_jsonl(cfg.data) if cfg.data else []
    ev = load_jsonl(cfg.eval_data) if cfg.eval_data else train
    sft, scored = cfg.method == "sft" and not cfg.eval_only, cfg.eval_only or not cfg.skip_eval
    for rows, path, use in [(train, cfg.data, sft and "SFT imitates"), (ev, cfg.eval_data or
                            cfg.data, scored and "evaluation scores (or pass --skip_eval)")]:
        missing = sum("answer" not in r for r in rows)
        if use and (missing or not rows):
            raise SystemExit(f"error: {path}: " + (f'{missing} of {len(rows)} rows have no '
                             f'"answer", which {use}' if rows else "no rows"))
    return train, ev


def prompt_text(row):
    """LLaDA-8B-Instruct's chat template (which trims the message) around the prompt, then the
    response's prefill if any (d1's Sudoku evaluation starts the answer with "<reasoning>")."""
    return CHAT.format(prompt=row["prompt"].strip()) + row.get("prefill", "")


def tokenize(rows, tok, mcfg, cfg):
    """Each row's prompt ids under the chat template; for SFT also its response: the answer,
    <|eot_id|>, then EOS padding as in LLaDA's SFT."""
    texts = [prompt_text(r) for r in rows]
    for r, enc in zip(rows, tok.encode_batch(texts, add_special_tokens=False)):
        r["ids"] = enc.ids
        if len(enc.ids) + cfg.gen_length > mcfg.max_sequence_length:
            raise SystemExit(f"error: a prompt of {len(enc.ids)} tokens + --gen_length "
                             f"{cfg.gen_length} exceeds max_sequence_length "
                             f"{mcfg.max_sequence_length}")
    eot = tok.token_to_id("<|eot_id|>")
    for r in rows if cfg.method == "sft" else []:
        ids = tok.encode(r["answer"], add_special_tokens=False).ids + [eot] * (eot is not None)
        r["answer_ids"] = (ids + [mcfg.eos_token_id] * cfg.gen_length)[:cfg.gen_length]


def make_batch(rows, mcfg, dev):
    """Left-padded prompts (B, P), their key-padding mask, and SFT's answers (B, L) if any."""
    P = max(len(r["ids"]) for r in rows)
    prompt = torch.full((len(rows), P), mcfg.pad_token_id, dtype=torch.long)
    attn = torch.zeros(len(rows), P, dtype=torch.bool)
    for i, r in enumerate(rows):
        prompt[i, P - len(r["ids"]):] = torch.tensor(r["ids"])
        attn[i, P - len(r["ids"]):] = True
    answers = torch.tensor([r["answer_ids"] for r in rows]) if "answer_ids" in rows[0] else None
    return dict(prompt=prompt.to(dev), attn=attn.to(dev), rows=rows,
                answers=None if answers is None else answers.to(dev))


def response_text(tok, ids, mcfg, task):
    """The generated text: for Sudoku all of it with its special tokens (what d1's parser
    reads), else up to the first <|eot_id|> or EOS."""
    if task == "sudoku":
        return tok.decode(ids, skip_special_tokens=False)
    stops = {mcfg.eos_token_id, tok.token_to_id("<|eot_id|>")}
    cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tok.decode(ids[:cut], skip_special_tokens=True)


def d1_answer(text):
    """d1's reading of a Sudoku answer: the first matching pattern's text without whitespace,
    padded with 0 or cut to 16 characters (compared cell by cell: a non-digit is a wrong cell);
    "0" * 16 (nothing right) where none matches."""
    for pattern in D1_ANSWER:
        m = re.search(pattern, text, re.DOTALL)
        if m and m.group(1).strip():
            return (re.sub(r"\s", "", m.group(1)) + "0" * 16)[:16]
    return "0" * 16


def last_number(text):
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return float(nums[-1].replace(",", "")) if nums else None


def score(task, texts, rows):
    """Sudoku: the fraction of blank cells filled correctly (App. A.1) and of puzzles solved;
    GSM8K: whether the response's last number equals the reference's (after '####')."""
    if task == "sudoku":  # d1's score: the reference solution's cells, among the blanks
        filled = np.array([[int(c) if c in "1234" else 0 for c in d1_answer(t)] for t in texts])
        r = sudoku.score(filled, np.stack([r["puzzle"] for r in rows]),
                         np.stack([r["solution"] for r in rows]))
        return dict(cell_acc=r["cell_acc"], solved=r["solved"])  # not the per-puzzle lists
    gold = [last_number(r["answer"].split("####")[-1]) for r in rows]
    pred = [last_number(t) for t in texts]
    right = [p is not None and g is not None and abs(p - g) < 1e-6 for p, g in zip(pred, gold)]
    return dict(acc=float(np.mean(right)))


# ----------------------------------------------------------------------------------------------
# the model: meta-device build, FSDP2 sharding, then each rank reads its own rows


def resolve_model_dir(d):
    """A run directory of this script stands for its latest checkpoint's HF export."""
    if not os.path.isfile(os.path.join(d, "config.json")) and os.path.isfile(
            os.path.join(d, "latest")):
        return os.path.join(latest_step(d), "hf")
    return d


def model_config(cfg, src):
    if src or os.path.isdir(cfg.config):
        return M.read_config(src or cfg.config)
    if not cfg.config:
        return M.ModelConfig()  # LLaDA-8B-Instruct's shape
    try:
        with open(cfg.config) as f:
            return M.ModelConfig.from_dict(json.load(f))
    except (OSError, ValueError) as e:
        raise M.CheckpointError(f"{cfg.config}: {e}") from None


def build_model(cfg, src, dev, mesh):
    """src: a model directory to load, or None for --random_init. The float32 master weights
    exist only as each rank's shard; forward and backward run on bf16 copies, gradients reduce
    in float32."""
    mcfg = model_config(cfg, src)
    with torch.device("meta"):
        model = M.LLaDA(mcfg).to(getattr(torch, cfg.master_dtype))
    # cast_forward_inputs=False: the rotary cos/sin handed to every block stay float32, and
    # activation checkpointing's recompute (which skips FSDP's input cast) sees the same dtypes
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                               cast_forward_inputs=False)
          if dev.type == "cuda" else MixedPrecisionPolicy())  # CPU tests: float32 throughout
    for block in model.transformer.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=dev)
    if src:
        agreed(M.load_weights, model, src)
    else:
        torch.manual_seed(cfg.seed)  # the same on every rank: DTensor's RNG draws each shard
        model.init_weights()
    model.activation_checkpointing = cfg.act_ckpt
    return model, mcfg


@contextmanager
def gathered(model, keep):
    """During sampling (hundreds of no-grad forwards) keep each block's gathered bf16 weights
    instead of all-gathering them for every forward; free them afterwards for the update."""
    keep = keep and hasattr(model, "set_reshard_after_forward")  # torch >= 2.7
    if keep:
        model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        if keep:
            model.set_reshard_after_forward(True)
            for m in model.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()


# ----------------------------------------------------------------------------------------------
# the sampler (copsd.Sampler), built once from the flags: the rollouts' and one per evaluation
# column


def rollout_sampler(cfg, mcfg):
    """The training rollouts' sampler: --train_tokens_per_step at --temperature."""
    one = copsd.Sampler(  # one token per step (valid for any block length) until .at(n)
        gen_length=cfg.gen_length, block_length=cfg.block_length, steps=cfg.gen_length,
        temperature=cfg.temperature, remasking=cfg.remasking, cache=cfg.rollout_cache,
        refresh=cfg.cache_refresh, cfg_scale=cfg.cfg_scale, logits_eos_inf=cfg.logits_eos_inf,
        confidence_eos_eot_inf=cfg.confidence_eos_eot_inf, eos_id=mcfg.eos_token_id,
        eot_id=cfg.eot_id, confidence_dtype=getattr(torch, cfg.confidence_dtype),
        cuda_graph=cfg.cuda_graph)
    return one.at(cfg.train_tokens_per_step)


def eval_samplers(cfg, mcfg):
    """The evaluation's columns, greedy with --eval_cache: {name: Sampler} at each
    --eval_tokens_per_step (Table 1), then one per --eval_threshold (as many tokens per step as
    are confident enough)."""
    greedy = replace(rollout_sampler(cfg, mcfg), temperature=0.0, cache=cfg.eval_cache)
    return {str(n): greedy.at(n) for n in cfg.eval_tokens_per_step} | {
        f"τ={τ}": replace(greedy.at(cfg.block_length), threshold=τ) for τ in cfg.eval_threshold}


# ----------------------------------------------------------------------------------------------
# training: on-policy windows of `resample_every` steps; each rank its slice of every step


def micro_batches(rows, cfg, step):
    """This rank's micro-batches of `step`: (prompts, global micro-batch id). Prompts follow a
    seeded permutation per epoch, so the order depends on neither the rank count nor restarts."""
    world, rank = dist.get_world_size(), dist.get_rank()
    per_rank = cfg.prompts_per_step // world
    out = []
    for j in range(per_rank // cfg.micro_batch):
        first = step * cfg.prompts_per_step + rank * per_rank + j * cfg.micro_batch
        picked = []
        for i in range(first, first + cfg.micro_batch):
            order = np.random.default_rng([cfg.seed, i // len(rows)]).permutation(len(rows))
            picked.append(rows[order[i % len(rows)]])
        out.append((picked, rank * (per_rank // cfg.micro_batch) + j))
    return out


def sample(model, rows, cfg, mcfg, sp, steps, dev):
    """θ' = the current weights draw the rollouts of `steps` with sampler sp (the method's
    copsd.make_rollout, rows prompt-major): {(step, j): Rollout}, and the tokens generated and
    model FLOPs spent (SFT generates none)."""
    model.eval()
    out, tokens, flops = {}, 0, 0
    with gathered(model, not cfg.reshard_when_sampling):
        for s in steps:
            for j, (picked, mb) in enumerate(micro_batches(rows, cfg, s)):
                b, stats = make_batch(picked, mcfg, dev), {}
                ro = out[(s, j)] = copsd.make_rollout(
                    cfg.method, model, b["prompt"], b["attn"], mcfg.mask_token_id, sp, cfg,
                    answers=b["answers"], stats=stats,
                    generator=generator(dev, cfg.seed, "rollout", s, mb))
                if stats:
                    tokens += len(ro) * sp.gen_length
                    flops += M.sampler_flops(mcfg, sp, len(ro), ro.P, stats)
    return out, tokens, flops


def loss_count(cfg, ro):
    """What the loss averages over: COPSD the positions masked in y_{t-s}; the MDM loss the
    response tokens (and the other losses, as a proxy)."""
    return int(ro.mask_ts.sum()) if cfg.method == "copsd" else ro.seq.numel() - len(ro) * ro.P


def train_step(model, opt, step, chunks, cfg, sp, dev):
    """One optimiser step on this rank's micro-batches [(rollout, micro-batch id)]; returns the
    mean loss and d over the global batch. FSDP averages gradients over ranks, so each
    micro-batch's mean is weighted by its count over the global count, times the world size."""
    model.train()
    loss_fn, options = copsd.METHODS[cfg.method].loss, copsd.loss_options(cfg.method, cfg, sp)
    counts = [loss_count(cfg, ro) for ro, _ in chunks]
    total = torch.tensor([float(sum(counts))], device=dev)
    dist.all_reduce(total)
    total = max(total.item(), 1.0)
    sums = torch.zeros(2, device=dev)
    for (ro, mb), n in zip(chunks, counts):
        g = generator(dev, cfg.seed, "loss", step, mb)
        loss, stats = loss_fn(model, ro, model.cfg.mask_token_id, generator=g, **options)
        (loss * (n * dist.get_world_size() / total)).backward()
        sums += torch.tensor([loss.item() * n, stats.get("d", 0.0) * n], device=dev)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
    dist.all_reduce(sums)
    # both are over all ranks already (the loss summed, the norm global): every rank stops here
    copsd.check_finite(step + 1, loss=sums[0], gradient_norm=norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return (sums / total).tolist()


def update_flops(c, cfg, ro):
    """The forward passes (and backward) of one micro-batch's loss, and COPSD's two-view θ' pass
    made at rollout time. d-OPSD: dopsd_steps student passes with gradient, as many teacher
    passes without; SelFusion, dParallel and d3LLM: two views with gradient (dParallel's and
    d3LLM's a masked view and its complement); the others one pass."""
    rows, S, L = len(ro), ro.seq.shape[1], ro.seq.shape[1] - ro.P
    one = M.forward_flops(c, rows, S, head=L)
    two_views = dict.fromkeys(["selfusion", "dparallel", "d3llm"], 6 * one)
    return {"copsd": 5 * one, "dopsd": 4 * cfg.dopsd_steps * one, **two_views}.get(
        cfg.method, 3 * one)


def ceilings(cfg, dev):
    """(peak FLOP/s, bytes/s) per GPU, for MFU and the sampler's floor: the flags', else the
    GPU's known by its name (model.GPU_CEILINGS); 0 where unknown (a CPU, another GPU)."""
    known = M.gpu_ceilings(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else (0, 0)
    return cfg.peak_flops or known[0], cfg.peak_bandwidth or known[1]


def train(cfg, model, mcfg, rows, opt, sp, dev, start=0, pending=None, save=None, window=None):
    """The loop: at a window's first step sample its rollouts with sampler sp, then one optimiser
    step on this step's micro-batches; log (cut to `start` first), and save(step, pending) every
    save_every steps and at the end. Returns per-step records: each phase's time, tokens and
    FLOPs (this rank's). A window: `window` steps (default --resample_every; 0: all) from each
    multiple of it, cut at --steps, or from a resumed run's first step if its saved rollouts miss
    it (a finished run, extended) to the next multiple: so a run extended from a multiple of the
    window repeats the longer run exactly, else trains up to it on the resumed weights' rollouts."""
    rank, window = dist.get_rank(), window or cfg.resample_every or cfg.steps
    pending, peak_flops = pending or {}, ceilings(cfg, dev)[0]
    log, records = os.path.join(cfg.out, "log.jsonl"), []
    if rank == 0 and os.path.isfile(log):  # cut to `start` (atomic): a record starts with its step
        with open(log, errors="replace") as f:
            kept = [s for s in f if (m := re.match(r'{"step": (\d+),', s)) and int(m[1]) <= start]
        write_atomic(log, "".join(kept))
    with tqdm(total=cfg.steps, initial=start, desc=cfg.method, disable=rank != 0) as bar:
        for step in range(start, cfg.steps):
            sync(dev)
            t0 = time.perf_counter()
            rec = dict(step=step + 1, sample_s=None, sample_flops=0, gen_tokens=0)
            if step % window == 0 or (step, 0) not in pending:
                end = min(step // window * window + window, cfg.steps)
                pending, rec["gen_tokens"], rec["sample_flops"] = sample(
                    model, rows, cfg, mcfg, sp, range(step, end), dev)
                sync(dev)
                rec["sample_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            chunks = [(pending.pop((step, j)), mb)
                      for j, (_, mb) in enumerate(micro_batches(rows, cfg, step))]
            rec["loss"], rec["d"] = train_step(model, opt, step, chunks, cfg, sp, dev)
            sync(dev)
            rec.update(update_s=time.perf_counter() - t1,
                       update_tokens=sum(ro.seq.numel() for ro, _ in chunks),
                       update_flops=sum(update_flops(mcfg, cfg, ro) for ro, _ in chunks))
            records.append(rec)
            if rank == 0:
                with open(log, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                progress(bar, rec, time.perf_counter() - t0, peak_flops)
            if save and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
                save(step + 1, pending)
    return records


def progress(bar, rec, seconds, peak_flops):
    """tqdm's line: loss, d, MFU (— where the GPU's peak is unknown), generated tokens/s."""
    flops = rec["sample_flops"] + rec["update_flops"]
    bar.update(1)
    bar.set_postfix(loss=f"{rec['loss']:.4f}", d=f"{rec['d']:.3g}",
                    mfu=f"{flops / seconds / peak_flops:.1%}" if peak_flops else "—",
                    tok_s=f"{rec['gen_tokens'] * dist.get_world_size() / seconds:.0f}")


# ----------------------------------------------------------------------------------------------
# evaluation: greedy decoding at each tokens-per-step n (Table 1) and each confidence threshold,
# prompts split over ranks


@torch.no_grad()
def evaluate(model, mcfg, tok, rows, cfg, dev):
    """{column: score and tpf}: each column's tokens per forward is the generated tokens over
    the model calls they needed, both summed over every prompt."""
    world, rank = dist.get_world_size(), dist.get_rank()
    eb = cfg.eval_batch
    per = -(-len(rows) // (world * eb)) * eb  # every rank runs as many batches (FSDP)
    mine = [rows[min(i, len(rows) - 1)] for i in range(rank * per, (rank + 1) * per)]
    model.eval()
    out = {}
    with gathered(model, not cfg.reshard_when_sampling):
        for name, sp in eval_samplers(cfg, mcfg).items():
            texts, tokens, calls = [], [], []
            for i in range(0, per, eb):
                b, stats = make_batch(mine[i:i + eb], mcfg, dev), {}
                P = b["prompt"].shape[1]
                seq, states = copsd.generate(model, b["prompt"], b["attn"], mcfg.mask_token_id,
                                             sp, record=True, stats=stats)
                texts += [response_text(tok, s.tolist(), mcfg, cfg.task) for s in seq[:, P:].cpu()]
                n, c = copsd.decode_counts(states[:, :, P:], stats["forwards"], sp.block_length,
                                           mcfg.mask_token_id)
                tokens, calls = tokens + n.tolist(), calls + c.tolist()
            everyone = [None] * world
            dist.all_gather_object(everyone, (texts, tokens, calls))
            # rank-major is row order; past len(rows) are the last row's repeats
            texts, tokens, calls = ([x for part in everyone for x in part[k]][:len(rows)]
                                    for k in range(3))
            out[name] = dict(score(cfg.task, texts, rows), tpf=sum(tokens) / max(sum(calls), 1))
    return out


def report(results, cfg, name, step):
    """Print the columns' accuracy and append results.jsonl's record; with --eval_threshold
    also the AUP (copsd.aup) of its curve (copsd.aup_curve: the 1 token/step and threshold
    columns' (tokens per forward, accuracy in %) points), and those points."""
    if dist.get_rank() != 0:
        return
    key = "cell_acc" if cfg.task == "sudoku" else "acc"
    rec = dict(model=name, step=step, method=cfg.method,
               results={str(n): r for n, r in results.items()})
    if cfg.eval_threshold:
        rec["aup_points"] = copsd.aup_curve(results, key)
        rec["aup"] = copsd.aup(rec["aup_points"])
    print(f"\n{cfg.task}: {key} (%) by tokens per step\n" + "Model / # Tokens".ljust(40)
          + "".join(f"{n:>8}" for n in results))
    print(name[-39:].ljust(40) + "".join(f"{100 * r[key]:8.2f}" for r in results.values()))
    if "aup" in rec:
        print("tokens per forward".ljust(40) + "".join(f"{r['tpf']:8.2f}" for r in
                                                       results.values()))
        print(f"AUP {rec['aup']:.1f}")
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "results.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")


# ----------------------------------------------------------------------------------------------
# checkpoints: out/step-N/{hf/ (LLaDA's layout, rank 0), dcp/ (optimizer), rollout-rankR,
# meta.json}; `out/latest` names the newest complete one and is replaced atomically last, so a
# run killed while saving resumes from the previous one. Weights are exported in float32 by
# default: at the paper's small learning rates most updates are below bf16's resolution.

# torch >= 2.9 keeps the optimizer's state as safetensors placing shards in JSON headers: no pickle,
# so resuming a crafted run directory runs no code (older torch: DCP's .metadata is a pickle)
SAFE_DCP = tuple(map(int, re.findall(r"\d+", torch.__version__)[:2])) >= (2, 9)
ASSET_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "generation_config.json", "configuration_llada.py", "modeling_llada.py"]


def write_atomic(path, text):
    Path(path + ".tmp").write_text(text)
    os.replace(path + ".tmp", path)


def read_assets(src, tok_path):
    """The tokenizer and LLaDA's code files (so that LLaDA's own code loads an export), read
    once: their directory may be an old checkpoint, pruned later."""
    paths = {f: os.path.join(src or "", f) for f in ASSET_FILES} | {"tokenizer.json": tok_path}
    return {name: Path(p).read_bytes() for name, p in paths.items() if os.path.isfile(p)}


def save_rollouts(path, pending):
    """The window's unused rollouts: θ' that drew them is gone, so they are state too."""
    tensors, meta = {}, {}
    for (s, j), ro in pending.items():
        meta[f"{s}.{j}"] = str(ro.P)
        for f in fields(ro):
            if torch.is_tensor(getattr(ro, f.name)):
                tensors[f"{s}.{j}.{f.name}"] = getattr(ro, f.name).contiguous().cpu()
    save_file(tensors, path, metadata=meta)


def load_rollouts(path, dev):
    try:
        with safe_open(path, framework="pt", device=str(dev)) as f:
            meta, parts = f.metadata(), {}
            for key in f.keys():
                s, j, name = key.split(".", 2)
                parts.setdefault((int(s), int(j)), {})[name] = f.get_tensor(key)
        return {k: copsd.Rollout(**{"attn": None, **v}, P=int(meta[f"{k[0]}.{k[1]}"]))
                for k, v in parts.items()}
    except Exception as e:  # safetensors raises its own types
        raise M.CheckpointError(f"{path}: not this script's rollouts ({e})") from None


def save_checkpoint(model, opt, mcfg, cfg, step, pending, assets):
    agreed(copsd.check_finite, step, weights=[p.to_local() for p in model.parameters()])
    rank, name = dist.get_rank(), f"step-{step:06d}"
    d = os.path.join(cfg.out, name)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=options)  # full tensors on rank 0's CPU only
    if rank == 0:
        shutil.rmtree(d, ignore_errors=True)  # a partial one left by a killed run
        M.save_pretrained(os.path.join(d, "hf"), mcfg, full, int(cfg.max_shard_gb * 2 ** 30),
                          getattr(torch, cfg.save_dtype))
        for fname, data in assets.items():
            Path(d, "hf", fname).write_bytes(data)
        meta = dict(step=step, seed=cfg.seed, world_size=dist.get_world_size(), config=asdict(cfg))
        write_atomic(os.path.join(d, "meta.json"), json.dumps(meta, indent=2))
    del full
    dist.barrier()
    p = os.path.join(d, "dcp")  # the optimizer's state (its groups: the flags')
    dcp.save({"state": get_optimizer_state_dict(model, opt)["state"]}, storage_writer=(
        dcp.HuggingFaceStorageWriter(p, save_distributed=True) if SAFE_DCP
        else dcp.FileSystemWriter(p)))
    if pending:
        save_rollouts(os.path.join(d, f"rollout-rank{rank}.safetensors"), pending)
    dist.barrier()
    if rank == 0:
        write_atomic(os.path.join(cfg.out, "latest"), name)
        old = sorted(e for e in os.listdir(cfg.out) if re.fullmatch(r"step-\d+", e) and e < name)
        for e in old[:max(0, len(old) - cfg.keep_last + 1)]:
            shutil.rmtree(os.path.join(cfg.out, e), ignore_errors=True)


def latest_step(d):
    """d/latest's step-NNNNNN directory of d; nothing else (../other-run/... is another run)."""
    path = os.path.join(d, "latest")
    name = Path(path).read_text(errors="replace").strip()
    if not (re.fullmatch(r"step-\d{6,}", name) and os.path.isdir(os.path.join(d, name))):
        raise M.CheckpointError(f"{path}: names {name[:50]!r}, not a step-NNNNNN directory in {d}")
    return os.path.join(d, name)


def latest_checkpoint(cfg):
    """--out's latest checkpoint and its meta.json, if its flags are this run's."""
    if not os.path.isfile(os.path.join(cfg.out, "latest")):
        raise SystemExit(f"error: --resume: {cfg.out}/latest does not exist (no checkpoint there)")
    d = latest_step(cfg.out)
    try:
        meta = json.loads(Path(d, "meta.json").read_bytes())
        saved = {k: meta["config"][k] for k in ["seed", "method", "K", "prompts_per_step",
                                                "micro_batch", "resample_every", "task", "data"]}
        meta.update(step=int(meta["step"]), world_size=int(meta["world_size"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise M.CheckpointError(f"{d}/meta.json: not this script's ({e!r})") from None
    for k, value in saved.items():
        if value != getattr(cfg, k):
            raise SystemExit(f"error: --resume: --{k} {getattr(cfg, k)} differs from the "
                             f"checkpoint's {value}")
    if meta["step"] > cfg.steps:
        raise SystemExit(f"error: --resume: {d} is past --steps {cfg.steps}")
    return d, meta


def resume_state(d, meta, model, opt, dev):
    """Optimizer state from DCP and this rank's saved rollouts (the weights came with
    build_model); a file that does not read is a one-line error naming it."""
    state = get_optimizer_state_dict(model, opt)  # the flags' groups, the state to load into
    try:
        p = os.path.join(d, "dcp")
        logging.disable(logging.CRITICAL)  # DCP's loader logs a traceback before it raises
        try:
            dcp.load({"state": state["state"]}, storage_reader=(
                dcp.HuggingFaceStorageReader(p) if SAFE_DCP else dcp.FileSystemReader(p)))
        finally:
            logging.disable(logging.NOTSET)
    except (dcp.CheckpointException, Exception) as e:  # the first rank's error, in one line
        e = next(iter(e.failures.values()))[0] if isinstance(e, dcp.CheckpointException) else e
        raise M.CheckpointError(f"{d}/dcp: not this script's optimizer state "
                                f"({type(e).__name__}: {e})".splitlines()[0]) from None
    set_optimizer_state_dict(model, opt, state)
    path = os.path.join(d, f"rollout-rank{dist.get_rank()}.safetensors")
    if not os.path.isfile(path):
        return meta["step"], {}
    if meta["world_size"] != dist.get_world_size():
        raise SystemExit(f"error: --resume: {d} was saved mid-rollout by {meta['world_size']} "
                         "ranks; resume with as many")
    return meta["step"], agreed(load_rollouts, path, dev)


# ----------------------------------------------------------------------------------------------
# putting it together


def start_run(cfg, model, rows):
    """The run directory, a line on rank 0 saying what runs, and the optimiser."""
    if dist.get_rank() == 0:
        os.makedirs(cfg.out, exist_ok=True)
        print(f"{cfg.method}: {model.num_params() / 1e9:.2f}B parameters on "
              f"{dist.get_world_size()} rank(s), {len(rows)} prompts, {cfg.steps} steps of "
              f"{cfg.prompts_per_step} prompts x {cfg.K}")
    dist.barrier()
    Opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.SGD
    return Opt(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def run(cfg, dev, mesh):
    check(cfg, dist.get_world_size())
    ckpt, meta = latest_checkpoint(cfg) if cfg.resume else (None, None)
    src = (os.path.join(ckpt, "hf") if ckpt else
           None if cfg.random_init else resolve_model_dir(cfg.model_dir))
    model, mcfg = build_model(cfg, src, dev, mesh)
    tok_path = cfg.tokenizer or os.path.join(src or cfg.model_dir or ".", "tokenizer.json")
    tok = load_tokenizer(tok_path, mcfg)
    train_rows, eval_rows = make_data(cfg)
    tokenize(train_rows, tok, mcfg, cfg)
    tokenize(eval_rows, tok, mcfg, cfg)
    if cfg.eval_only:
        report(evaluate(model, mcfg, tok, eval_rows, cfg, dev), cfg, src, None)
        return
    if not train_rows:
        raise SystemExit("error: no training prompts (--data)")
    assets = read_assets(src, tok_path)
    opt = start_run(cfg, model, train_rows)
    start, pending = resume_state(ckpt, meta, model, opt, dev) if ckpt else (0, {})

    def save(step, pending):
        save_checkpoint(model, opt, mcfg, cfg, step, pending, assets)
    train(cfg, model, mcfg, train_rows, opt, rollout_sampler(cfg, mcfg), dev, start, pending, save)
    if not cfg.skip_eval and eval_rows:
        report(evaluate(model, mcfg, tok, eval_rows, cfg, dev), cfg,
               os.path.join(cfg.out, f"step-{cfg.steps:06d}"), cfg.steps)


def agreed(fn, *args, **kw):
    """fn(*args, **kw) on every rank, its one-line error (CheckpointError, FloatingPointError)
    raised on all if any raised it: one rank stopping alone would leave the others waiting."""
    try:
        out, err = fn(*args, **kw), None
    except (M.CheckpointError, FloatingPointError) as e:
        out, err = None, e
    errs = [None] * dist.get_world_size()
    dist.all_gather_object(errs, err)
    for e in filter(None, errs):
        raise e
    return out


def launch(cfg, run):
    """run(cfg, dev, mesh) in the process group; bad input or a non-finite value ends in a
    one-line error and exit status 2."""
    try:
        dev, mesh = init_distributed(cfg)
        try:
            run(cfg, dev, mesh)
        finally:
            dist.destroy_process_group()
    except (M.CheckpointError, FloatingPointError, SystemExit) as e:
        if isinstance(e, SystemExit) and not isinstance(e.code, str):
            raise  # argparse's --help and its own errors
        print(e.code if isinstance(e, SystemExit) else f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None):
    return launch(copsd.parse_config(TrainConfig, argv, description=__doc__), run)


if __name__ == "__main__":
    sys.exit(main())
