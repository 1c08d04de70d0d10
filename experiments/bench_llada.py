"""
LLaDA-8B's sampler and COPSD step, timed: train_llada.py's loop with every step sampling (no
checkpoints, no evaluation) on random prompts, then the sampler alone for each cache, CUDA graph,
threshold and refresh, at each batch size. train_llada.py's flags set the model, the method and
the sampler (those of evaluation and checkpoints do nothing here).

    python -m experiments.bench_llada --random_init --steps 3   # random weights of the 8B shape
    python -m experiments.bench_llada --random_init --steps 1 --no-bench_sampler --bench_eval \
        --eval_tokens_per_step 1,2 --eval_threshold 0.5,0.7,0.9,0.95   # one evaluation's columns
    torchrun --nproc_per_node=2 -m experiments.bench_llada --random_init --steps 3 --K 4 \\
        --prompts_per_step 8 --micro_batch 4 --act_ckpt --no-bench_sampler

Prints, per phase, seconds per step, tokens/s, model TFLOP/s per GPU and MFU; then the sampler's
table with its floor: model FLOPs over the GPU's peak or bytes over its bandwidth, whichever is
larger. The ceilings are the GPU's, known by its name (model.GPU_CEILINGS), or --peak_flops and
--peak_bandwidth; where neither is known (a CPU) MFU and the floor print "—".
"""

import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

import copsd
import model as M
import train_llada as T
from copsd import flag


@dataclass
class BenchConfig(T.TrainConfig):
    bench_prompt_len: int = flag(200, "prompts are random tokens of this length")
    bench_batches: tuple = flag((1, 8, 16), "the sampler table: rows per generate call")
    bench_sampler: bool = flag(True, "also time the sampler alone per cache and batch")
    bench_eval: bool = flag(False, "also time an evaluation's columns (--eval_tokens_per_step, "
                                   "--eval_threshold) on --eval_batch random prompts")


# the sampler table's rows: cache, CUDA graph, threshold, refresh
SETTINGS = [("none", False, None, 0), ("prefix", False, None, 0), ("dual", False, None, 0),
            ("dual", True, None, 0), ("dual", True, None, 2), ("dual", True, 0.9, 0)]


def bench_rows(cfg, mcfg):
    """The prompts: random tokens of a fixed length (no tokenizer, no download)."""
    g = torch.Generator().manual_seed(cfg.seed)
    vocab = min(mcfg.vocab_size, mcfg.mask_token_id)
    return [{"ids": torch.randint(0, vocab, (cfg.bench_prompt_len,), generator=g).tolist(),
             "answer_ids": [mcfg.eos_token_id] * cfg.gen_length}
            for _ in range(cfg.prompts_per_step)]


def ceilings_line(cfg, dev):
    """The ceilings MFU and the floor are measured against, and the device they are of."""
    flops, bandwidth = T.ceilings(cfg, dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    known = (f"{flops / 1e12:.4g} TFLOP/s, {bandwidth / 1e12:.4g} TB/s" if flops and bandwidth
             else "not known (--peak_flops, --peak_bandwidth)")
    return f"\nceilings per GPU ({name}): {known}"


def bench_table(records, cfg, dev):
    """Per phase, over the steps after the first: seconds per step, tokens/s (all ranks), model
    TFLOP/s per GPU and MFU, and peak memory per rank. A phase that did not run prints "—"."""
    recs = records[1:] or records
    n, world = len(recs), dist.get_world_size()
    counts = torch.tensor([sum(r[k] for r in recs) / n for k in
                           ("gen_tokens", "sample_flops", "update_tokens", "update_flops")],
                          dtype=torch.float64, device=dev)
    dist.all_reduce(counts)  # every rank's tokens and FLOPs
    mem = torch.tensor([torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda"
                        else 0.0], device=dev)
    mems = [torch.zeros_like(mem) for _ in range(world)]
    dist.all_gather(mems, mem)
    if dist.get_rank() != 0:
        return
    gen, fl_s, upd, fl_u = counts.tolist()
    t_s = sum(r["sample_s"] or 0.0 for r in recs) / n
    t_u = sum(r["update_s"] for r in recs) / n
    peak = T.ceilings(cfg, dev)[0]
    print(ceilings_line(cfg, dev))
    print("\n| phase | s/step | tokens/s | TFLOP/s per GPU | MFU % |\n|---|---|---|---|---|")
    for name, secs, tokens, flops in [("sampling (generated tokens)", t_s, gen, fl_s),
                                      ("update (rows x (P+L) tokens)", t_u, upd, fl_u),
                                      ("step", t_s + t_u, gen or upd, fl_s + fl_u)]:
        if secs == 0 or tokens == 0:  # the phase did not run in the measured steps
            print(f"| {name} | — | — | — | — |")
            continue
        tf = flops / world / secs
        mfu = f"{100 * tf / peak:.3g}" if peak else "—"
        print(f"| {name} | {secs:.4g} | {tokens / secs:.4g} | {tf / 1e12:.4g} | {mfu} |")
    print("peak GPU memory per rank (GiB): " + ", ".join(f"{m.item():.1f}" for m in mems))


def time_generate(model, mcfg, sp, prompt, cfg, dev):
    """One timed copsd.generate call with sampler sp: the sampler table's cells after the
    batch's: tokens/s, tokens per forward, seconds, the floor, measured over floor, peak GiB."""
    cuda, (B, P), stats = dev.type == "cuda", prompt.shape, {}
    T.sync(dev)
    if cuda:
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    _, states = copsd.generate(model, prompt, None, mcfg.mask_token_id, sp, record=True,
                               stats=stats)
    T.sync(dev)
    secs = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 30 if cuda else 0.0
    peak_flops, bandwidth = T.ceilings(cfg, dev)
    fl = M.sampler_flops(mcfg, sp, B, P, stats) / peak_flops if peak_flops else 0.0
    by = M.sampler_bytes(mcfg, sp, B, P, stats) / bandwidth if bandwidth else 0.0
    floor = (f"{max(fl, by):.3g} ({'FLOPs' if fl >= by else 'bytes'}) | "
             f"{secs / max(fl, by):.1f}" if max(fl, by) > 0 else "— | —")
    tpf = copsd.tokens_per_forward(states[:, :, P:], stats["forwards"], sp.block_length,
                                   mcfg.mask_token_id)
    return (f"{B * sp.gen_length / secs:.1f} | {tpf:.2f} | {secs:.3g} | {floor} | "
            f"{peak:.2f}")


@torch.no_grad()
def bench_sampler(model, mcfg, cfg, dev):
    """The sampler alone, greedy on random prompts of --bench_prompt_len at
    --train_tokens_per_step, for each of SETTINGS and each batch of --bench_batches, after a
    warm-up call of one block."""
    g = torch.Generator().manual_seed(cfg.seed)
    vocab, P = min(mcfg.vocab_size, mcfg.mask_token_id), cfg.bench_prompt_len
    n_blocks = cfg.gen_length // cfg.block_length
    model.eval()
    lines = []
    with T.gathered(model, True):
        for cache, graph, threshold, refresh in SETTINGS:
            sp = replace(T.rollout_sampler(cfg, mcfg), temperature=0.0, cache=cache,
                         cuda_graph=graph, threshold=threshold, refresh=refresh)
            warm = replace(sp, gen_length=cfg.block_length, steps=sp.steps // n_blocks)
            copsd.generate(model, torch.randint(0, vocab, (1, P), generator=g).to(dev), None,
                           mcfg.mask_token_id, warm)
            for B in cfg.bench_batches:
                prompt = torch.randint(0, vocab, (B, P), generator=g).to(dev)
                lines.append(f"| {cache} | {'yes' if graph else 'no'} | {threshold or '—'} | "
                             f"{refresh or '—'} | {B} | "
                             + time_generate(model, mcfg, sp, prompt, cfg, dev) + " |")
    if dist.get_rank() == 0:
        print(f"\nsampler: prompt {P}, gen {cfg.gen_length}, block {cfg.block_length}, "
              f"{cfg.train_tokens_per_step} tokens/step, greedy\n| cache | CUDA graph | threshold "
              "| refresh | B | tokens/s | TPF | s | floor s | measured / floor | peak GiB over "
              "weights |\n|---|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(lines))


@torch.no_grad()
def bench_eval(model, mcfg, cfg, dev):
    """Each column of one evaluation call (train_llada.eval_samplers: the fixed tokens-per-step
    columns and the --eval_threshold grid), timed on --eval_batch random prompts. On random
    weights no prediction is confident: every threshold decodes one token per forward."""
    g = torch.Generator().manual_seed(cfg.seed)
    vocab, P = min(mcfg.vocab_size, mcfg.mask_token_id), cfg.bench_prompt_len
    prompt = torch.randint(0, vocab, (cfg.eval_batch, P), generator=g).to(dev)
    model.eval()
    lines = []
    with T.gathered(model, True):
        for name, sp in T.eval_samplers(cfg, mcfg).items():
            copsd.generate(model, prompt[:1], None, mcfg.mask_token_id,  # warm-up: one block
                           replace(sp, gen_length=sp.block_length, steps=sp.steps // sp.n_blocks))
            lines.append(f"| {name} | " + time_generate(model, mcfg, sp, prompt, cfg, dev) + " |")
    if dist.get_rank() == 0:
        print(f"\nevaluation columns: prompt {P}, gen {cfg.gen_length}, block {cfg.block_length}, "
              f"cache {cfg.eval_cache}, batch {cfg.eval_batch}\n| column | tokens/s | TPF | s | "
              "floor s | measured / floor | peak GiB over weights |\n|---|---|---|---|---|---|---|")
        print("\n".join(lines))


def bench(cfg, dev, mesh):
    """The timed steps, their table, then the sampler's."""
    T.check(cfg, dist.get_world_size(), prompts=False)
    src = None if cfg.random_init else T.resolve_model_dir(cfg.model_dir)
    model, mcfg = T.build_model(cfg, src, dev, mesh)
    rows = bench_rows(cfg, mcfg)
    opt = T.start_run(cfg, model, rows)
    records = T.train(cfg, model, mcfg, rows, opt, T.rollout_sampler(cfg, mcfg), dev, window=1)
    bench_table(records, cfg, dev)
    if cfg.bench_sampler:
        bench_sampler(model, mcfg, cfg, dev)
    if cfg.bench_eval:
        bench_eval(model, mcfg, cfg, dev)


def main(argv=None):
    return T.launch(copsd.parse_config(BenchConfig, argv, description=__doc__), bench)


if __name__ == "__main__":
    sys.exit(main())
