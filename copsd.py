"""
Calibrated On-Policy Self-Distillation (COPSD) for masked diffusion LMs, in the paper's order.

The same functions train a 0.18M-parameter Sudoku model on a CPU (sudoku.py) and LLaDA-8B under
FSDP2 (train_llada.py). A batch of sequences is laid out as

    seq  (N, P + L)   the prompt x, left-padded to width P, then the response y of length L
    attn (N, P + L)   False at the prompt's padding (a key-padding mask); None: no padding
    M                 the mask token id

and a response position i is column P + i. `t` is the mask ratio t/T in [0, 1] (continuous
time). With K responses per prompt, rows are prompt-major: prompt p's responses are rows
p*K .. p*K + K - 1 (`per_prompt`). Log-probabilities, ratios and distances are float32.
"""

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

# ----------------------------------------------------------------------------------------------
# layouts


def per_prompt(x, K):
    """Each row repeated K times, prompt-major: (B, ...) -> (B*K, ...). None stays None."""
    return None if x is None else repeat(x, "b ... -> (b k) ...", k=K)


def stacked(x, n):
    """n copies of the batch stacked as one: (B, ...) -> (n*B, ...), copy-major (two views of one
    batch, or the steps of a trajectory). None stays None."""
    return None if x is None else repeat(x, "b ... -> (n b) ...", n=n)


def pick(logp, y):
    """logp[..., y]: the log-probability of each position's token y (...,)."""
    return logp.gather(-1, y[..., None]).squeeze(-1)


@dataclass
class Rollout:
    """What every loss trains on: a batch of sequences (the model's own samples, or ground truth
    for SFT), and what the method cached when it drew them. Slicing takes rows."""
    seq: torch.Tensor  # (N, P + L)
    attn: torch.Tensor | None  # (N, P + L), or None: no padding
    P: int  # prompt width
    states: torch.Tensor | None = None  # (N, T + 1, P + L): the decoding trajectory
    # COPSD's numbers under the old weights θ' (Eq. 7-10), (N, L) each
    mask_t: torch.Tensor | None = None  # the early view y_t
    mask_ts: torch.Tensor | None = None  # the later view y_{t-s} (nested in y_t)
    old_logp: torch.Tensor | None = None  # l' = log p_θ'(y | y_t)
    d: torch.Tensor | None = None  # (p̃_θ'(y | y_{t-s}) - p_θ'(y | y_t))^2
    A: torch.Tensor | None = None  # the normalised calibration term of Eq. 10
    target_logp: torch.Tensor | None = None  # (N, L, V or k): the exact / later readings' target
    target_idx: torch.Tensor | None = None  # (N, L, k): its token ids, when a top-k

    def __getitem__(self, rows):
        return replace(self, **{f.name: getattr(self, f.name)[rows] for f in fields(self)
                                if torch.is_tensor(getattr(self, f.name))})

    def __len__(self):
        return self.seq.shape[0]


def with_response(prompt_attn, L):
    """The key-padding mask of [prompt; response]: the response is never padding."""
    if prompt_attn is None:
        return None
    ones = prompt_attn.new_ones(len(prompt_attn), L, dtype=torch.bool)
    return torch.cat([prompt_attn.bool(), ones], 1)


def answers_rollout(prompt, prompt_attn, answers, K=1):
    """Ground-truth responses (SFT) as a Rollout, K rows per prompt like the sampled ones."""
    seq = torch.cat([prompt, answers], 1)
    return Rollout(per_prompt(seq, K), per_prompt(with_response(prompt_attn, answers.shape[1]), K),
                   prompt.shape[1])


# ----------------------------------------------------------------------------------------------
# Sec. 3: the forward process q_{t|0}


def nested_masks(shape, t, s=0.0, generator=None, device=None):
    """Forward process q_{t|0} (Sec. 3) for two views of one trajectory (Alg. 2, lines 3-4).

    One uniform u_i per response position: masked early where u_i < t, later where u_i < t - s.
    Every token masked late is masked early too, so y_{t-s} is a later state of the same decoding
    trajectory as y_t. `t`, `s`: floats or (B,) tensors. Returns (mask_t, mask_ts), bool (B, L)."""
    u = torch.rand(shape, generator=generator, device=device)
    t = torch.as_tensor(t, dtype=u.dtype, device=u.device).reshape(-1, 1)
    s = torch.as_tensor(s, dtype=u.dtype, device=u.device).reshape(-1, 1)
    return u < t, u < t - s


def apply_mask(seq, P, mask, mask_id):
    """seq with the response positions where `mask` is True replaced by M; the prompt untouched."""
    out = seq.clone()
    out[:, P:] = torch.where(mask, mask_id, seq[:, P:])
    return out


def token_logprobs(model, seq, attn, P, y):
    """log p_θ(y_i | seq) at every response position, float32 (N, L). Cross-entropy fuses the
    log-softmax and the gather, so the (N, L, V) log-probabilities are never kept."""
    logits = model(seq, attn, start=P)
    return -F.cross_entropy(rearrange(logits, "n l v -> (n l) v"), y.flatten(),
                            reduction="none").view(y.shape)


# ----------------------------------------------------------------------------------------------
# Eq. 2-4: the MDM / SFT loss, and naive self-distillation (Alg. 1)


def mdm_loss(model, ro, mask_id, eps=1e-3, generator=None, t=None):
    """LLaDA's MDM loss (Eq. 2-3): t ~ U(eps, 1) per row (or the rows' given t), each response
    token masked with probability t, cross-entropy on the masked positions weighted by 1/t,
    averaged over the response tokens. On ground truth it is SFT; on the model's own samples
    y ~ p_θ0(.|x) it is naive self-distillation (Eq. 4, Alg. 1, "Base-Self"). Returns
    (loss, stats)."""
    seq, P = ro.seq, ro.P
    N, L = seq.shape[0], seq.shape[1] - P
    if t is None:
        t = (1 - eps) * torch.rand(N, generator=generator, device=seq.device) + eps
    masked, _ = nested_masks((N, L), t, generator=generator, device=seq.device)
    logp = token_logprobs(model, apply_mask(seq, P, masked, mask_id), ro.attn, P, seq[:, P:])
    return -(logp * masked / t[:, None]).sum() / (N * L), {}


# ----------------------------------------------------------------------------------------------
# Eq. 1: the sampler (LLaDA's `generate`)


@dataclass(frozen=True)
class Sampler:
    """The sampler's options. n = gen_length / steps tokens per step ("# Tokens" in Table 1):
    Sampler(...).at(n). LLaDA's: steps over all blocks, greedy (temperature 0) or Gumbel-max,
    remasking by confidence or at random, cfg_scale (classifier-free guidance against the
    prompt masked), logits_eos_inf (never predict EOS), confidence_eos_eot_inf (EOS and EOT
    predictions rank last; LLaDA's code does this to EOT only at temperature > 0).
    confidence_dtype: the softmax's precision (LLaDA ranks a bf16 softmax, with ties; float64
    has none). Fast-dLLM's: cache "prefix" / "dual" (approximate K/V reuse within a block; see
    step_forward), refresh (also the full forward every r-th step of a block), threshold
    (unmask every position at least this confident; tokens per step is then a result), and
    cuda_graph (dual's block steps replay one captured graph, on a GPU)."""
    gen_length: int = 256
    block_length: int = 32
    steps: int = 128
    temperature: float = 0.0
    remasking: str = "low_confidence"
    cache: str = "none"
    refresh: int = 0
    threshold: float | None = None
    cfg_scale: float = 0.0
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    eos_id: int = 126081
    eot_id: int = 126348
    confidence_dtype: torch.dtype = torch.float64
    cuda_graph: bool = False

    def __post_init__(self):
        problems = [
            (self.gen_length < 1 or self.block_length < 1 or self.gen_length % self.block_length,
             f"gen_length={self.gen_length} is not a positive multiple of "
             f"block_length={self.block_length}"),
            (self.block_length > 0 and (self.steps < self.n_blocks or self.steps % self.n_blocks),
             f"steps={self.steps} must be a positive multiple of the number of blocks "
             f"({self.n_blocks})"),
            (self.remasking not in ("low_confidence", "random"),
             f"remasking must be 'low_confidence' or 'random', not {self.remasking!r}"),
            (self.cache not in ("none", "prefix", "dual"),
             f"cache must be 'none', 'prefix' or 'dual', not {self.cache!r}"),
            (self.refresh < 0,
             f"refresh must be >= 0 (0: refresh at each block's start only), not {self.refresh}"),
            (self.threshold is not None and not 0 < self.threshold <= 1,
             f"threshold must be in (0, 1], not {self.threshold}")]
        for bad, message in problems:
            if bad:
                raise ValueError(message)

    @property
    def n_blocks(self):
        return self.gen_length // max(self.block_length, 1)

    @property
    def tokens_per_step(self):
        return self.gen_length / self.steps

    def at(self, tokens_per_step):
        """The same sampler decoding n tokens per step (n divides the block length)."""
        n = tokens_per_step
        if n < 1 or self.block_length % n:
            raise ValueError(f"{n} tokens per step does not divide the block length "
                             f"{self.block_length}")
        return replace(self, steps=self.gen_length // n)


def add_gumbel_noise(logits, temperature, generator=None):
    """LLaDA's Gumbel-max in float64: argmax of exp(logits) / (-log u)^τ samples
    softmax(logits / τ); τ = 0 is plain argmax. float64: low-precision Gumbel noise lowers
    sample quality."""
    if temperature == 0:
        return logits
    logits = logits.double()
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    return logits.exp() / (-torch.log(u)) ** temperature


def num_transfer_tokens(n_masked, steps):
    """How many tokens each of `steps` steps unmasks: the block's masked count spread evenly, the
    remainder to the first steps (LLaDA's get_num_transfer_tokens). (B,) -> (B, steps)."""
    base, rem = n_masked // steps, n_masked % steps
    return base[:, None] + (torch.arange(steps, device=n_masked.device) < rem[:, None]).long()


def top_k_mask(scores, k, k_max=None):
    """Bool mask of each row's k[row] highest scores (batched: the top k_max = max(k), each row
    keeping its first k[row]). Giving k_max spares a device-to-host sync."""
    top = scores.topk(int(k.max()) if k_max is None else k_max, dim=-1).indices
    keep = torch.arange(top.shape[-1], device=scores.device) < k[:, None]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, keep)


@torch.no_grad()
def generate(model, prompt, prompt_attn, mask_id, sampler=None, *, generator=None, record=False,
             stats=None, **options):
    """LLaDA's sampler: the reverse process of Eq. 1 (options: Sampler; keyword `options`
    override its fields).

    Start from an all-M response; decode it block by block, left to right, steps / n_blocks
    steps each. A step predicts the masked positions, scores them by the probability of their
    prediction (or at random), and unmasks the top k, k spreading the block's masked count
    evenly over its steps (or, with a threshold, every position confident enough). As LLaDA's
    generate, the candidates are the block's masked positions and any left masked before it
    (where the model predicted M itself). prompt (B, P) left-padded, prompt_attn (B, P) False
    at padding (or None). Returns seq (B, P + gen_length); with record=True also the trajectory
    (B, T + 1, P + gen_length): the all-M start and the state after each of the T steps.
    stats, a dict, receives "forwards": the model calls of each block, and "full": those of
    them over the whole sequence."""
    sp = replace(sampler or Sampler(), **options)
    B, P = prompt.shape
    x = torch.cat([prompt, prompt.new_full((B, sp.gen_length), mask_id)], 1)
    forward = step_forward(model, sp, with_response(prompt_attn, sp.gen_length), P, mask_id)
    states, forwards, fulls = [x.clone()] if record else None, [], []
    for lo in range(P, P + sp.gen_length, sp.block_length):
        hi = lo + sp.block_length
        schedule = num_transfer_tokens((x[:, lo:hi] == mask_id).sum(1), sp.steps // sp.n_blocks)
        # read on the host once per block, so that no step waits for the device
        k_max = schedule.max(0).values.tolist()
        earlier = bool((x[:, P:lo] == mask_id).any())  # positions left masked before the block
        i = n_full = 0
        while (i < len(k_max) if sp.threshold is None else
               i < sp.block_length and (x[:, lo:hi] == mask_id).any()):
            full = sp.cache == "none" or i == 0 or (sp.refresh > 0 and i % sp.refresh == 0)
            c_lo = P if full and earlier else lo  # the candidates: positions c_lo..hi
            x0, conf = predict(forward(x, full, c_lo, lo, hi), sp, generator)
            span = x[:, c_lo:hi]
            masked = span == mask_id
            k = (schedule[:, i], k_max[i]) if sp.threshold is None else (None, None)
            transfer = to_unmask(conf.masked_fill(~masked, -torch.inf), sp.threshold, *k)
            x[:, c_lo:hi] = torch.where(transfer & masked, x0, span)
            i, n_full = i + 1, n_full + full
            if record:
                states.append(x.clone())
        forwards.append(i)
        fulls.append(n_full)
    if stats is not None:
        stats.update(forwards=forwards, full=fulls)
    return (x, torch.stack(states, 1)) if record else x


def step_forward(model, sp, attn, P, mask_id):
    """The model call of a sampler step, as forward(x, full, c_lo, lo, hi) -> logits at
    positions c_lo..hi of the current block lo..hi. cache="none": the whole sequence every step.
    With a cache (Fast-dLLM) a full step (the block's first, and every refresh-th) runs the
    whole sequence and stores every layer's K/V; the block's other steps recompute only the
    block and what follows it (prefix) or the block alone (dual), attending to the cached rest
    (which goes stale as the block fills in: an approximation). cfg_scale > 0 adds the
    unconditional rows (the prompt masked) and mixes the two."""
    kv = None if sp.cache == "none" else {}
    attn = stacked(attn, 2) if sp.cfg_scale > 0 else attn
    graph = None

    def forward(x, full, c_lo, lo, hi):
        nonlocal graph
        S = x.shape[1]
        inp = x if sp.cfg_scale == 0 else torch.cat([x, unconditional(x, P, mask_id)])
        if kv is None:
            logits = model(inp, attn, start=c_lo, end=hi)
        elif full or not sp.cuda_graph or x.device.type != "cuda":
            w_lo, w_hi = (0, S) if full else (lo, S if sp.cache == "prefix" else hi)
            logits = model(inp[:, w_lo:w_hi], attn, start=c_lo - w_lo, end=hi - w_lo,
                           cache=kv, pos=w_lo)
        else:  # dual's window has one shape in every block: one CUDA graph replays them all
            graph = graph or graphed(model, inp[:, lo:hi], attn, kv, lo)
            logits = graph(inp[:, lo:hi], lo)
        if sp.cfg_scale > 0:
            cond, uncond = logits.chunk(2)
            logits = uncond + (sp.cfg_scale + 1) * (cond - uncond)
        return logits
    return forward


def unconditional(x, P, mask_id):
    """x with its prompt masked: classifier-free guidance's unconditional input."""
    out = x.clone()
    out[:, :P] = mask_id
    return out


def predict(logits, sp, generator=None):
    """A step's prediction at each position (argmax, or Gumbel-max at sp.temperature) and its
    score for remasking: the softmax probability of the prediction, or a uniform draw."""
    if sp.logits_eos_inf:
        logits[..., sp.eos_id] = -torch.inf
    x0 = add_gumbel_noise(logits, sp.temperature, generator).argmax(-1)
    if sp.remasking == "random":
        return x0, torch.rand(x0.shape, generator=generator, device=x0.device,
                              dtype=torch.float64)
    if sp.confidence_eos_eot_inf:
        special = torch.tensor([sp.eos_id, sp.eot_id], device=logits.device)
        logits = logits.index_fill(-1, special, -torch.inf)
    return x0, pick(F.softmax(logits.to(sp.confidence_dtype), -1), x0)


def to_unmask(conf, threshold=None, k=None, k_max=None):
    """Which positions a step decodes (conf is -inf where already decoded): each row's k most
    confident (LLaDA), or with a threshold every position at least that confident and at least
    the most confident one (Fast-dLLM's parallel decoding)."""
    if threshold is None:
        return top_k_mask(conf, k, k_max)
    one = torch.ones(len(conf), dtype=torch.long, device=conf.device)
    return top_k_mask(conf, one, 1) | (conf >= threshold)


def decode_counts(states, forwards, block_length, mask_id):
    """Per row of a response's trajectory (B, T + 1, L), decoded block by block with
    forwards[b] model calls in block b (generate's stats): the tokens it decoded and the calls
    it needed, those made while its own block was still masked (alone it would stop there; in a
    batch it waits for the block's slowest row, which should not lower its tokens per forward)."""
    masked, dev = states == mask_id, states.device
    block = torch.arange(len(forwards), device=dev).repeat_interleave(
        torch.tensor(forwards, device=dev))  # each step's block
    open_blocks = masked[:, :-1].unflatten(-1, (-1, block_length)).any(-1)  # (B, T, blocks)
    needed = open_blocks[:, torch.arange(len(block), device=dev), block].sum(1)
    return masked[:, 0].sum(1) - masked[:, -1].sum(1), needed


def tokens_per_forward(states, forwards, block_length, mask_id):
    """TPF of a batch's decoding (decode_counts' arguments): its tokens over the model calls
    its rows needed, both summed over rows."""
    tokens, calls = decode_counts(states, forwards, block_length, mask_id)
    return float(tokens.sum() / calls.sum().clamp(min=1))


def aup_curve(columns, key):
    """The accuracy-parallelism curve of an evaluation {column: scores with tpf}: the
    1 token/step column (sequential decoding, where the curve starts) and every threshold column
    ("τ=..."), as (tokens per forward, accuracy in %). The other fixed-count columns are left
    out: the curve is the threshold sampler's, as d3LLM's leaderboard draws it."""
    return [(v["tpf"], 100 * v[key]) for n, v in columns.items() if n == "1" or n[:2] == "τ="]


def aup(points, y_max=None, alpha=3.0, max_drop=5.0):
    """AUP, accuracy under parallelism (d3LLM's leaderboard): one number for a curve of
    (tokens per forward ρ, accuracy y in %) points. Sorted by ρ, points more than max_drop below
    the first's accuracy are left out; then AUP = ρ_1 y_1 + the trapezoid integral of
    y W(y) over ρ from ρ_1 to the last point, W(y) = min(1, exp(-alpha (1 - y / y_max))), y_max
    the best accuracy of any method on the task (default: this curve's). A method that keeps its
    accuracy while decoding more tokens per forward scores more; accuracy lost is penalised."""
    pts = sorted(points)
    pts = [(r, y) for r, y in pts if y >= pts[0][1] - max_drop]
    y_max = max(y for _, y in pts) if y_max is None else y_max
    if y_max <= 0:  # nothing right anywhere: no area (and W would divide by zero)
        return 0.0
    yw = [y * min(1.0, math.exp(-alpha * (1 - y / y_max))) for _, y in pts]
    area = pts[0][0] * pts[0][1]  # the first point's rectangle, unweighted
    for (r0, _), (r1, _), w0, w1 in zip(pts, pts[1:], yw, yw[1:]):
        area += 0.5 * (r1 - r0) * (w0 + w1)
    return area


def graphed(model, inp, attn, kv, lo):
    """model(window, attn, cache=kv, pos=its positions) captured as a CUDA graph: the returned
    step(window, lo) copies the window's tokens and positions into the captured inputs and
    replays the graph (its output tensor is overwritten by the next replay)."""
    static_inp = inp.clone()
    static_pos = torch.arange(lo, lo + inp.shape[1], device=inp.device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # capture wants one warm-up call off the default stream
        model(static_inp, attn, cache=kv, pos=static_pos)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(static_inp, attn, cache=kv, pos=static_pos)

    def step(window, lo):
        static_inp.copy_(window)
        static_pos.copy_(torch.arange(lo, lo + window.shape[1], device=window.device))
        graph.replay()
        return out
    return step


def rollout(model, prompt, prompt_attn, mask_id, sampler, K=1, record=False, generator=None,
            stats=None):
    """K of the model's own responses per prompt (Alg. 1, line 2), rows prompt-major; with
    record=True the decoding trajectories too (d-OPSD's and OPDLM's supervision)."""
    prompt, prompt_attn = per_prompt(prompt, K), per_prompt(prompt_attn, K)
    out = generate(model, prompt, prompt_attn, mask_id, sampler, generator=generator,
                   record=record, stats=stats)
    seq, states = out if record else (out, None)
    return Rollout(seq, with_response(prompt_attn, sampler.gen_length), prompt.shape[1], states)


# ----------------------------------------------------------------------------------------------
# Sec. 4: COPSD


def kd_divergence(logp_s, logp_t, beta=0.0, top_k=None):
    """Generalised Jensen-Shannon divergence of student and teacher log-probs (..., V), summed
    over the vocabulary, float32: beta = 0 forward KL(teacher || student), beta = 1 reverse
    KL(student || teacher), in between JSD_beta with mixture (1 - beta) p_s + beta p_t.
    top_k: only the teacher's top-k tokens, both distributions renormalised over them."""
    logp_s, logp_t = logp_s.float(), logp_t.float()
    if top_k is not None and top_k < logp_t.shape[-1]:
        idx = logp_t.topk(top_k, dim=-1).indices
        logp_s = F.log_softmax(logp_s.gather(-1, idx), -1)
        logp_t = F.log_softmax(logp_t.gather(-1, idx), -1)

    def kl(a, b):  # KL(a || b) from log-probs
        return (a.exp() * (a - b)).sum(-1)

    if beta == 0:
        return kl(logp_t, logp_s)
    if beta == 1:
        return kl(logp_s, logp_t)
    b = torch.tensor(beta, dtype=logp_s.dtype, device=logp_s.device)
    log_m = torch.logsumexp(torch.stack([logp_s + torch.log1p(-b), logp_t + torch.log(b)]), 0)
    return beta * kl(logp_t, log_m) + (1 - beta) * kl(logp_s, log_m)


def distance(logp_later, logp_early):
    """Eq. 5's squared difference of the later and early views' probabilities of the same token
    value, (p̃(v) - p(v))^2 = -b(v), from log-probabilities (of one token, or of each value)."""
    return (logp_later.exp() - logp_early.exp()) ** 2


@torch.no_grad()
def calibration(model, ro, mask_t, mask_ts, mask_id, keep_z=False, objective="paper",
                top_k=None):
    """Eq. 5's calibration term, with the old weights θ' (Eq. 7-9). For response k, position i
    and its token y = y^{k,i}:

        l'_{k,i} = log p_θ'(y | y_t)                       the ratio's denominator
        d_{k,i}  = (p̃_θ'(y | y_{t-s}) - p_θ'(y | y_t))^2   b = -d: Eq. 5's term at value y

    b is per token value: as a distance between whole distributions it would not depend on v,
    Z would cancel and Eq. 5 would be p_θ itself. keep_z ("COPSD with Z", Table 4) also gives
    log Z_i = log Σ_v p_θ'(v | y_t) exp(-(p̃(v) - p(v))^2). The readings that need whole
    distributions cache one as target_logp (over the vocabulary, or its top_k, target_idx):
    "exact" Eq. 5's calibrated q ∝ p_θ' exp(-d(v)), "later" the later view p̃. The two views
    run as one batch. Returns a dict of (N, L) tensors (target_logp: (N, L, V or top_k))."""
    seq, P = ro.seq, ro.P
    views = torch.cat([apply_mask(seq, P, mask_t, mask_id), apply_mask(seq, P, mask_ts, mask_id)])
    logits = model(views, stacked(ro.attn, 2), start=P)
    logp_t, logp_ts = rearrange(F.log_softmax(logits, -1), "(v n) l V -> v n l V", v=2)
    old_logp = pick(logp_t, seq[:, P:])
    out = dict(old_logp=old_logp, d=distance(pick(logp_ts, seq[:, P:]), old_logp))
    if keep_z:
        out["log_z"] = torch.logsumexp(logp_t - distance(logp_ts, logp_t), dim=-1)
    if objective in ("exact", "later"):
        ranked = logp_t if objective == "exact" else logp_ts
        idx = None if top_k is None else ranked.topk(top_k, dim=-1).indices
        lp, lp_s = ((logp_t, logp_ts) if idx is None else
                    (logp_t.gather(-1, idx), logp_ts.gather(-1, idx)))
        target = lp - distance(lp_s, lp) if objective == "exact" else lp_s
        out.update(target_logp=F.log_softmax(target, -1), target_idx=idx)
    return out


def group_normalize(b, K, eps=1e-6):
    """Group relative normalisation, Eq. 10: A = (b - mean_k b) / (std_k b + eps) over the K
    responses of one prompt at the same position (std unbiased, as GRPO implementations)."""
    if K < 2:
        raise ValueError("group normalisation needs K >= 2 responses per prompt "
                         "(or no group normalisation)")
    g = rearrange(b, "(p k) l -> p k l", k=K)
    g = (g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)
    return rearrange(g, "p k l -> (p k) l")


@torch.no_grad()
def copsd_rollout(model, prompt, prompt_attn, mask_id, sampler, *, K=4, t=0.9, s=0.5,
                  random_s=False, keep_z=False, group_norm=True, objective="paper", top_k=None,
                  generator=None, stats=None):
    """COPSD's on-policy data (Eq. 7-10, Alg. 2 lines 2-4), drawn with the current weights θ'.

    K responses per prompt at temperature τ > 0, one nested mask pattern (y_t, y_{t-s}) per
    prompt shared by its K responses, and the θ' numbers cached: l', d and A. No copy of the
    weights is kept; θ' lives on only through these numbers, as GRPO caches old log-probs.
    random_s: COPSD-Random, s ~ U(0, t) per prompt; keep_z: A from d + log Z; group_norm=False:
    A = d; objective: the loss's reading (copsd_loss), whose target it caches. Returns a
    Rollout."""
    ro = rollout(model, prompt, prompt_attn, mask_id, sampler, K, generator=generator,
                 stats=stats)
    B, L = prompt.shape[0], ro.seq.shape[1] - ro.P
    if random_s:
        s = t * torch.rand(B, generator=generator, device=prompt.device)
    mask_t, mask_ts = nested_masks((B, L), t, s, generator=generator, device=prompt.device)
    mask_t, mask_ts = per_prompt(mask_t, K), per_prompt(mask_ts, K)
    cal = calibration(model, ro, mask_t, mask_ts, mask_id, keep_z, objective, top_k)
    b = cal["d"] + cal.pop("log_z") if keep_z else cal["d"]
    A = group_normalize(b, K) if group_norm else b
    return replace(ro, mask_t=mask_t, mask_ts=mask_ts, A=A, **cal)


def copsd_loss(model, ro, mask_id, objective="paper", direction="reverse", generator=None):
    """The COPSD loss, Eq. 11-12, in one of four readings of Eq. 6, averaged over (prompt, k,
    i masked in y_{t-s}): only there do both views predict the token, one with more context.
    With l = log p_θ(y^{k,i} | y_t^k) (with gradient) and r = exp(l - l'):

      paper   r (log r + A), through autograd: gradient r (1 + log r + A) ∇l. The "+1" has zero
              mean only for tokens drawn from p_θ'(.|y_t); a decoded response's are not, so it
              lowers the model's own tokens every step.
      score   r (log r + A) - r: the same objective, its score-function gradient r (log r + A) ∇l.
      exact   Eq. 6 over the vocabulary: KL(p_θ(.|y_t) || q), q ∝ p_θ' exp(-d(v)), d(v) =
              (p̃(v) - p_θ'(v))^2 (= Σ_v p [log p - log p_θ' + d] + log Z). It lowers a token
              the later view is surer of, unless it is already the likeliest.
      later   Sec. 4.1's intuition taken directly: KL(p_θ(.|y_t) || p̃_θ'(.|y_{t-s})), or with
              direction="forward" KL(p̃ || p_θ), distillation of the later view.

    Z is dropped (Sec. 4.2). (No randomness: the generator is unused.) Returns (loss, stats),
    stats["d"] the mean distance over the same positions (Figure 2)."""
    seq, P, m = ro.seq, ro.P, ro.mask_ts
    early = apply_mask(seq, P, ro.mask_t, mask_id)
    if objective in ("paper", "score"):
        log_r = token_logprobs(model, early, ro.attn, P, seq[:, P:]) - ro.old_logp
        per_token = log_r.exp() * (log_r + ro.A) - (log_r.exp() if objective == "score" else 0)
    elif objective in ("exact", "later"):
        logp = F.log_softmax(model(early, ro.attn, start=P), -1)
        if ro.target_idx is not None:  # the cached top-k: both renormalised over it
            logp = F.log_softmax(logp.gather(-1, ro.target_idx), -1)
        beta = 0.0 if objective == "later" and direction == "forward" else 1.0
        per_token = kd_divergence(logp, ro.target_logp, beta)
    else:
        raise ValueError(f"objective must be paper, score, exact or later, not {objective!r}")
    n = m.sum().clamp(min=1)
    loss = (per_token * m).sum() / n
    return loss, dict(d=((ro.d * m).sum() / n).item(), n_tokens=int(m.sum()))


# ----------------------------------------------------------------------------------------------
# Related methods (comparison rows): each one loss on the same model, sampler and Rollout as
# COPSD. Where their papers are silent, the choice is a keyword argument (README: what each
# source says).


def selfusion_direction(logp_hard, logp_easy, y, both_correct="easy"):
    """SelFusion's distillation direction per token: a mode is correct where its argmax is y.
    Only the easy mode correct: easy teaches hard; only the hard mode correct: hard teaches easy
    (the easy mode can be confidently wrong). Both correct: `both_correct` teaches ("easy",
    "hard" or "none"); both wrong: nobody. Returns bool (easy_teaches, hard_teaches), (N, L)."""
    if both_correct not in ("easy", "hard", "none"):
        raise ValueError(f"both_correct must be 'easy', 'hard' or 'none', not {both_correct!r}")
    ok_h, ok_e = logp_hard.argmax(-1) == y, logp_easy.argmax(-1) == y
    both = ok_h & ok_e
    return ((ok_e & ~ok_h) | (both & (both_correct == "easy")),
            (ok_h & ~ok_e) | (both & (both_correct == "hard")))


def selfusion_loss(model, ro, mask_id, targets=None, t_hard=None, t_easy=None, kd_weight=1.0,
                   beta=0.0, both_correct="easy", eps=1e-3, generator=None):
    """SelFusion: one response at two nested masking levels (hard t_hard ~ U(eps, 1), easy
    t_easy = t_hard / 2), the MDM loss on the hard view, plus KD between the views at the
    positions masked in both, its direction chosen per token by correctness
    (selfusion_direction); the teacher's side is detached. `targets` (N, L): what counts as
    correct and what the MDM term trains toward; default the rollout's own response (no
    demonstrations, as COPSD). kd_weight = 0 is exactly mdm_loss. Returns (loss, stats)."""
    seq, P = ro.seq, ro.P
    N, L = seq.shape[0], seq.shape[1] - P
    y = seq[:, P:] if targets is None else targets
    if t_hard is None:
        t_hard = (1 - eps) * torch.rand(N, generator=generator, device=seq.device) + eps
    t_hard = torch.as_tensor(t_hard, dtype=torch.float32, device=seq.device).expand(N)
    t_easy = (t_hard / 2 if t_easy is None
              else torch.as_tensor(t_easy, device=seq.device).clamp(max=t_hard))
    hard, easy = nested_masks((N, L), t_hard, t_hard - t_easy, generator, seq.device)
    views = torch.cat([apply_mask(seq, P, hard, mask_id), apply_mask(seq, P, easy, mask_id)])
    logits = model(views, stacked(ro.attn, 2), start=P)
    logp_h, logp_e = rearrange(F.log_softmax(logits, -1), "(v n) l V -> v n l V", v=2)
    mdm = -(pick(logp_h, y) * hard / t_hard[:, None]).sum() / (N * L)
    easy_teaches, hard_teaches = selfusion_direction(logp_h, logp_e, y, both_correct)
    kd = (kd_divergence(logp_h, logp_e.detach(), beta) * (easy_teaches & easy)
          + kd_divergence(logp_e, logp_h.detach(), beta) * (hard_teaches & easy))
    n = easy.sum().clamp(min=1)
    kd = kd.sum() / n
    return mdm + kd_weight * kd, dict(mdm=mdm.item(), kd=kd.item(), n_tokens=int(easy.sum()),
                                      easy_teaches=((easy_teaches & easy).sum() / n).item(),
                                      hard_teaches=((hard_teaches & easy).sum() / n).item())


def dopsd_teacher_view(x_in, x_out, y, P, mask_id, answer_mask=None, retain_ratio=0.25,
                       block_length=None, suffix=False, generator=None):
    """d-OPSD's teacher input: the student's state x_in with `retain_ratio` of its self-future
    (positions still masked after this step, x_out) filled in from its own final answer y,
    restricted to `answer_mask` (N, L) and, with `block_length`, to the blocks after the one
    being decoded. suffix=True appends the revealed answer after the response instead (the
    literal "suffix"). Rows are (step, prompt). Returns (teacher input, revealed (N, L))."""
    x, L = x_in[:, P:], y.shape[1]
    cand = x_out[:, P:] == mask_id
    if answer_mask is not None:
        cand &= answer_mask
    if block_length is not None:  # the current block holds the first masked position
        later = ((x == mask_id).float().argmax(1) // block_length + 1) * block_length
        cand &= torch.arange(L, device=x.device) >= later[:, None]
    u = torch.rand(cand.shape, generator=generator, device=x.device).masked_fill(~cand, 2.0)
    rank = u.argsort(1).argsort(1)  # a random order of the candidates, first
    reveal = rank < (cand.sum(1, keepdim=True) * retain_ratio).floor()
    if suffix:
        return torch.cat([x_in, torch.where(reveal, y, mask_id)], 1), reveal
    return torch.cat([x_in[:, :P], torch.where(reveal, y, x)], 1), reveal


def dopsd_loss(model, ro, mask_id, answer_mask=None, *, retain_ratio=0.25, select="teacher",
               beta=1.0, top_k=20, token_clip=None, block_length=None, n_steps=None, weight=None,
               teacher=None, suffix=False, generator=None):
    """d-OPSD: step-level self-distillation along the student's own trajectory ro.states. At
    each step the student sees its state, the teacher (the same model without gradient, or a
    frozen `teacher`) the state with part of the self-future revealed (dopsd_teacher_view); the
    divergence (kd_divergence: beta, top_k) is taken at as many positions as the step decoded:
    those the teacher is most sure of in the current block (select="teacher") or those decoded
    (select="student"). n_steps: a random subset of the steps; weight (N,): per-response gate
    (e.g. correct generations only); token_clip caps each position's divergence.
    Returns (loss, stats)."""
    seq, P, S = ro.seq, ro.P, ro.states
    T, N, L = S.shape[1] - 1, seq.shape[0], seq.shape[1] - P
    steps = (torch.arange(T, device=seq.device) if n_steps is None else
             torch.randperm(T, generator=generator, device=seq.device)[:n_steps])
    n = len(steps)
    x_in = rearrange(S[:, steps], "b t s -> (t b) s")  # rows (step, prompt)
    x_out = rearrange(S[:, steps + 1], "b t s -> (t b) s")
    y, am = stacked(seq[:, P:], n), stacked(answer_mask, n)
    t_in, reveal = dopsd_teacher_view(x_in, x_out, y, P, mask_id, am, retain_ratio,
                                      block_length, suffix, generator)
    t_attn = stacked(with_response(ro.attn, L) if suffix else ro.attn, n)
    with torch.no_grad():
        teacher = model if teacher is None else teacher
        logp_t = F.log_softmax(teacher(t_in, t_attn, start=P)[:, :L], -1)
    logp_s = F.log_softmax(model(x_in, stacked(ro.attn, n), start=P), -1)
    decoded = (x_in[:, P:] == mask_id) & (x_out[:, P:] != mask_id)  # this step's tokens
    if select == "student":
        sel = decoded
    elif select == "teacher":
        cand = (x_in[:, P:] == mask_id) & ~reveal
        if block_length is not None:
            first = cand.float().argmax(1, keepdim=True)
            cand &= torch.arange(L, device=seq.device) // block_length == first // block_length
        conf = logp_t.max(-1).values.masked_fill(~cand, -torch.inf)
        sel = top_k_mask(conf, decoded.sum(1)) & cand
    else:
        raise ValueError(f"select must be 'teacher' or 'student', not {select!r}")
    div = kd_divergence(logp_s, logp_t, beta, top_k)
    if token_clip is not None:
        div = div.clamp(max=token_clip)
    w = torch.ones(N, device=seq.device) if weight is None else weight.float()
    n_sel = sel.sum().clamp(min=1)
    loss = (div * sel * stacked(w, n)[:, None]).sum() / n_sel
    return loss, dict(div=((div * sel).sum() / n_sel).item(), n_tokens=int(sel.sum()),
                      revealed=int(reveal.sum()), steps=n)


def opdlm_loss(student, ro, mask_id, teacher, *, n_states=1, beta=0.0, top_k=None,
               generator=None):
    """OPDLM: a causal AR model (`teacher`, cfg.causal, frozen) distilled into its copy with
    bidirectional attention (the student), on the student's own confidence-decoded trajectories
    ro.states. The teacher reads the completed response causally; its output at position j - 1
    is the target for response position j. KL (kd_divergence: beta, top_k) at the masked
    positions of n_states trajectory states per response (None: all of them), averaged per row,
    then over rows. Returns (loss, stats)."""
    if not teacher.cfg.causal:
        raise ValueError("opdlm_loss: the teacher must be the causal AR model (cfg.causal=True)")
    if ro.P < 1:
        raise ValueError("opdlm_loss: needs P >= 1 (the first response token's target is read "
                         "at P - 1)")
    seq, attn, P, S = ro.seq, ro.attn, ro.P, ro.states
    T, N, L = S.shape[1] - 1, seq.shape[0], seq.shape[1] - P
    with torch.no_grad():  # the teacher at j - 1 on the clean sequence predicts token j
        logp_t = F.log_softmax(teacher(seq, attn, start=P - 1)[:, :L], -1)
    if n_states is None:
        x, n = rearrange(S[:, :T], "b t s -> (t b) s"), T
    else:
        r = torch.randint(0, T, (n_states, N), generator=generator, device=seq.device)
        x, n = rearrange(S[torch.arange(N, device=seq.device), r], "t b s -> (t b) s"), n_states
    masked = x[:, P:] == mask_id
    logp_s = F.log_softmax(student(x, stacked(attn, n), start=P), -1)
    kl = kd_divergence(logp_s, stacked(logp_t, n), beta, top_k)
    per_row = (kl * masked).sum(1) / masked.sum(1).clamp(min=1)
    n_tok = masked.sum()
    return per_row.mean(), dict(kl=((kl * masked).sum() / n_tok.clamp(min=1)).item(),
                                n_tokens=int(n_tok))


# ----------------------------------------------------------------------------------------------
# The field's parallel-decoding distillations (comparison rows): hard labels from the model's
# own responses, masked one block at a time, and a certainty term


def block_views(y, block_length, keep, generator=None):
    """Two complementary views of one block per row (dParallel, d3LLM): a block drawn uniformly
    per row (earlier blocks clean, later ones all M without loss); inside it the positions where
    `keep` (N, L) is False are masked in the first view and the others in the second. Returns
    the masks to apply (2N, L), copy-major, and the masks that carry the loss (2N, L)."""
    N, L = y.shape
    k = torch.randint(0, L // block_length, (N, 1), generator=generator, device=y.device)
    blk = torch.arange(L, device=y.device) // block_length
    block, later = blk == k, blk > k
    loss_at = torch.cat([block & ~keep, block & keep])
    return loss_at | stacked(later, 2), loss_at


def forced_terms(logits, y, loss_at, temperature):
    """Per row: the mean cross-entropy at the loss positions, and the mean entropy of
    softmax(logits / temperature) at those of them the model already predicts right (argmax =
    y): certainty forcing, which sharpens what is right without touching what is wrong."""
    ce = -pick(F.log_softmax(logits, -1), y)
    logq = F.log_softmax(logits / temperature, -1)
    entropy = -(logq.exp() * logq).sum(-1)
    right = loss_at & (logits.argmax(-1) == y)
    return ((ce * loss_at).sum(1) / loss_at.sum(1).clamp(min=1),
            (entropy * right).sum(1) / right.sum(1).clamp(min=1))


def certainty_loss(model, ro, mask_id, *, block_length=None, p=0.5, temperature=0.5, weight=2.0,
                   generator=None):
    """dParallel's certainty-forcing distillation on the model's own responses ro.seq: one block
    per row, each of its tokens masked with probability p in one view and the others in the
    complementary view; per view the cross-entropy at its masked tokens plus `weight` x the
    entropy at temperature `temperature` of those it already predicts right (forced_terms).
    Loss = CE + CE' + weight (E + E'), each a per-row mean, averaged over rows."""
    seq, P = ro.seq, ro.P
    y = seq[:, P:]
    keep = torch.rand(y.shape, generator=generator, device=y.device) >= p
    masks, loss_at = block_views(y, block_length or y.shape[1], keep, generator)
    logits = model(apply_mask(stacked(seq, 2), P, masks, mask_id), stacked(ro.attn, 2), start=P)
    ce, ent = (rearrange(v, "(v n) -> v n", v=2) for v in
               forced_terms(logits, stacked(y, 2), loss_at, temperature))
    loss = (ce.sum(0) + weight * ent.sum(0)).mean()
    return loss, dict(ce=ce.mean().item(), entropy=ent.mean().item(), n_tokens=int(loss_at.sum()))


def d3llm_loss(model, ro, mask_id, *, block_length=None, t_min=0.0, t_max=0.8, temperature=0.5,
               weight=2.0, generator=None):
    """d3LLM's pseudo-trajectory distillation on the model's own trajectories ro.states: in the
    drawn block the student sees the tokens its decoding unmasked first (the n = (1 - t) B
    earliest, t ~ U(t_min, t_max), ties in random order) and learns the later ones; the
    complementary view the reverse. d3LLM raises t_min to t_max over training (a caller's
    schedule). Loss = (CE + CE' + weight E) / 4, E on the first view only (forced_terms)."""
    seq, P = ro.seq, ro.P
    y = seq[:, P:]
    N, L = y.shape
    B = block_length or L
    order = (ro.states[:, :, P:] == mask_id).sum(1).float()  # the step that decoded each token
    order += torch.rand(order.shape, generator=generator, device=y.device)  # ties: at random
    t = t_min + (t_max - t_min) * torch.rand(N, 1, generator=generator, device=y.device)
    blk = torch.arange(L, device=y.device) // B
    key = order + blk * (ro.states.shape[1] + 1)  # block by block, earlier-decoded first
    rank = key.argsort(1).argsort(1) - blk * B  # each token's place in its block's order
    keep = rank < ((1 - t) * B).floor()
    masks, loss_at = block_views(y, B, keep, generator)
    logits = model(apply_mask(stacked(seq, 2), P, masks, mask_id), stacked(ro.attn, 2), start=P)
    ce, ent = (rearrange(v, "(v n) -> v n", v=2) for v in
               forced_terms(logits, stacked(y, 2), loss_at, temperature))
    loss = (ce.sum(0) + weight * ent[0]).mean() / 4
    return loss, dict(ce=ce.mean().item(), entropy=ent[0].mean().item(),
                      n_tokens=int(loss_at.sum()))


# ----------------------------------------------------------------------------------------------
# The methods as sudoku.py and train_llada.py run them: one registry. Adding a loss is the
# function above, one entry here, and its test.


def flag(default, help, choices=None, kind=None):
    """A config field that is also a command-line flag (parse_config); kind: the items' type of
    a list flag whose default is empty."""
    return field(default=default, metadata=dict(help=help, choices=choices, kind=kind))


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
    dopsd_steps: int = flag(2, "d-OPSD: trajectory steps supervised per update")

    def copsd_kw(self):
        """copsd_rollout's options."""
        return dict(t=self.t, s=self.s, random_s=self.random_s, keep_z=self.keep_z,
                    group_norm=self.group_norm, objective=self.objective,
                    top_k=self.target_top_k or None)

    def problems(self, methods):
        """What is wrong with these flags for `methods` (names of METHODS), one line each."""
        copsd = "copsd" in methods
        return [why for bad, why in [
            (self.K < 1, f"--K {self.K}: need at least 1 response per prompt"),
            (copsd and self.K < 2 and self.group_norm,
             "--K must be >= 2 for group normalisation (or pass --no-group_norm)"),
            (copsd and not 0 <= self.s < self.t <= 1,
             f"need 0 <= s < t <= 1, got --t {self.t} --s {self.s} (at s >= t the later view "
             "masks nothing, and COPSD's loss is 0)"),
            (self.resample_every < 0, f"--resample_every {self.resample_every}: need >= 0"),
            (not 0 <= self.temperature < float("inf"),
             f"--temperature {self.temperature}: need a finite value >= 0"),
            (self.train_tokens_per_step < 1,
             f"--train_tokens_per_step {self.train_tokens_per_step}: need >= 1"),
            (self.target_top_k < 0, f"--target_top_k {self.target_top_k}: need >= 0"),
            (self.dopsd_steps < 1, f"--dopsd_steps {self.dopsd_steps}: need >= 1")] if bad]


def no_options(cfg, sampler):
    return {}


@dataclass(frozen=True)
class Method:
    """A row of the tables: what it trains on ("answers": ground truth; "samples": the model's
    own responses; "trajectories": with their decoding states; "calibrated": COPSD's rollout),
    its loss, and the loss's options from the config and the rollouts' sampler."""
    label: str
    data: str
    loss: Callable
    options: Callable = no_options
    toy_only: bool = False  # needs what only sudoku.py builds (OPDLM: a causal AR teacher)


METHODS = {
    "self": Method("Base-Self", "samples", mdm_loss),  # naive self-distillation (Alg. 1)
    "sft": Method("SFT", "answers", mdm_loss),  # supervised fine-tuning on ground truth
    "copsd": Method("COPSD", "calibrated", copsd_loss,  # Alg. 2
                    lambda c, sp: dict(objective=c.objective, direction=c.later_direction)),
    "selfusion": Method("SelFusion", "samples", selfusion_loss),
    # the reveal is restricted to the blocks after the current one only when there are several
    # (with one block, as in the toy, it would reveal nothing)
    "dopsd": Method("d-OPSD", "trajectories", dopsd_loss, lambda c, sp: dict(
        n_steps=c.dopsd_steps, block_length=sp.block_length if sp.n_blocks > 1 else None)),
    "opdlm": Method("OPDLM", "trajectories", opdlm_loss, toy_only=True),  # teacher=: the caller
    # the field's parallel-decoding distillations, one block at a time of the sampler's blocks
    "dparallel": Method("dParallel", "samples", certainty_loss,
                        lambda c, sp: dict(block_length=sp.block_length)),
    "d3llm": Method("d3LLM", "trajectories", d3llm_loss,
                    lambda c, sp: dict(block_length=sp.block_length)),
}


def check_finite(step, **values):
    """Stop at the first non-finite loss, gradient norm or weight: a NaN would otherwise train on
    silently and be saved. Raises FloatingPointError naming the step and the values."""
    def finite(v):
        return all(bool(torch.isfinite(x).all()) for x in
                   (v if isinstance(v, list) else [torch.as_tensor(v)]))
    bad = [name for name, v in values.items() if not finite(v)]
    if bad:
        raise FloatingPointError(f"step {step}: non-finite {' and '.join(bad)}; stopped before "
                                 "saving (is the learning rate too high?)")


def loss_options(method, cfg, sampler, **extra):
    """`method`'s loss options (METHODS), with the caller's `extra` (OPDLM's teacher)."""
    return METHODS[method].options(cfg, sampler) | extra


def make_rollout(method, model, prompt, prompt_attn, mask_id, sampler, cfg, *, K=None,
                 answers=None, generator=None, stats=None):
    """The data `method` trains on, drawn with the current weights θ': its ground-truth
    `answers` (SFT), K samples per prompt (default cfg.K), with their trajectories, or COPSD's
    calibrated rollout (cfg: a MethodConfig)."""
    data, K = METHODS[method].data, cfg.K if K is None else K
    if data == "answers":
        return answers_rollout(prompt, prompt_attn, answers, K)
    if data == "calibrated":
        return copsd_rollout(model, prompt, prompt_attn, mask_id, sampler, K=K,
                             generator=generator, stats=stats, **cfg.copsd_kw())
    return rollout(model, prompt, prompt_attn, mask_id, sampler, K,
                   record=data == "trajectories", generator=generator, stats=stats)


# ----------------------------------------------------------------------------------------------
# the command line of both scripts: one dataclass, every flag() field a --flag


def parse_config(cls, argv=None, description=None):
    """`cls` (a dataclass) from the command line: --name value per flag() field; booleans as
    --name / --no-name; tuples as comma lists; fixed sets of values as choices. Fields without
    a flag() keep their default. Fields a base class declares are shown as a group under its
    docstring."""
    ap = argparse.ArgumentParser(description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    by_name, done = {f.name: f for f in fields(cls)}, set()
    for klass in cls.__mro__[:-1]:  # a field belongs to the most derived class declaring it
        group = ap if klass is cls else ap.add_argument_group(klass.__doc__.split("\n")[0])
        for name in vars(klass).get("__annotations__", {}):
            if name not in done and "help" in by_name[name].metadata:
                add_flag(group, by_name[name])
            done.add(name)
    return cls(**vars(ap.parse_args(argv)))


def add_flag(ap, f):
    help, choices = f.metadata["help"], f.metadata["choices"]
    if isinstance(f.default, tuple):
        shown = ",".join(map(str, f.default)) or "none"
        item = f.metadata.get("kind") or type(f.default[0])
        kw = dict(type=comma_list(item, choices), metavar="A,B,...")
        if choices:
            help += f" (from: {', '.join(map(str, choices))})"
    else:
        shown = f.default if f.default != "" else "none"
        kw = dict(choices=choices, type=type(f.default))
    if isinstance(f.default, bool):
        kw = dict(action=argparse.BooleanOptionalAction)
    ap.add_argument(f"--{f.name}", default=f.default, help=f"{help} (default: {shown})", **kw)


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
