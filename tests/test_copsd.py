"""copsd.py: masks, MDM loss, LLaDA's sampler, calibration, group normalisation, the COPSD loss."""

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import copsd
from conftest import MASK, VOCAB, tiny_model
from copsd import Rollout


def gen(seed):
    return torch.Generator().manual_seed(seed)


def padded_prompts(lengths, seed=0):
    """Left-padded prompts of the given lengths (pad id 0, attention False there) and the rows."""
    g = gen(seed)
    rows = [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]
    P = max(lengths)
    prompt = torch.zeros(len(rows), P, dtype=torch.long)
    attn = torch.zeros(len(rows), P, dtype=torch.bool)
    for r, row in enumerate(rows):
        prompt[r, P - len(row):] = row
        attn[r, P - len(row):] = True
    return prompt, attn, rows


class Recorder(nn.Module):
    """Wraps a model and records the token ids of every forward call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, idx, attention_mask=None, start=0, end=None):
        self.inputs.append(idx.clone())
        return self.model(idx, attention_mask, start=start, end=end)


class FixedLogits(nn.Module):
    """A 'model' whose logits are a free parameter (B, S, V), independent of its input: each
    position's log-probabilities can then be moved on their own. Records its inputs."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.inputs = nn.Parameter(logits.clone()), []

    def forward(self, idx, attention_mask=None, start=0, end=None):
        self.inputs.append(idx.clone())
        reps = idx.shape[0] // self.logits.shape[0]  # calibration runs both views as one batch
        return self.logits.repeat(reps, 1, 1)[:, start:end]


# ----------------------------------------------------------------------------------------------
# Sec. 3: the forward process


def test_nested_masks_are_nested_with_the_right_ratios():
    mask_t, mask_ts = copsd.nested_masks((400, 100), 0.7, 0.3, generator=gen(0))
    assert mask_t.shape == mask_ts.shape == (400, 100) and mask_t.dtype == torch.bool
    assert not (mask_ts & ~mask_t).any()  # masked late => masked early
    assert abs(mask_t.float().mean().item() - 0.7) < 0.01
    assert abs(mask_ts.float().mean().item() - 0.4) < 0.01
    # s = 0: one view
    a, b = copsd.nested_masks((10, 10), 0.5, generator=gen(1))
    assert torch.equal(a, b)


def test_nested_masks_per_row_t_and_s():
    t = torch.tensor([0.1, 0.5, 0.9, 0.9])
    s = torch.tensor([0.0, 0.25, 0.1, 0.8])
    mask_t, mask_ts = copsd.nested_masks((4, 20000), t, s, generator=gen(2))
    assert not (mask_ts & ~mask_t).any()
    torch.testing.assert_close(mask_t.float().mean(1), t, atol=0.015, rtol=0)
    torch.testing.assert_close(mask_ts.float().mean(1), t - s, atol=0.015, rtol=0)


def test_apply_mask_leaves_prompt():
    seq = torch.arange(10)[None].repeat(2, 1)
    mask = torch.tensor([[True, False, True, False], [False] * 4])
    out = copsd.apply_mask(seq, 6, mask, MASK)
    assert torch.equal(out[:, :6], seq[:, :6])
    assert out[0, 6:].tolist() == [MASK, 7, MASK, 9] and out[1, 6:].tolist() == [6, 7, 8, 9]
    assert seq[0, 6] == 6  # not in place


# ----------------------------------------------------------------------------------------------
# Eq. 2-3: the MDM loss


def test_mdm_loss_finite_and_backprops(model):
    seq = torch.randint(0, VOCAB, (4, 12), generator=gen(0))
    attn = torch.ones_like(seq, dtype=torch.bool)
    loss, _ = copsd.mdm_loss(model, Rollout(seq, attn, 4), MASK, generator=gen(1))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_mdm_loss_matches_manual_computation(model):
    B, P, L, eps = 3, 4, 8, 1e-3
    seq = torch.randint(0, VOCAB, (B, P + L), generator=gen(0))
    attn = torch.ones_like(seq, dtype=torch.bool)
    loss, _ = copsd.mdm_loss(model, Rollout(seq, attn, P), MASK, eps=eps, generator=gen(7))
    # the same draws by hand: t ~ U(eps, 1) per row, then one uniform per response position
    g = gen(7)
    t = (1 - eps) * torch.rand(B, generator=g) + eps
    masked = torch.rand(B, L, generator=g) < t[:, None]
    assert masked.any()
    x = seq.clone()
    x[:, P:][masked] = MASK
    ce = F.cross_entropy(model(x, attn)[:, P:].transpose(1, 2), seq[:, P:], reduction="none")
    manual = (ce * masked / t[:, None]).sum() / (B * L)
    torch.testing.assert_close(loss, manual, rtol=1e-5, atol=1e-6)


def test_mdm_loss_only_masked_response_positions_contribute():
    B, P, L = 4, 5, 8
    seq = torch.randint(0, VOCAB, (B, P + L), generator=gen(0))
    fake = FixedLogits(torch.randn(B, P + L, VOCAB, generator=gen(1)))
    for seed in range(5):
        fake.zero_grad()
        fake.inputs.clear()
        ro = Rollout(seq, torch.ones_like(seq, dtype=torch.bool), P)
        copsd.mdm_loss(fake, ro, MASK, generator=gen(seed))[0].backward()
        (x,) = fake.inputs
        assert torch.equal(x[:, :P], seq[:, :P])  # the prompt is never masked
        visible = x[:, P:] != MASK
        assert torch.equal(x[:, P:][visible], seq[:, P:][visible])
        g = fake.logits.grad
        assert (g[:, :P] == 0).all()
        assert (g[:, P:][visible] == 0).all()
        assert (g[:, P:][~visible].abs().sum(-1) > 0).all()


def test_mdm_loss_is_unbiased():
    """With logits that ignore the input, E[loss] over t and the masks is the plain mean
    cross-entropy over response tokens: the 1/t weight undoes the masking rate."""
    B, P, L = 4, 2, 8
    seq = torch.randint(0, VOCAB, (B, P + L), generator=gen(0))
    fake = FixedLogits(torch.randn(B, P + L, VOCAB, generator=gen(1)))
    attn = torch.ones_like(seq, dtype=torch.bool)
    g = gen(2)
    with torch.no_grad():
        ro = Rollout(seq, attn, P)
        est = torch.stack([copsd.mdm_loss(fake, ro, MASK, generator=g)[0]
                           for _ in range(1000)]).mean()
        target = F.cross_entropy(fake.logits[:, P:].transpose(1, 2), seq[:, P:])
    assert abs(est / target - 1) < 0.1


# ----------------------------------------------------------------------------------------------
# Eq. 1: the sampler


def test_num_transfer_tokens_matches_llada():
    n_masked = torch.tensor([0, 1, 5, 7, 8, 16, 31])
    for steps in (1, 3, 4, 8):
        out = copsd.num_transfer_tokens(n_masked, steps)
        # LLaDA's get_num_transfer_tokens, as written there
        ref = torch.zeros(len(n_masked), steps, dtype=torch.long) + (n_masked // steps)[:, None]
        for i in range(len(n_masked)):
            ref[i, : int(n_masked[i] % steps)] += 1
        assert torch.equal(out, ref)
        assert torch.equal(out.sum(1), n_masked)


@pytest.mark.parametrize("remasking,temperature", [("low_confidence", 0.0), ("random", 1.0)])
def test_sampler_schedule_prompt_and_block_order(remasking, temperature):
    prompt, pattn, _ = padded_prompts([3, 5, 6], seed=1)
    B, P = prompt.shape
    gen_length, block_length, steps = 16, 8, 6  # 2 blocks, 3 steps each: 3, 3, 2 tokens per step
    rec = Recorder(tiny_model())
    out = copsd.generate(rec, prompt, pattn, MASK, gen_length=gen_length,
                         block_length=block_length, steps=steps, temperature=temperature,
                         remasking=remasking, generator=gen(0))
    assert out.shape == (B, P + gen_length)
    states = rec.inputs + [out]
    spb, n_blocks = steps // (gen_length // block_length), gen_length // block_length
    assert len(rec.inputs) == steps
    sched = copsd.num_transfer_tokens(torch.full((B,), block_length), spb)
    assert sched[0].tolist() == [3, 3, 2]
    for j in range(steps):
        b, i = divmod(j, spb)
        before, after = states[j], states[j + 1]
        for x in (before, after):
            assert torch.equal(x[:, :P], prompt)  # the prompt is never touched
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        assert not (before[:, P:lo] == MASK).any()  # earlier blocks complete
        assert (before[:, hi:] == MASK).all()  # later blocks untouched
        assert (after[:, hi:] == MASK).all()
        newly = (before == MASK) & (after != MASK)
        assert torch.equal(newly.sum(1), sched[:, i])  # exactly the scheduled number
        assert not newly[:, :lo].any() and not newly[:, hi:].any()
        assert not ((before != MASK) & (before != after)).any()  # no token is ever changed again
    assert not (out == MASK).any()
    assert ((out[:, P:] >= 0) & (out[:, P:] < VOCAB)).all()


def test_sampler_greedy_is_deterministic():
    prompt, pattn, _ = padded_prompts([4, 6], seed=2)
    m = tiny_model(seed=1)
    a = copsd.generate(m, prompt, pattn, MASK, gen_length=8, block_length=4, steps=4)
    b = copsd.generate(m, prompt, pattn, MASK, gen_length=8, block_length=4, steps=4)
    assert torch.equal(a, b)


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_sampler_stochastic_is_reproducible(remasking):
    prompt, pattn, _ = padded_prompts([4, 6, 6], seed=2)
    m = tiny_model(seed=1)
    kw = dict(gen_length=8, block_length=4, steps=4, temperature=1.0, remasking=remasking)
    a = copsd.generate(m, prompt, pattn, MASK, generator=gen(5), **kw)
    b = copsd.generate(m, prompt, pattn, MASK, generator=gen(5), **kw)
    c = copsd.generate(m, prompt, pattn, MASK, generator=gen(6), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not (a == MASK).any()


def test_gumbel_max_samples_the_tempered_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]]).repeat(40000, 1)
    for tau in (1.0, 0.5):
        x = copsd.add_gumbel_noise(logits, tau, generator=gen(0)).argmax(-1)
        freq = torch.bincount(x, minlength=4).double() / len(x)
        torch.testing.assert_close(freq, F.softmax(logits[0].double() / tau, -1), atol=0.01, rtol=0)
    assert torch.equal(copsd.add_gumbel_noise(logits[:2], 0.0), logits[:2])


@torch.no_grad()
def llada_generate_reference(model, prompt, steps, gen_length, block_length, mask_id):
    """LLaDA's generate.py (greedy, low_confidence) for ONE unpadded prompt (1, P): a plain loop
    with torch.topk per row, written independently of copsd.generate."""
    x = torch.full((1, prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        lo = prompt.shape[1] + num_block * block_length
        block_mask_index = x[:, lo: lo + block_length] == mask_id
        mask_num = block_mask_index.sum(dim=1, keepdim=True)
        num_transfer = torch.zeros(1, steps, dtype=torch.long) + mask_num // steps
        num_transfer[0, : int(mask_num % steps)] += 1
        for i in range(steps):
            mask_index = x == mask_id
            logits = model(x)
            x0 = torch.argmax(logits, dim=-1)
            p = F.softmax(logits.to(torch.float64), dim=-1)
            x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            x0_p[:, lo + block_length:] = -float("inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p,
                                     torch.tensor(-float("inf"), dtype=x0_p.dtype))
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=int(num_transfer[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x


@pytest.mark.parametrize("gen_length,block_length,steps", [(12, 4, 6), (12, 6, 8), (8, 8, 3)])
def test_sampler_matches_per_row_llada_reference(gen_length, block_length, steps):
    m = tiny_model(seed=4, std=0.3)  # peaked predictions: top-k decided by margins, not round-off
    prompt, pattn, rows = padded_prompts([2, 5, 7, 7], seed=3)
    P = prompt.shape[1]
    out = copsd.generate(m, prompt, pattn, MASK, gen_length=gen_length,
                         block_length=block_length, steps=steps)
    for r, row in enumerate(rows):
        ref = llada_generate_reference(m, row[None], steps, gen_length, block_length, MASK)
        assert torch.equal(out[r, P - len(row):], ref[0]), f"row {r}"


def test_sampler_bad_arguments():
    prompt, pattn, _ = padded_prompts([3], seed=0)
    m = tiny_model()
    with pytest.raises(ValueError):
        copsd.generate(m, prompt, pattn, MASK, gen_length=10, block_length=4, steps=4)
    with pytest.raises(ValueError):
        copsd.generate(m, prompt, pattn, MASK, gen_length=8, block_length=4, steps=3)
    with pytest.raises(ValueError):
        copsd.generate(m, prompt, pattn, MASK, gen_length=8, block_length=4, steps=1)
    with pytest.raises(ValueError):
        copsd.generate(m, prompt, pattn, MASK, gen_length=8, block_length=4, steps=4,
                       remasking="topk")
    with pytest.raises(ValueError, match="refresh"):
        copsd.generate(m, prompt, pattn, MASK, gen_length=8, block_length=4, steps=4,
                       cache="dual", refresh=-1)


# ----------------------------------------------------------------------------------------------
# Eq. 5, 7-9: calibration and the rollout


def views(seq, P, mask_t, mask_ts):
    yt, yts = seq.clone(), seq.clone()
    yt[:, P:][mask_t] = MASK
    yts[:, P:][mask_ts] = MASK
    return yt, yts


def test_calibration_matches_independent_computation(model):
    B, P, L = 3, 4, 10
    seq = torch.randint(0, VOCAB, (B, P + L), generator=gen(0))
    attn = torch.ones_like(seq, dtype=torch.bool)
    attn[0, :2] = False
    mask_t, mask_ts = copsd.nested_masks((B, L), 0.9, 0.5, generator=gen(1))
    cal = copsd.calibration(model, Rollout(seq, attn, P), mask_t, mask_ts, MASK)
    old_logp, d = cal["old_logp"], cal["d"]
    assert "log_z" not in cal
    yt, yts = views(seq, P, mask_t, mask_ts)
    with torch.no_grad():
        p_t = F.softmax(model(yt, attn)[:, P:].double(), -1)
        p_ts = F.softmax(model(yts, attn)[:, P:].double(), -1)
    y = seq[:, P:, None]
    pt_y, pts_y = p_t.gather(-1, y)[..., 0], p_ts.gather(-1, y)[..., 0]
    torch.testing.assert_close(old_logp.double(), pt_y.log(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d.double(), (pts_y - pt_y) ** 2, rtol=1e-4, atol=1e-7)
    assert old_logp.dtype == d.dtype == torch.float32
    assert (d > 0).any()
    log_z = copsd.calibration(model, Rollout(seq, attn, P), mask_t, mask_ts, MASK,
                              keep_z=True)["log_z"]
    ref = (p_t * torch.exp(-(p_ts - p_t) ** 2)).sum(-1).log()
    torch.testing.assert_close(log_z.double(), ref, rtol=1e-4, atol=1e-6)


ROLL = dict(gen_length=8, block_length=8, steps=4, temperature=1.0)


def rollout(m, prompt, pattn, seed=0, **kw):
    sampler = copsd.Sampler(**{k: kw.pop(k, v) for k, v in ROLL.items()})
    return copsd.copsd_rollout(m, prompt, pattn, MASK, sampler, generator=gen(seed), **kw)


def test_rollout_rows_are_prompt_major_and_share_masks():
    m = tiny_model(seed=2)
    prompt, pattn, _ = padded_prompts([3, 5, 4], seed=4)
    B, P, K = 3, prompt.shape[1], 4
    ro = rollout(m, prompt, pattn, K=K, t=0.9, s=0.5)
    L = ROLL["gen_length"]
    assert ro.seq.shape == (B * K, P + L)
    for key in ("mask_t", "mask_ts", "old_logp", "d", "A"):
        assert getattr(ro, key).shape == (B * K, L), key
    assert not (ro.seq == MASK).any()
    assert torch.equal(ro.attn[:, :P], pattn.repeat_interleave(K, 0)) and ro.attn[:, P:].all()
    assert not (ro.mask_ts & ~ro.mask_t).any()
    for p in range(B):
        grp = slice(p * K, (p + 1) * K)
        assert (ro.seq[grp, :P] == prompt[p]).all()
        assert (ro.mask_t[grp] == ro.mask_t[p * K]).all()
        assert (ro.mask_ts[grp] == ro.mask_ts[p * K]).all()
        assert len({tuple(r.tolist()) for r in ro.seq[grp, P:]}) > 1  # temperature 1: diverse
    # the cached numbers are the old model's, on the rollout's own views
    cal = copsd.calibration(m, ro, ro.mask_t, ro.mask_ts, MASK)
    old_logp, d = cal["old_logp"], cal["d"]
    torch.testing.assert_close(ro.old_logp, old_logp)
    torch.testing.assert_close(ro.d, d)
    torch.testing.assert_close(ro.A, copsd.group_normalize(d, K))


def test_rollout_random_s():
    m = tiny_model(seed=2)
    prompt, pattn, _ = padded_prompts([3] * 6, seed=5)
    ro = rollout(m, prompt, pattn, K=2, t=0.9, random_s=True, gen_length=16, block_length=16,
                 steps=4)
    assert not (ro.mask_ts & ~ro.mask_t).any()
    # s differs per prompt (not the fixed 0.5): the late-view ratios vary across prompts
    ratios = ro.mask_ts[::2].float().mean(1)
    assert len(set(ratios.tolist())) > 1


def test_no_group_norm_gives_a_equal_d():
    m = tiny_model(seed=2)
    prompt, pattn, _ = padded_prompts([3, 5], seed=4)
    ro = rollout(m, prompt, pattn, K=3, group_norm=False)
    assert torch.equal(ro.A, ro.d)
    normed = rollout(m, prompt, pattn, K=3)
    assert torch.equal(normed.seq, ro.seq)
    torch.testing.assert_close(normed.A, copsd.group_normalize(ro.d, 3))
    assert not torch.allclose(normed.A, ro.A)


def test_keep_z_adds_exactly_log_z():
    m = tiny_model(seed=2)
    prompt, pattn, _ = padded_prompts([3, 5], seed=4)
    P, K = prompt.shape[1], 3
    plain = rollout(m, prompt, pattn, K=K, group_norm=False)
    with_z = rollout(m, prompt, pattn, K=K, group_norm=False, keep_z=True)
    for key in ("seq", "mask_t", "mask_ts"):
        # same seed: same samples and masks
        assert torch.equal(getattr(plain, key), getattr(with_z, key)), key
    torch.testing.assert_close(with_z.d, plain.d)
    # log Z_i = log sum_v p(v|y_t) exp(-(p(v|y_{t-s}) - p(v|y_t))^2), over the whole vocabulary
    yt, yts = views(plain.seq, P, plain.mask_t, plain.mask_ts)
    with torch.no_grad():
        p_t = F.softmax(m(yt, plain.attn)[:, P:].double(), -1)
        p_ts = F.softmax(m(yts, plain.attn)[:, P:].double(), -1)
    log_z = (p_t * torch.exp(-(p_ts - p_t) ** 2)).sum(-1).log()
    assert (log_z < 0).all()
    torch.testing.assert_close((with_z.A - plain.A).double(), log_z, rtol=1e-4, atol=1e-6)
    # and with normalisation: A = group_normalize(d + log Z)
    normed = rollout(m, prompt, pattn, K=K, keep_z=True)
    # (compared on the float32 d + log Z: normalising tiny spreads amplifies round-off)
    torch.testing.assert_close(normed.A, copsd.group_normalize(with_z.A, K))


# ----------------------------------------------------------------------------------------------
# Eq. 10: group relative normalisation


def test_group_normalize_zero_mean_unit_std_per_group():
    B, K, L = 3, 5, 7
    b = torch.rand(B * K, L, generator=gen(0)) \
        * torch.arange(1, B + 1).repeat_interleave(K)[:, None] \
        + 10 * torch.arange(B).repeat_interleave(K)[:, None]
    A = copsd.group_normalize(b, K)
    assert A.shape == b.shape
    g = A.view(B, K, L)
    torch.testing.assert_close(g.mean(1), torch.zeros(B, L), atol=1e-5, rtol=0)
    torch.testing.assert_close(g.std(1, unbiased=True), torch.ones(B, L), atol=1e-4, rtol=0)
    # prompt-major groups, by an explicit loop
    for p in range(B):
        for i in range(L):
            col = b[p * K:(p + 1) * K, i]
            ref = (col - col.mean()) / (col.std(unbiased=True) + 1e-6)
            torch.testing.assert_close(A[p * K:(p + 1) * K, i], ref)


def test_group_normalize_needs_k_at_least_2():
    with pytest.raises(ValueError):
        copsd.group_normalize(torch.rand(4, 3), 1)


def test_group_normalize_constant_group_is_finite():
    A = copsd.group_normalize(torch.full((4, 3), 0.25), 2)
    assert torch.isfinite(A).all() and (A == 0).all()


# ----------------------------------------------------------------------------------------------
# Eq. 11-12: the COPSD loss


def test_copsd_loss_gradient_at_r_equal_1(monkeypatch):
    """At r = 1 (old log-probs = current ones): L = mean A over the positions masked in y_{t-s},
    and dL/dl_{k,i} = (1 + A_{k,i}) / n there, 0 elsewhere: the larger the distance relative to
    the group, the more the token's log-probability is pushed down."""
    m = tiny_model(seed=2)
    prompt, pattn, _ = padded_prompts([3, 5], seed=4)
    P = prompt.shape[1]
    ro = rollout(m, prompt, pattn, K=3, t=0.9, s=0.5)
    m_ts = ro.mask_ts
    assert m_ts.any() and (ro.mask_t & ~m_ts).any()
    captured = {}
    orig = copsd.token_logprobs

    def spy(*a, **kw):
        lp = orig(*a, **kw)
        lp.retain_grad()
        captured["logp"] = lp
        return lp

    monkeypatch.setattr(copsd, "token_logprobs", spy)
    loss, stats = copsd.copsd_loss(m, ro, MASK)
    n = m_ts.sum()
    assert stats["n_tokens"] == int(n)
    assert abs(stats["d"] - (ro.d * m_ts).sum().item() / n.item()) < 1e-6
    # r = 1
    torch.testing.assert_close(captured["logp"].detach(), ro.old_logp, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss.detach(), (ro.A * m_ts).sum() / n, rtol=1e-4, atol=1e-5)
    loss.backward()
    torch.testing.assert_close(captured["logp"].grad, (1 + ro.A) * m_ts / n, rtol=1e-4, atol=1e-6)


def test_copsd_loss_only_counts_positions_masked_late():
    m = tiny_model(seed=2)
    prompt, pattn, _ = padded_prompts([3, 5], seed=4)
    P = prompt.shape[1]
    ro = rollout(m, prompt, pattn, K=2)
    base, _ = copsd.copsd_loss(m, ro, MASK)
    # changing A or l' where y_{t-s} is not masked changes nothing; where it is, the loss moves
    off = ~ro.mask_ts
    assert off.any()
    changed = dataclasses.replace(ro, A=torch.where(off, ro.A + 5.0, ro.A),
                                  old_logp=torch.where(off, ro.old_logp - 1, ro.old_logp))
    torch.testing.assert_close(copsd.copsd_loss(m, changed, MASK)[0], base)
    changed = dataclasses.replace(ro, A=torch.where(off, ro.A, ro.A + 5.0))
    assert (copsd.copsd_loss(m, changed, MASK)[0] - base).abs() > 1


def test_copsd_sgd_step_lowers_larger_distance_tokens_more():
    """One SGD step on free per-position logits (uniform to start, so every position is equally
    easy to move) starting at r = 1: the token whose A is larger loses more log-probability;
    tokens with 1 + A < 0 gain; positions not masked in y_{t-s} do not move."""
    B, K, P, L = 2, 4, 3, 6
    seq = torch.randint(0, VOCAB, (B * K, P + L), generator=gen(0))
    attn = torch.ones_like(seq, dtype=torch.bool)
    mask_t, mask_ts = copsd.nested_masks((B, L), 0.9, 0.5, generator=gen(1))
    mask_t, mask_ts = mask_t.repeat_interleave(K, 0), mask_ts.repeat_interleave(K, 0)
    mask_ts[:, 0], mask_t[:, 0] = True, True  # at least one position of each kind
    mask_ts[:, 1] = False
    fake = FixedLogits(torch.zeros(B * K, P + L, VOCAB))
    old_logp = copsd.calibration(fake, Rollout(seq, attn, P), mask_t, mask_ts, MASK)["old_logp"]
    d = torch.rand(B * K, L, generator=gen(2)) ** 2  # distinct distances
    A = copsd.group_normalize(d, K)
    ro = Rollout(seq, attn, P, mask_t=mask_t, mask_ts=mask_ts, old_logp=old_logp, d=d, A=A)
    opt = torch.optim.SGD(fake.parameters(), lr=1.0)
    loss, _ = copsd.copsd_loss(fake, ro, MASK)
    loss.backward()
    opt.step()
    with torch.no_grad():
        new_logp = F.log_softmax(fake.logits[:, P:], -1).gather(-1, seq[:, P:, None])[..., 0]
    delta = new_logp - old_logp
    assert (delta[~mask_ts] == 0).all()
    for p in range(B):
        for i in torch.nonzero(mask_ts[p * K]).flatten().tolist():
            a, dl = A[p * K:(p + 1) * K, i], delta[p * K:(p + 1) * K, i]
            order = a.argsort()
            assert (dl[order].diff() < 0).all(), (a, dl)  # larger A => larger decrease
            assert torch.equal(torch.sign(dl), -torch.sign(1 + a))


# ----------------------------------------------------------------------------------------------
# the sampler's options: K/V caches, confidence threshold, classifier-free guidance, parity


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_is_exact_when_keys_depend_only_on_tokens(cache):
    """With one layer a position's keys and values depend on its token alone, so a cache of the
    unchanged positions is exact: prefix and dual decode what no cache decodes, every block."""
    m = tiny_model(seed=4, std=0.3, n_layers=1)
    prompt, pattn, _ = padded_prompts([2, 5, 7, 7], seed=3)
    kw = dict(gen_length=12, block_length=4, steps=6)
    ref, ref_states = copsd.generate(m, prompt, pattn, MASK, record=True, **kw)
    out, states = copsd.generate(m, prompt, pattn, MASK, record=True, cache=cache, **kw)
    assert torch.equal(out, ref) and torch.equal(states, ref_states)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_first_step_is_the_full_forward(cache):
    """Deeper models: each block's first step is a full forward, so the first step decodes what
    no cache decodes; the calls after it cover the block and what follows (prefix) or the block
    alone (dual)."""
    m = tiny_model(seed=4, std=0.3)
    prompt, pattn, _ = padded_prompts([2, 5, 7], seed=3)
    P, kw = prompt.shape[1], dict(gen_length=12, block_length=4, steps=6)
    _, ref = copsd.generate(m, prompt, pattn, MASK, record=True, **kw)
    spy = Spy(m)
    _, states = copsd.generate(spy, prompt, pattn, MASK, record=True, cache=cache, **kw)
    assert torch.equal(states[:, 1], ref[:, 1])
    widths = [idx.shape[1] for idx, _, _ in spy.calls]
    S = P + 12
    if cache == "prefix":
        assert widths == [S, S - P, S, S - P - 4, S, S - P - 8]
    else:
        assert widths == [S, 4] * 3


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_refresh_runs_the_full_forward_every_r_steps(cache):
    """refresh=1 makes every step a full forward (the exact sampler, through the cache); refresh=2
    runs it at every other step of each block, the cached window between."""
    m = tiny_model(seed=4, std=0.3)
    prompt, pattn, _ = padded_prompts([2, 5, 7], seed=3)
    P, kw = prompt.shape[1], dict(gen_length=12, block_length=4, steps=12, cache=cache)
    _, ref = copsd.generate(m, prompt, pattn, MASK, record=True, **{**kw, "cache": "none"})
    _, states = copsd.generate(m, prompt, pattn, MASK, record=True, refresh=1, **kw)
    assert torch.equal(states, ref)
    spy, stats = Spy(m), {}
    copsd.generate(spy, prompt, pattn, MASK, refresh=2, stats=stats, **kw)
    S, widths = P + 12, [idx.shape[1] for idx, _, _ in spy.calls]
    after = [S - P - 4 * b if cache == "prefix" else 4 for b in range(3)]
    assert widths == [w for a in after for w in (S, a, S, a)]
    # the stats count the calls over the whole sequence (train_llada's FLOPs floor reads them)
    assert stats == dict(forwards=[4, 4, 4], full=[2, 2, 2])


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_left_padded_batch_equals_each_row_alone(cache):
    m = tiny_model(seed=4, std=0.3)
    prompt, pattn, rows = padded_prompts([2, 5, 7, 7], seed=3)
    P, kw = prompt.shape[1], dict(gen_length=12, block_length=4, steps=6, cache=cache)
    out = copsd.generate(m, prompt, pattn, MASK, **kw)
    for r, row in enumerate(rows):
        alone = copsd.generate(m, row[None], None, MASK, **kw)
        assert torch.equal(out[r, P - len(row):], alone[0]), f"row {r}"


class Spy(nn.Module):
    """Wraps a model; keeps each call's input and logits."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, idx, attention_mask=None, start=0, end=None, **kw):
        out = self.model(idx, attention_mask, start=start, end=end, **kw)
        self.calls.append((idx.clone(), start, out.clone()))
        return out


@pytest.mark.parametrize("threshold", [0.3, 0.9, 1.0])
def test_threshold_unmasks_every_confident_token_and_at_least_one(threshold):
    m = tiny_model(seed=4, std=0.3)
    prompt, pattn, _ = padded_prompts([3, 5, 6], seed=1)
    P, spy, stats = prompt.shape[1], Spy(m), {}
    out, states = copsd.generate(spy, prompt, pattn, MASK, gen_length=8, block_length=4, steps=2,
                                 threshold=threshold, record=True, stats=stats)
    assert not (out == MASK).any()
    assert len(spy.calls) == states.shape[1] - 1 == sum(stats["forwards"])
    for (idx, start, logits), before, after in zip(spy.calls, states.unbind(1),
                                                   states.unbind(1)[1:]):
        lo = P + 4 * int((before[:, P:] == MASK).float().argmax(1).min() // 4)
        conf = F.softmax(logits.double(), -1).max(-1).values  # (B, block)
        masked, newly = before[:, lo:lo + 4] == MASK, (before != after)[:, lo:lo + 4]
        assert not (before != after)[:, :lo].any() and not (before != after)[:, lo + 4:].any()
        sure = masked & (conf >= threshold)
        assert not (sure & ~newly).any()  # every confident token is decoded ...
        best = conf.masked_fill(~masked, -1).argmax(1)
        for r in range(len(out)):
            if masked[r].any():  # ... and at least the most confident one
                assert newly[r, best[r]] and set(newly[r].nonzero().flatten().tolist()) <= \
                    set(sure[r].nonzero().flatten().tolist()) | {int(best[r])}
    if threshold == 0.3:
        assert sum(stats["forwards"]) < 8  # decoded faster than one token per step


def test_cfg_scale():
    """cfg_scale > 0 runs the model on [x; x with the prompt masked] and takes
    uncond + (scale + 1) (cond - uncond); a model that ignores the prompt is not moved by it."""
    m = tiny_model(seed=4, std=0.3)
    prompt, pattn, _ = padded_prompts([3, 5, 6], seed=1)
    P, kw = prompt.shape[1], dict(gen_length=8, block_length=4, steps=4)
    plain = copsd.generate(m, prompt, pattn, MASK, **kw)
    assert torch.equal(copsd.generate(m, prompt, pattn, MASK, cfg_scale=0.0, **kw), plain)
    spy = Spy(m)
    guided = copsd.generate(spy, prompt, pattn, MASK, cfg_scale=2.0, **kw)
    for idx, _, _ in spy.calls:
        assert len(idx) == 6 and torch.equal(idx[3:, P:], idx[:3, P:])
        assert (idx[3:, :P] == MASK).all()
    assert not torch.equal(guided, plain)  # the prompt matters to this model
    fixed = FixedLogits(torch.randn(3, P + 8, VOCAB, generator=gen(0)))  # ignores its input
    assert torch.equal(copsd.generate(fixed, prompt, pattn, MASK, cfg_scale=2.0, **kw),
                       copsd.generate(fixed, prompt, pattn, MASK, **kw))


class PredictsMaskFirst(nn.Module):
    """A model that, while the second block is all masked, predicts M (surely) at response
    position 1: LLaDA's generate decodes M there, and decodes it again in the next block."""

    def __init__(self, model, P, block_length, vocab):
        super().__init__()
        self.model, self.P, self.bl, self.V = model, P, block_length, vocab

    def forward(self, idx, attention_mask=None, start=0, end=None, **kw):
        logits = F.pad(self.model(idx, attention_mask), (0, MASK + 1 - self.V), value=-1e9)
        early = (idx[:, self.P + self.bl:] == MASK).all(1)
        logits[early, self.P + 1, MASK] = 1e9
        return logits[:, start:end]


def test_a_position_decoded_as_mask_is_decoded_again_as_llada_does():
    m = tiny_model(seed=4, std=0.3)
    prompt = torch.randint(0, VOCAB, (1, 5), generator=gen(2))
    model = PredictsMaskFirst(m, 5, 4, VOCAB)
    out, states = copsd.generate(model, prompt, None, MASK, gen_length=8, block_length=4, steps=4,
                                 record=True)
    assert (states[:, 2, 5 + 1] == MASK).all()  # block 0 left it masked ...
    assert out[0, 5 + 1] != MASK  # ... block 1 decoded it
    ref = llada_generate_reference(model, prompt, 4, 8, 4, MASK)
    assert torch.equal(out, ref)


def test_confidence_options():
    m = tiny_model(seed=4, std=0.3)
    prompt, pattn, _ = padded_prompts([3, 5, 6], seed=1)
    P, kw = prompt.shape[1], dict(gen_length=8, block_length=8, steps=4)
    ref = copsd.generate(m, prompt, pattn, MASK, **kw)
    assert torch.equal(copsd.generate(m, prompt, pattn, MASK, confidence_dtype=torch.float32, **kw),
                       ref)
    eos, eot = ref[:, P:].flatten().bincount(minlength=VOCAB).topk(2).indices.tolist()  # frequent
    never = copsd.generate(m, prompt, pattn, MASK, logits_eos_inf=True, eos_id=eos, **kw)
    assert (ref[:, P:] == eos).any() and not (never[:, P:] == eos).any()
    # confidence_eos_eot_inf: EOS and EOT predictions are still decoded, but after the others
    spy = Spy(m)
    out, states = copsd.generate(spy, prompt, pattn, MASK, confidence_eos_eot_inf=True, eos_id=eos,
                                 eot_id=eot, record=True, **kw)
    assert not torch.equal(out, ref) and ((out[:, P:] == eos) | (out[:, P:] == eot)).any()
    for (_, _, logits), before, after in zip(spy.calls, states.unbind(1), states.unbind(1)[1:]):
        pred = logits.argmax(-1)
        special = (pred == eos) | (pred == eot)
        decoded, left = (before != after)[:, P:], (after == MASK)[:, P:]
        for r in range(len(out)):
            if (decoded[r] & special[r]).any():  # a special token taken: nothing else was left
                assert special[r][left[r]].all()


# ----------------------------------------------------------------------------------------------
# the readings of Eq. 6 (copsd_loss's objective)


class ViewDependent(nn.Module):
    """A 'model' whose logits depend on how much of the response is revealed: a + b * (fraction
    unmasked), so the later view y_{t-s} predicts differently from the early view y_t."""

    def __init__(self, a, b, P):
        super().__init__()
        self.a, self.b, self.P = nn.Parameter(a), nn.Parameter(b), P

    def forward(self, idx, attention_mask=None, start=0, end=None):
        shown = (idx[:, self.P:] != MASK).float().mean(1)[:, None, None]
        reps = len(idx) // len(self.a)  # calibration runs both views as one batch
        return (self.a.repeat(reps, 1, 1) + self.b.repeat(reps, 1, 1) * shown)[:, start:end]


def readings_rollout(objective, top_k=None, seed=0):
    B, P, L = 4, 3, 6
    g = gen(seed)
    seq = torch.randint(0, VOCAB, (B, P + L), generator=g)
    teacher = ViewDependent(torch.randn(B, P + L, VOCAB, generator=g),
                            3 * torch.randn(B, P + L, VOCAB, generator=g), P)
    mask_t, mask_ts = copsd.nested_masks((B, L), 0.9, 0.5, generator=g)
    mask_t[:, :2], mask_ts[:, :2] = True, True  # positions masked in both views
    mask_ts[:, 2:] = False
    ro = Rollout(seq, None, P, mask_t=mask_t, mask_ts=mask_ts)
    cal = copsd.calibration(teacher, ro, mask_t, mask_ts, MASK, objective=objective, top_k=top_k)
    ro = dataclasses.replace(ro, A=copsd.group_normalize(cal["d"], 2), **cal)
    with torch.no_grad():  # the teacher's two views, as calibration saw them
        yt, yts = views(seq, P, mask_t, mask_ts)
        logp_t = F.log_softmax(teacher(yt)[:, P:], -1)
        logp_ts = F.log_softmax(teacher(yts)[:, P:], -1)
    return ro, logp_t, logp_ts


def student_grad(ro, logits_resp, objective, direction="reverse"):
    """copsd_loss's value and gradient for a student whose response logits are `logits_resp`."""
    full = torch.zeros(len(ro), ro.seq.shape[1], VOCAB)
    full[:, ro.P:] = logits_resp
    student = FixedLogits(full)
    loss, _ = copsd.copsd_loss(student, ro, MASK, objective=objective, direction=direction)
    loss.backward()
    return loss.detach(), student.logits.grad[:, ro.P:]


def test_score_and_paper_differ_by_the_plus_one_term():
    """paper - score = mean r over the positions; so do their gradients: exactly the "+1"."""
    ro, logp_t, _ = readings_rollout("paper")
    moved = logp_t + 0.3 * torch.randn(logp_t.shape, generator=gen(5))  # r != 1
    loss_p, grad_p = student_grad(ro, moved, "paper")
    loss_s, grad_s = student_grad(ro, moved, "score")
    m = ro.mask_ts
    r = (copsd.pick(F.log_softmax(moved, -1), ro.seq[:, ro.P:]) - ro.old_logp).exp()
    torch.testing.assert_close(loss_p - loss_s, (r * m).sum() / m.sum())
    leaf = moved.clone().requires_grad_()
    ((copsd.pick(F.log_softmax(leaf, -1), ro.seq[:, ro.P:]) - ro.old_logp).exp()
     * m).sum().div(m.sum()).backward()
    torch.testing.assert_close(grad_p - grad_s, leaf.grad, rtol=1e-4, atol=1e-6)
    assert leaf.grad.abs().sum() > 0


@pytest.mark.parametrize("top_k", [None, 5])
def test_exact_gradient_vanishes_at_the_calibrated_distribution(top_k):
    """exact's gradient is zero where p = p' exp(-d) / Z (over the cached top-k, renormalised),
    and not zero at p = p' (the calibration term moves it)."""
    ro, logp_t, logp_ts = readings_rollout("exact", top_k)
    d = (logp_ts.exp() - logp_t.exp()) ** 2
    q = F.log_softmax(logp_t - d, -1)
    assert (q - logp_t).abs().max() > 1e-3  # the target differs from p'
    _, grad = student_grad(ro, q, "exact")
    m = ro.mask_ts
    assert grad[m].abs().max() < 1e-6 and (grad[~m] == 0).all()
    _, grad = student_grad(ro, logp_t, "exact")
    assert grad[m].abs().max() > 1e-4
    loss, _ = student_grad(ro, logp_t, "exact")  # at p = p': Σ p d + log Z >= 0 ... = KL(p' || q)
    assert loss > 0


def test_later_reading_distills_the_later_view():
    ro, logp_t, logp_ts = readings_rollout("later")
    m = ro.mask_ts
    _, grad = student_grad(ro, logp_ts, "later")  # p = p̃: nothing to move, either direction
    assert grad[m].abs().max() < 1e-6
    _, grad = student_grad(ro, logp_ts, "later", "forward")
    assert grad[m].abs().max() < 1e-6
    loss, _ = student_grad(ro, logp_t, "later", "forward")  # KL(p̃ || p') at the positions
    ref = (logp_ts.exp() * (logp_ts - logp_t)).sum(-1)
    torch.testing.assert_close(loss, (ref * m).sum() / m.sum(), rtol=1e-4, atol=1e-6)


def test_readings_share_the_rollout():
    """The four readings draw the same samples and masks and cache the same l' and d; only the
    targets differ (none for paper / score)."""
    m = tiny_model(seed=2)
    prompt, pattn, _ = padded_prompts([3, 5], seed=4)
    ros = {o: rollout(m, prompt, pattn, K=3, objective=o)
           for o in ("paper", "score", "exact", "later")}
    for o, ro in ros.items():
        for key in ("seq", "mask_t", "mask_ts", "old_logp", "d", "A"):
            assert torch.equal(getattr(ro, key), getattr(ros["paper"], key)), (o, key)
    assert ros["paper"].target_logp is None and ros["exact"].target_logp.shape[-1] == VOCAB
    assert not torch.allclose(ros["exact"].target_logp, ros["later"].target_logp)
    top = rollout(m, prompt, pattn, K=3, objective="later", top_k=4)
    assert top.target_logp.shape[-1] == 4 and top.target_idx.shape == top.target_logp.shape
    for o in ros:
        loss, st = copsd.copsd_loss(m, ros[o], MASK, objective=o)
        assert torch.isfinite(loss) and st["n_tokens"] == int(ros[o].mask_ts.sum())
    with pytest.raises(ValueError):
        copsd.copsd_loss(m, ros["paper"], MASK, objective="grpo")


# ----------------------------------------------------------------------------------------------
# the sampler's options and the method registry


def test_sampler_at_tokens_per_step_and_its_checks():
    sp = copsd.Sampler(gen_length=16, block_length=8, steps=16)
    assert sp.at(4).steps == 4 and sp.at(4).tokens_per_step == 4 and sp.at(1) == sp
    for bad in (0, 3, 16):
        with pytest.raises(ValueError, match="does not divide"):
            sp.at(bad)
    for kw, words in [(dict(threshold=0.0), "threshold"), (dict(threshold=1.5), "threshold"),
                      (dict(block_length=0), "block_length"), (dict(steps=0), "steps"),
                      (dict(refresh=-1), "refresh"), (dict(cache="full"), "cache")]:
        with pytest.raises(ValueError, match=words):
            dataclasses.replace(sp, **kw)


def test_every_registered_method_trains_on_its_own_data():
    """Each registry entry: make_rollout draws its data kind, loss_options fits its loss, and
    the loss is a finite scalar with a gradient (OPDLM with the causal teacher it needs)."""
    m = tiny_model(seed=2)
    prompt, pattn, _ = padded_prompts([3, 5], seed=4)
    cfg, sp = copsd.MethodConfig(K=2), copsd.Sampler(gen_length=8, block_length=4, steps=4,
                                                     temperature=1.0)
    answers = torch.randint(0, VOCAB - 1, (2, 8), generator=gen(0))
    teacher = tiny_model(seed=3, causal=True)
    assert set(copsd.METHODS) == {"self", "sft", "copsd", "selfusion", "dopsd", "opdlm",
                                  "dparallel", "d3llm"}
    for name, method in copsd.METHODS.items():
        ro = copsd.make_rollout(name, m, prompt, pattn, MASK, sp, cfg, answers=answers,
                                generator=gen(1))
        assert len(ro) == 4 and (ro.states is not None) == (method.data == "trajectories")
        assert (ro.A is not None) == (method.data == "calibrated")
        extra = dict(teacher=teacher) if method.toy_only else {}
        loss, _ = method.loss(m, ro, MASK, generator=gen(2),
                              **copsd.loss_options(name, cfg, sp, **extra))
        assert loss.dim() == 0 and torch.isfinite(loss), name
        m.zero_grad()
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()), name
    assert copsd.loss_options("dopsd", cfg, sp)["block_length"] == 4  # two blocks
    one_block = dataclasses.replace(sp, block_length=8)
    assert copsd.loss_options("dopsd", cfg, one_block)["block_length"] is None


def test_decode_counts_leave_out_the_calls_a_finished_block_waits():
    """Two rows, blocks of 2, forwards (2, 1): row 0 finishes block 0 in one call and waits
    for row 1 (not counted); row 1 leaves one position masked. Tokens 4 and 3, calls 2 and 3."""
    a, M_ = 1, MASK
    states = torch.tensor([[[M_, M_, M_, M_], [a, a, M_, M_], [a, a, M_, M_], [a, a, a, a]],
                           [[M_, M_, M_, M_], [a, M_, M_, M_], [a, a, M_, M_], [a, a, a, M_]]])
    tokens, calls = copsd.decode_counts(states, [2, 1], 2, MASK)
    assert tokens.tolist() == [4, 3] and calls.tolist() == [2, 3]
    assert copsd.tokens_per_forward(states, [2, 1], 2, MASK) == pytest.approx(7 / 5)
