"""copsd.py, related methods: SelFusion, d-OPSD and OPDLM, each its defining property on a tiny
model (and the sampler's optional trajectory record they rely on)."""

import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)

import copsd  # noqa: E402
from copsd import Rollout  # noqa: E402
from test_copsd import FixedLogits  # noqa: E402
from model import LLaDA, ModelConfig  # noqa: E402

V, M = 12, 13  # vocab_size, mask id (past the head, as in LLaDA's padded embedding)
P, L = 4, 8


def tiny(seed=0, causal=False, std=0.2):
    torch.manual_seed(seed)
    m = LLaDA(ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=64,
                          vocab_size=V, embedding_size=M + 1, rope_theta=10000.0,
                          max_sequence_length=64, mask_token_id=M, eos_token_id=0, pad_token_id=0,
                          causal=causal))
    m.init_weights(std=std)  # peaked predictions, so argmax / top-k do not hinge on round-off
    return m


def prompts(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, V, (B, P), generator=g)
    attn = torch.ones(B, P, dtype=torch.bool)
    prompt[0, :2], attn[0, :2] = 0, False  # one left-padded row
    return prompt, attn


def rollout(model, B=3, steps=4, temperature=1.0, seed=0):
    """On-policy data: the final sequences, their attention mask, and the recorded trajectory
    (B, T + 1, P + L)."""
    prompt, pattn = prompts(B, seed)
    seq, states = copsd.generate(model, prompt, pattn, M, gen_length=L, block_length=L, steps=steps,
                                 temperature=temperature,
                                 generator=torch.Generator().manual_seed(seed), record=True)
    return seq, torch.cat([pattn, torch.ones(B, L, dtype=torch.bool)], 1), states


class Recorder(nn.Module):
    """Wraps a model; remembers each call's input, whether grad mode was on, and its output."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, idx, attention_mask=None, start=0, end=None):
        out = self.model(idx, attention_mask, start, end)
        self.calls.append(dict(idx=idx.clone(), grad=torch.is_grad_enabled(), out=out))
        return out


# ----------------------------------------------------------------------------------------------
# the sampler's trajectory record


def test_generate_record_is_the_trajectory_and_changes_nothing():
    model = tiny()
    prompt, pattn = prompts()
    g = lambda: torch.Generator().manual_seed(1)
    plain = copsd.generate(model, prompt, pattn, M, gen_length=L, block_length=L, steps=4,
                           temperature=1.0, generator=g())
    seq, states = copsd.generate(model, prompt, pattn, M, gen_length=L, block_length=L, steps=4,
                                 temperature=1.0, generator=g(), record=True)
    assert torch.equal(seq, plain)  # backward compatible: same samples with or without a record
    assert states.shape == (3, 4 + 1, P + L)  # batch-first
    states = states.unbind(1)
    assert (states[0][:, P:] == M).all() and torch.equal(states[-1], seq)
    for a, b in zip(states, states[1:]):
        newly = (a[:, P:] == M) & (b[:, P:] != M)
        assert (newly.sum(1) == L // 4).all()  # 2 tokens per step
        assert torch.equal(a[:, P:][a[:, P:] != M], b[:, P:][a[:, P:] != M])  # decoded tokens stay
        assert torch.equal(b[:, P:][b[:, P:] != M], seq[:, P:][b[:, P:] != M])


def test_kd_divergence_directions():
    g = torch.Generator().manual_seed(0)
    s = F.log_softmax(torch.randn(5, V, generator=g), -1)
    t = F.log_softmax(torch.randn(5, V, generator=g), -1)
    fwd = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)  # KL(t || s)
    rev = F.kl_div(t, s, reduction="none", log_target=True).sum(-1)
    assert torch.allclose(copsd.kd_divergence(s, t, 0.0), fwd, atol=1e-6)
    assert torch.allclose(copsd.kd_divergence(s, t, 1.0), rev, atol=1e-6)
    assert torch.allclose(copsd.kd_divergence(s, t, 0.5), copsd.kd_divergence(t, s, 0.5), atol=1e-6)
    assert (copsd.kd_divergence(s, t, 0.5) > 0).all()
    assert torch.allclose(copsd.kd_divergence(s, s, 0.3), torch.zeros(5), atol=1e-6)
    assert torch.allclose(copsd.kd_divergence(s, t, 0.0, top_k=V), fwd, atol=1e-6)
    # top-k: only the teacher's k best tokens, both renormalised over them
    k = copsd.kd_divergence(s, t, 0.0, top_k=3)
    idx = t.topk(3, -1).indices
    ref = F.kl_div(F.log_softmax(s.gather(-1, idx), -1), F.log_softmax(t.gather(-1, idx), -1),
                   reduction="none", log_target=True).sum(-1)
    assert torch.allclose(k, ref, atol=1e-6) and not torch.allclose(k, fwd, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# SelFusion


def test_selfusion_direction_flips_with_the_correct_mode():
    y = torch.tensor([[0, 1, 2, 3]])
    right = F.log_softmax(10 * F.one_hot(y, V).float(), -1)  # predicts y
    wrong = F.log_softmax(10 * F.one_hot((y + 1) % V, V).float(), -1)  # predicts something else
    mode = lambda ok: torch.where(torch.tensor(ok)[None, :, None], right, wrong)
    # positions: 0 only easy correct, 1 only hard correct, 2 both correct, 3 both wrong
    hard, easy = mode([False, True, True, False]), mode([True, False, True, False])
    e2h, h2e = copsd.selfusion_direction(hard, easy, y)
    assert e2h.tolist() == [[True, False, True, False]]
    assert h2e.tolist() == [[False, True, False, False]]
    # the correct modes swapped: so do the directions
    e2h, h2e = copsd.selfusion_direction(easy, hard, y)
    assert e2h.tolist() == [[False, True, True, False]]
    assert h2e.tolist() == [[True, False, False, False]]
    assert (copsd.selfusion_direction(hard, easy, y, "hard")[1].tolist()
            == [[False, True, True, False]])
    assert not copsd.selfusion_direction(hard, easy, y, "none")[0][0, 2]
    with pytest.raises(ValueError):
        copsd.selfusion_direction(hard, easy, y, "both")


class TwoModes(nn.Module):
    """A 'model' whose logits are one learnable table for fully masked (hard, t_hard = 1) rows and
    another for the rest (easy rows): the gradient shows which mode each KD term trains."""

    def __init__(self, hard, easy):
        super().__init__()
        self.hard, self.easy = nn.Parameter(hard.clone()), nn.Parameter(easy.clone())

    def forward(self, idx, attention_mask=None, start=0, end=None):
        is_hard = (idx[:, P:] == M).all(1)[:, None, None]
        return torch.where(is_hard, self.hard, self.easy).expand(idx.shape[0], -1, -1)


def test_selfusion_kd_direction_flips_in_the_loss():
    B = 4
    seq = torch.randint(1, V, (B, P + L), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(seq, dtype=torch.bool)
    y = seq[:, P:]
    good, bad = 5.0 * F.one_hot(y, V).float(), 5.0 * F.one_hot((y + 3) % V, V).float()
    # the same response in every row, so one logit table fits all rows of a mode
    seq[:] = seq[:1]
    good, bad = good[:1], bad[:1]
    grads = {}
    for name, (h, e) in dict(easy_right=(bad, good), hard_right=(good, bad)).items():
        m = TwoModes(h, e)
        loss, st = copsd.selfusion_loss(m, Rollout(seq, attn, P), M, t_hard=1.0, t_easy=0.5,
                                        generator=torch.Generator().manual_seed(3))
        assert 0 < st["n_tokens"] < B * L  # some positions masked in both views, not all
        loss.backward()
        grads[name] = (m.hard.grad.abs().sum().item(), m.easy.grad.abs().sum().item(), st)
    # easy right, hard wrong: the easy mode teaches (stop-gradient), so the easy table gets nothing
    h, e, st = grads["easy_right"]
    assert e == 0 and h > 0 and st["easy_teaches"] == 1 and st["hard_teaches"] == 0
    # the correct mode flipped: now the hard mode teaches and the easy table is what moves
    h, e, st = grads["hard_right"]
    assert e > 0 and st["hard_teaches"] == 1 and st["easy_teaches"] == 0


def test_selfusion_without_kd_is_the_mdm_loss():
    model = tiny()
    seq, attn, _ = rollout(model)
    ref, _ = copsd.mdm_loss(model, Rollout(seq, attn, P), M,
                            generator=torch.Generator().manual_seed(5))
    loss, _ = copsd.selfusion_loss(model, Rollout(seq, attn, P), M, kd_weight=0.0,
                                   generator=torch.Generator().manual_seed(5))
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6)


def test_selfusion_finite_and_backprops():
    model = tiny()
    seq, attn, _ = rollout(model)
    gt = torch.randint(1, V, (seq.shape[0], L))
    for targets in (None, gt):  # on-policy (default) and ground truth
        model.zero_grad()
        loss, st = copsd.selfusion_loss(model, Rollout(seq, attn, P), M, targets=targets,
                                        t_hard=0.9, t_easy=0.4,
                                        generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(loss) and st["kd"] >= 0
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        assert model.transformer.wte.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# d-OPSD


@pytest.mark.parametrize("suffix", [False, True])
def test_dopsd_teacher_sees_the_answer_student_does_not(suffix):
    model = tiny()
    seq, attn, states = rollout(model)
    rec = Recorder(model)
    loss, st = copsd.dopsd_loss(rec, Rollout(seq, attn, P, states), M, retain_ratio=0.5,
                                suffix=suffix, generator=torch.Generator().manual_seed(0))
    assert st["revealed"] > 0
    (teacher,) = [c for c in rec.calls if not c["grad"]]
    (student,) = [c for c in rec.calls if c["grad"]]
    n = states.shape[1] - 1
    x_in = states[:, :-1].transpose(0, 1).flatten(0, 1)  # rows (step, prompt)
    y = seq[:, P:].repeat(n, 1)
    assert torch.equal(student["idx"], x_in)  # the student: its own states, no answer
    t = teacher["idx"]
    if suffix:  # [prompt; state; answer suffix]: the state as the student saw it, then the answer
        assert t.shape[1] == P + 2 * L and torch.equal(t[:, :P + L], x_in)
        answer = t[:, P + L:]
    else:  # in place: the answer fills some of the student's masked future positions
        assert t.shape[1] == P + L and torch.equal(t[:, :P], x_in[:, :P])
        answer = t[:, P:]
        differs = answer != x_in[:, P:]
        assert (x_in[:, P:][differs] == M).all()
    shown = answer != M
    if suffix:
        assert shown.sum() == st["revealed"]
    # the self-answer
    assert torch.equal(answer[shown & (x_in[:, P:] == M)], y[shown & (x_in[:, P:] == M)])
    assert (shown & (x_in[:, P:] == M)).sum() == st["revealed"]
    # no gradient through the teacher pass; the student's pass carries it
    assert not teacher["out"].requires_grad and student["out"].requires_grad
    loss.backward()
    assert model.transformer.wte.weight.grad.abs().sum() > 0


def test_dopsd_teacher_view_reveals_only_the_future():
    model = tiny()
    seq, attn, states = rollout(model, steps=8)
    S = states.transpose(0, 1)  # (T + 1, B, P + L)
    x_in, x_out, y = S[:-1].flatten(0, 1), S[1:].flatten(0, 1), seq[:, P:].repeat(8, 1)
    answer = torch.zeros_like(y, dtype=torch.bool)
    answer[:, L // 2:] = True  # an "answer span": the second half of the response
    t, reveal = copsd.dopsd_teacher_view(x_in, x_out, y, P, M, answer, retain_ratio=0.5,
                                         generator=torch.Generator().manual_seed(0))
    future = (x_out[:, P:] == M) & answer
    assert not (reveal & ~future).any()  # never this step's tokens, never outside the answer span
    # exactly int(n * ratio)
    assert torch.equal(reveal.sum(1), (future.sum(1) * 0.5).floor().long())
    assert reveal.any() and torch.equal(t[:, P:][reveal], y[reveal])
    # the code's block rule: only blocks after the one being decoded
    t, reveal = copsd.dopsd_teacher_view(x_in, x_out, y, P, M, None, 1.0, block_length=4,
                                         generator=torch.Generator().manual_seed(0))
    first_block = (x_in[:, P:] == M).float().argmax(1) // 4
    pos_block = torch.arange(L)[None, :] // 4
    assert not (reveal & (pos_block <= first_block[:, None])).any() and reveal.any()
    assert copsd.dopsd_teacher_view(x_in, x_out, y, P, M, None, 0.0)[1].sum() == 0


def test_dopsd_is_step_level_and_gated_by_weight():
    model = tiny()
    seq, attn, states = rollout(model, steps=4)
    B = seq.shape[0]
    for select in ("student", "teacher"):
        loss, st = copsd.dopsd_loss(model, Rollout(seq, attn, P, states), M, select=select,
                                    generator=torch.Generator().manual_seed(0))
        # every step supervises as many positions as it decoded:
        # the whole response over the trajectory
        assert st["n_tokens"] == B * L and st["steps"] == 4 and torch.isfinite(loss) and loss > 0
    loss, st = copsd.dopsd_loss(model, Rollout(seq, attn, P, states), M, n_steps=1)
    assert st["n_tokens"] == B * L // 4  # one step: its 2 tokens per row
    zero, _ = copsd.dopsd_loss(model, Rollout(seq, attn, P, states), M, weight=torch.zeros(B))
    assert zero == 0  # only correct generations train (the weight gates the rest)
    with pytest.raises(ValueError):
        copsd.dopsd_loss(model, Rollout(seq, attn, P, states), M, select="random")


# ----------------------------------------------------------------------------------------------
# OPDLM


def ar_pair():
    teacher = tiny(seed=1, causal=True)
    student = tiny(seed=1, causal=False)
    student.load_state_dict(teacher.state_dict())  # the AR weights, bidirectional attention
    return teacher, student


def test_opdlm_teacher_is_causal_and_frozen():
    teacher, student = ar_pair()
    seq, attn, states = rollout(student)
    for n_states in (1, None):
        student.zero_grad(), teacher.zero_grad()
        loss, st = copsd.opdlm_loss(student, Rollout(seq, attn, P, states), M, teacher,
                                    n_states=n_states, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(loss) and loss > 0 and st["n_tokens"] > 0
        loss.backward()
        assert all(p.grad is None for p in teacher.parameters())  # frozen: no gradient reaches it
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in student.parameters())
        assert student.transformer.wte.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError):  # a bidirectional "teacher" is not the AR model
        copsd.opdlm_loss(student, Rollout(seq, attn, P, states), M, student)


class Fixed(nn.Module):
    """A 'student' that outputs fixed response logits whatever its input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, idx, attention_mask=None, start=0, end=None):
        return self.logits.repeat(idx.shape[0] // self.logits.shape[0], 1, 1)


def test_opdlm_targets_are_the_teachers_next_token_logits():
    teacher, student = ar_pair()
    seq, attn, states = rollout(student)
    kw = dict(n_states=None, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        shifted = teacher(seq, attn, start=P - 1)[:, :L]  # output at j-1 predicts response token j
        same = teacher(seq, attn, start=P)  # output at j (predicts token j+1)
    loss, _ = copsd.opdlm_loss(Fixed(shifted), Rollout(seq, attn, P, states), M, teacher, **kw)
    assert loss.abs() < 1e-5
    loss, _ = copsd.opdlm_loss(Fixed(same), Rollout(seq, attn, P, states), M, teacher, **kw)
    assert loss > 1e-2
    # causal: the target of token j never sees token j or later,
    # so the last token changes nothing ...
    last = seq.clone()
    last[:, -1] = (last[:, -1] + 1) % V
    loss, _ = copsd.opdlm_loss(Fixed(shifted), Rollout(last, attn, P, states), M, teacher, **kw)
    assert loss.abs() < 1e-5
    # ... while the first response token is the context of every later target
    first = seq.clone()
    first[:, P] = (first[:, P] + 1) % V
    loss, _ = copsd.opdlm_loss(Fixed(shifted), Rollout(first, attn, P, states), M, teacher, **kw)
    assert loss > 1e-4


# ----------------------------------------------------------------------------------------------
# the field's parallel-decoding distillations (dParallel, d3LLM) and their metric, AUP


def test_certainty_term_lowers_the_entropy_where_it_targets_and_only_there():
    """The entropy term's gradient (the loss with weight w less the loss with weight 0, same
    draws) is zero at every position but the masked ones the model predicts right, and a small
    step against it lowers the entropy at exactly those."""
    B, P_, L_ = 4, 3, 8
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, V, (B, P_ + L_), generator=g)
    logits = torch.randn(B, P_ + L_, V, generator=g)
    logits[:B // 2, P_:].scatter_(-1, seq[:B // 2, P_:, None], 2.5)  # half the rows: right
    ro = Rollout(seq, None, P_)

    student = FixedLogits(logits)

    def loss(weight):
        return copsd.certainty_loss(student, ro, M, block_length=4, weight=weight,
                                    generator=torch.Generator().manual_seed(3))[0]

    (loss(2.0) - loss(0.0)).backward()
    grad = student.logits.grad[:, P_:]  # only the entropy term's (the CE's cancels)
    views = [idx[:, P_:] == M for idx in student.inputs[0].chunk(2)]  # the two views' masks
    right = logits[:, P_:].argmax(-1) == seq[:, P_:]
    targeted = (views[0] ^ views[1]) & right  # the drawn block's (later blocks: in both)
    assert targeted.any() and (~targeted).any()
    assert (grad[~targeted] == 0).all() and (grad[targeted].abs().sum(-1) > 0).all()
    ent = lambda x: -(F.softmax(x / 0.5, -1) * F.log_softmax(x / 0.5, -1)).sum(-1)
    after = logits[:, P_:] - 0.1 * grad
    assert (ent(after)[targeted] < ent(logits[:, P_:])[targeted]).all()
    assert torch.equal(ent(after)[~targeted], ent(logits[:, P_:])[~targeted])


def test_d3llm_reveals_the_earliest_decoded_tokens_of_its_block():
    """The first view keeps the block's (1 - t) B earliest-decoded tokens and masks the rest
    (the loss's positions); the complementary view the reverse; other blocks: clean before,
    masked after. The trajectory decodes one known position per step."""
    B, L_, bl = 3, 8, 4
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, V, (B, P + L_), generator=g)
    order = torch.stack([torch.randperm(L_, generator=g) for _ in range(B)])  # step of each
    states = torch.stack([torch.where(order < s, seq[:, P:], M) for s in range(L_ + 1)], 1)
    states = torch.cat([seq[:, None, :P].expand(-1, L_ + 1, -1), states], -1)
    ro = Rollout(seq, None, P, states)
    rec = Recorder(FixedLogits(torch.zeros(B, P + L_, V)))
    copsd.d3llm_loss(rec, ro, M, block_length=bl, t_min=0.5, t_max=0.5,
                     generator=torch.Generator().manual_seed(2))
    first, second = (x[:, P:] for x in rec.calls[0]["idx"].chunk(2))
    for r in range(B):
        blk = int((first[r] == M).logical_xor(second[r] == M).nonzero()[0]) // bl
        span = slice(blk * bl, (blk + 1) * bl)
        assert (first[r, :blk * bl] == seq[r, P:P + blk * bl]).all()
        assert (first[r, (blk + 1) * bl:] == M).all() and (second[r, (blk + 1) * bl:] == M).all()
        shown = first[r, span] != M
        assert int(shown.sum()) == 2  # (1 - 0.5) x 4
        o = order[r, span]
        assert set(o[shown].tolist()) == set(o.sort().values[:2].tolist())  # the earliest two
        assert torch.equal(second[r, span] != M, ~shown)


def test_aup_on_a_hand_computed_curve():
    """d3LLM's AUP: rectangle at the first point, then trapezoids of y W(y); points more than 5
    below the first left out. By hand: W(78) = exp(-3 x 0.025) = 0.92774, so (1, 80), (2, 78),
    (4, 70) at y_max 80 gives 80 + 0.5 (80 + 72.364) = 156.18 (70 < 75 is left out), 276.66
    with it (W(70) = exp(-0.375)). The leaderboard's LLaDA rows (y_max 74.98): dParallel 358.1,
    d3LLM 637.7."""
    curve = [(4, 70), (1, 80), (2, 78)]  # any order
    assert copsd.aup(curve, 80) == pytest.approx(156.182, abs=1e-3)
    assert copsd.aup(curve, 80, max_drop=100) == pytest.approx(276.656, abs=1e-3)
    assert copsd.aup([(1, 74.0), (5.14, 72.63)], 74.98) == pytest.approx(358.1, abs=0.05)
    assert copsd.aup([(1, 74.02), (9.11, 73.09)], 74.98) == pytest.approx(637.7, abs=0.05)
    assert copsd.aup([(1.0, 72.55)]) == 72.55  # one point: its accuracy
