"""Shared by the test files: the repository root on sys.path (so `pytest` works from any
directory, not only `python -m pytest` from the root) and one tiny model config."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(1)  # tiny models: threads only add overhead on 2 shared cores

from model import LLaDA, ModelConfig  # noqa: E402

# the mask id sits past vocab_size (embedding_size pads it): the head never predicts M, so every
# token the sampler "unmasks" really leaves the mask state and counts are exact
VOCAB, MASK = 16, 17


def tiny_config(**kw):
    base = dict(d_model=32, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=64,
                vocab_size=VOCAB, embedding_size=MASK + 1, rope_theta=10000.0, rms_norm_eps=1e-5,
                max_sequence_length=64, mask_token_id=MASK, eos_token_id=0, pad_token_id=0)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed=0, std=None, **kw):
    """A random tiny LLaDA. `std` > the default 0.02 makes the predictions peaked (random models at
    std 0.02 are nearly uniform, so argmax/top-k would hinge on round-off)."""
    torch.manual_seed(seed)
    m = LLaDA(tiny_config(**kw))
    if std is not None:
        m.init_weights(std=std)
    return m.eval()


@pytest.fixture
def model():
    return tiny_model()


def stderr_lines(text):
    """Captured stderr as the lines a terminal shows: tqdm's redraws (carriage returns, cursor-up
    after a nested bar closes) end a line, so a message printed after them is its own line."""
    lines = text.replace("\x1b[A", "\n").splitlines()
    return [line.strip() for line in lines if line.strip()]
