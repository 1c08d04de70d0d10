"""
The LLaDA architecture at any size, and its checkpoints in LLaDA's own Hugging Face layout.

LLaDA is a LLaMA-style transformer without a causal mask: token embedding, blocks of
(RMSNorm -> attention with rotary q/k -> residual, RMSNorm -> SwiGLU MLP -> residual), a final
RMSNorm and an untied output head. The same class holds the 0.18M-parameter Sudoku model and
LLaDA-8B-Instruct; `load_weights` reads a toy checkpoint and the real 6-shard one alike, into a
plain module or into an FSDP2-sharded one (each rank then reads only its own rows).
"""

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

# ----------------------------------------------------------------------------------------------
# config


SIZES = ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "vocab_size",
         "embedding_size", "max_sequence_length")


@dataclass
class ModelConfig:
    # field names are LLaDA's config.json names, so that one file serves both
    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int = 32
    n_layers: int = 32
    mlp_hidden_size: int = 12288
    vocab_size: int = 126464
    embedding_size: int = 126464  # rows of wte / ff_out; may pad vocab_size up
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int = 126081
    causal: bool = False  # True only for OPDLM's autoregressive teacher; LLaDA itself is False
    extra: dict = field(default_factory=dict)  # every other config.json field, written back as read

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    def __post_init__(self):
        """A config.json that is not of LLaDA's shape fails here, in one line."""
        for f in fields(self):  # a float field takes an int (JSON may write 10000.0 as 10000)
            v = getattr(self, f.name)
            if (not isinstance(v, (int, float) if f.type is float else f.type)
                    or isinstance(v, bool) and f.type is not bool):
                raise ValueError(f"config: {f.name}={v!r} is not of type {f.type.__name__}")
        bad = [n for n in SIZES if getattr(self, n) < 1] + [
            n for n in ("rope_theta", "rms_norm_eps", "mask_token_id", "eos_token_id",
                        "pad_token_id") if not getattr(self, n) >= 0]
        if bad:
            raise ValueError(f"config: {', '.join(f'{n}={getattr(self, n)}' for n in bad)}: "
                             "sizes must be >= 1, the rest >= 0")
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"config: d_model={self.d_model} must divide by n_heads="
                             f"{self.n_heads}, and n_heads by n_kv_heads={self.n_kv_heads}")
        if self.embedding_size < self.vocab_size:
            raise ValueError(f"config: embedding_size={self.embedding_size} < "
                             f"vocab_size={self.vocab_size}")

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)} - {"extra"}
        if not isinstance(d, dict):
            raise ValueError(f"config: a JSON object of LLaDA's fields, not a {type(d).__name__}")
        try:
            return cls(**{k: v for k, v in d.items() if k in known},
                       extra={k: v for k, v in d.items() if k not in known})
        except TypeError as e:
            raise ValueError(f"config.json: {e}") from None

    def to_dict(self):
        # fields LLaDA's own modeling code reads; kept where a loaded config.json already had them
        llada = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "block_type": "llama",
                 "activation_type": "silu", "layer_norm_type": "rms", "rope": True, "alibi": False,
                 "weight_tying": False, "include_bias": False, "include_qkv_bias": False,
                 "scale_logits": False, "flash_attention": False}
        d = {**llada, **self.extra}
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        if not self.causal:
            d.pop("causal")  # LLaDA's config has no such field; only our AR teacher writes it
        return d


# ----------------------------------------------------------------------------------------------
# the network


class RMSNorm(nn.Module):
    """LLaDA's RMSNorm: normalise in float32, cast back, then scale (weight only, no bias)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


def rotary(pos, head_dim, theta):
    """cos, sin of the positions `pos` (S,), (S, head_dim), in the rotate-half layout LLaDA uses.
    Always float32, as LLaDA computes them: the angle is position x frequency, and bf16 (8
    significant bits) cannot even tell position 1000 from 1004."""
    even = torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32)
    inv_freq = 1.0 / theta ** (even / head_dim)
    freqs = torch.outer(pos.float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x, cos, sin):
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)  # gate, through SiLU
        self.up_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=False)

    def forward(self, x, cos, sin, attn_mask, kv=None, pos=None):
        """x: the hidden states of the positions `pos`. kv: this layer's cache, a list: the first
        (full) forward fills it with [keys, values] of the whole sequence; later calls write
        their positions' keys and values into it in place and attend to all of it (the rest of
        the sequence as it was cached)."""
        h = self.attn_norm(x)
        q = rearrange(self.q_proj(h), "b s (h d) -> b h s d", h=self.n_heads)
        k = rearrange(self.k_proj(h), "b s (h d) -> b h s d", h=self.n_kv_heads)
        v = rearrange(self.v_proj(h), "b s (h d) -> b h s d", h=self.n_kv_heads)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is not None and not kv:  # the first forward: cache the whole sequence
            kv += [k, v]
        elif kv is not None:  # refresh these positions of the cache, attend to all of it
            kv[0].index_copy_(2, pos, k)
            kv[1].index_copy_(2, pos, v)
            k, v = kv
        # no causal mask: every position sees every (non-padding) position; the AR teacher's
        # causal mask, if any, is already folded into attn_mask by the caller
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        x = x + self.attn_out(rearrange(y, "b h s d -> b s (h d)"))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.embedding_size, cfg.d_model),
            blocks=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers)),
            ln_f=RMSNorm(cfg.d_model, cfg.rms_norm_eps),
            ff_out=nn.Linear(cfg.d_model, cfg.embedding_size, bias=False),
        ))
        self.activation_checkpointing = False  # a run-time switch (train_llada.py --act_ckpt)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std=0.02):
        """Random init (also after meta-device construction + to_empty): N(0, std) matrices,
        output projections scaled by 1/sqrt(2 n_layers) as in GPT-2, norms at 1."""
        for name, p in self.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            elif name.endswith(("attn_out.weight", "ff_out.weight")) and "blocks" in name:
                p.normal_(0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                p.normal_(0.0, std)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self):
        return self.transformer.wte.weight.device

    def forward(self, idx, attention_mask=None, start=0, end=None, cache=None, pos=None):
        """idx (B, S) token ids; attention_mask (B, S) bool, False at padding (keys are masked,
        so padding never influences a real position). Returns float32 logits (B, end - start, V)
        for idx's positions start..end-1 only: the sampler and the losses need the response's
        (or one block's) logits, and the 126k-wide head is the largest matmul of LLaDA-8B.

        The sampler's K/V cache: `cache`, a dict, is filled with every layer's keys and values by
        a first, full forward; a later call gives idx = the tokens at the positions `pos` only
        (a start int, or a (W,) tensor), recomputes them, writes their keys and values into the
        cache in place and attends to the whole cached sequence (attention_mask covers all of
        it). Positions as a tensor let one captured CUDA graph serve every block."""
        B, S = idx.shape
        if cache is not None and (self.cfg.causal or (not cache and (torch.is_tensor(pos) or pos))):
            raise ValueError("the K/V cache is the bidirectional model's, first filled by a full "
                             "forward")
        if pos is None or isinstance(pos, int):
            pos = torch.arange(pos or 0, (pos or 0) + S, device=idx.device)
        x = self.transformer.wte(idx)
        cos, sin = rotary(pos, self.cfg.head_dim, self.cfg.rope_theta)
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, None, None, :].bool()  # (B, 1, 1, keys)
        if self.cfg.causal:
            tri = torch.ones(S, S, dtype=torch.bool, device=idx.device).tril()
            # a left-padding query row would see no key at all (NaN): let every row see itself
            eye = torch.eye(S, dtype=torch.bool, device=idx.device)
            mask = tri if mask is None else (mask & tri) | eye
        for i, block in enumerate(self.transformer.blocks):
            if cache is not None:
                x = block(x, cos, sin, mask, cache.setdefault(i, []), pos)
            elif self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask)
        logits = self.transformer.ff_out(self.transformer.ln_f(x[:, start:end]))
        if self.cfg.embedding_size > self.cfg.vocab_size:  # padded rows of the head are not tokens
            logits = logits[..., : self.cfg.vocab_size]
        return logits.float()


# ----------------------------------------------------------------------------------------------
# checkpoints: LLaDA's Hugging Face layout
#
#   config.json                                    LLaDA's field names
#   model.safetensors                              one file, or
#   model-0000K-of-0000N.safetensors + model.safetensors.index.json
#   tensor names: "model." + our state_dict names  (model.transformer.blocks.0.q_proj.weight, ...)

PREFIX = "model."
INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that is not what it claims: names the file and the tensor."""


def read_config(model_dir) -> ModelConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file (a model directory holds config.json and "
                              "safetensors)")
    try:
        with open(path) as f:
            return ModelConfig.from_dict(json.load(f))
    except (json.JSONDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def tensor_files(model_dir):
    """{tensor name: shard path} from the index, or from the single model.safetensors."""
    index = os.path.join(model_dir, INDEX)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = dict(json.load(f)["weight_map"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
        # a shard is a file of this directory: a name like ../x or /x would read from elsewhere
        bad = [s for s in weight_map.values()
               if not (isinstance(s, str) and re.fullmatch(r"[\w.-]+\.safetensors", s))]
        if bad:
            raise CheckpointError(f"{index}: shard {bad[0]!r} is not the name of a .safetensors "
                                  f"file in {model_dir}")
        out = {name: os.path.join(model_dir, shard) for name, shard in weight_map.items()}
    elif os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        path = os.path.join(model_dir, "model.safetensors")
        with open_shard(path) as f:
            out = {name: path for name in f.keys()}
    else:
        raise CheckpointError(f"{model_dir}: neither {INDEX} nor model.safetensors")
    for path in sorted(set(out.values())):
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: shard named in {INDEX} is missing")
    return out


def open_shard(path):
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # safetensors raises its own types for truncated/garbled headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


@torch.no_grad()
def load_weights(model: LLaDA, model_dir):
    """Strictly load a checkpoint into `model` (built from the same config, possibly on meta and
    then `to_empty`, possibly FSDP2-sharded). Each parameter is read on its own; for a sharded
    DTensor parameter only this rank's rows are read, so no process ever holds the full model."""
    files = tensor_files(model_dir)
    params = {PREFIX + n: p for n, p in model.named_parameters()}
    missing = sorted(set(params) - set(files))
    unexpected = sorted(set(files) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"{model_dir}: tensors do not match config.json: missing "
                              f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                              f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    by_file = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in sorted(by_file.items()):
        with open_shard(path) as f:
            stored = set(f.keys())
            if stored - set(names):
                raise CheckpointError(f"{path}: holds tensors the index does not place there: "
                                      f"{sorted(stored - set(names))[:5]}")
            for name in sorted(names):
                if name not in stored:
                    raise CheckpointError(f"{path}: tensor {name} is listed in the index but "
                                          "not in the file")
                param = params[name]
                sl = f.get_slice(name)
                shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                if shape != tuple(param.shape):
                    raise CheckpointError(f"{path}: tensor {name} has shape {list(shape)}, "
                                          f"config.json implies {list(param.shape)}")
                if dtype not in ("BF16", "F16", "F32", "F64"):
                    raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}, expected a "
                                          "float type")
                dst = param.to_local() if isinstance(param, DTensor) else param
                # FSDP2 shards dim 0 in torch.chunk pieces: rank r holds rows [r*c, r*c + len)
                rows = dst.shape[0]
                if isinstance(param, DTensor) and rows != shape[0]:
                    c = -(-shape[0] // param.device_mesh.size())
                    start = param.device_mesh.get_local_rank() * c
                    src = sl[start:start + rows]
                else:
                    src = sl[:]
                try:
                    dst.copy_(src)
                except RuntimeError as e:
                    msg = f"{path}: tensor {name} could not be read ({e})"
                    raise CheckpointError(msg) from None
                if not torch.isfinite(dst).all():  # it would train on silently, and score 0
                    raise CheckpointError(f"{path}: tensor {name} holds NaN or inf")
    return model


def from_pretrained(model_dir, device="cpu", dtype=torch.float32) -> LLaDA:
    """Build the model of `model_dir/config.json` and load its weights, never materialising
    random weights first (meta device + to_empty)."""
    cfg = read_config(model_dir)
    with torch.device("meta"):
        model = LLaDA(cfg).to(dtype)
    model.to_empty(device=device)
    return load_weights(model, model_dir)


def save_pretrained(model_dir, cfg: ModelConfig, state_dict, max_shard_bytes=5 * 2**30,
                    dtype=None):
    """Write config.json and safetensors in LLaDA's layout, atomically: everything goes to a
    temporary sibling directory which is then renamed into place. `state_dict` is our names ->
    full tensors (for FSDP, gathered by the caller). Files over `max_shard_bytes` are split into
    model-0000K-of-0000N.safetensors with an index, as Hugging Face does."""
    tmp = model_dir.rstrip("/") + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write_checkpoint(tmp, cfg, state_dict, max_shard_bytes, dtype)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, model_dir)


def write_checkpoint(tmp, cfg, state_dict, max_shard_bytes, dtype):
    tensors = {PREFIX + k: (v if dtype is None else v.to(dtype)).contiguous()
               for k, v in state_dict.items()}
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    else:
        n, weight_map = len(shards), {}
        for k, names in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{n:05d}.safetensors"
            save_file({m: tensors[m] for m in names}, os.path.join(tmp, fname),
                      metadata={"format": "pt"})
            weight_map.update({m: fname for m in names})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(tmp, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    any_t = next(iter(tensors.values()))
    d = cfg.to_dict()
    d["torch_dtype"] = str(any_t.dtype).removeprefix("torch.")
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(d, f, indent=2)


def replace_dir(tmp, final):
    """Rename `tmp` onto `final`. A directory cannot be renamed over a non-empty one, so an old
    `final` is first moved aside; a crash between the two renames leaves `final.old` intact."""
    old = final.rstrip("/") + ".old"
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# model FLOPs and bytes, counted from the shapes (as nanoGPT's estimate_mfu), and the ceilings of
# the GPUs they are measured against


def block_weights(c):
    """The weights each token is multiplied by in the blocks: q, k, v, out, and the MLP's three."""
    return c.n_layers * (c.d_model * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
                         + c.d_model ** 2 + 3 * c.d_model * c.mlp_hidden_size)


def forward_flops(c, rows, q, kv=None, head=0):
    """One forward of `rows` rows over q positions attending to kv keys (default q), the output
    head on `head` of them: 2 FLOPs per weight per token, 4 q kv d per layer for attention's two
    products, 2 d V per head position. A backward costs twice a forward."""
    kv = q if kv is None else kv
    return rows * (2 * q * block_weights(c) + 4 * c.n_layers * q * kv * c.d_model
                   + 2 * head * c.d_model * c.embedding_size)


def sampler_flops(c, sampler, rows, P, stats):
    """The model FLOPs of copsd.generate with `sampler` for `rows` responses after a prompt of
    width P, from its stats: per block, the model calls ("forwards") and those over the whole
    sequence ("full"); with a cache the others run the block and what follows it (prefix) or
    the block alone (dual), attending to all of it. The head runs on the block. Classifier-free
    guidance doubles the rows."""
    L, bl = sampler.gen_length, sampler.block_length
    S, total = P + L, 0
    rows *= 2 if sampler.cfg_scale > 0 else 1
    for b, (n, full) in enumerate(zip(stats["forwards"], stats["full"])):
        window = dict(none=S, prefix=S - P - b * bl, dual=bl)[sampler.cache]
        total += (full * forward_flops(c, rows, S, head=bl)
                  + (n - full) * forward_flops(c, rows, window, S, head=bl))
    return total


def sampler_bytes(c, sampler, rows, P, stats):
    """The fewest bytes copsd.generate moves (same arguments): every call reads the bf16 weights
    once (the embedding only at its rows), and a cached call reads the K/V cache of all
    P + gen_length positions (of twice the rows under classifier-free guidance)."""
    rows *= 2 if sampler.cfg_scale > 0 else 1
    weights = 2 * (block_weights(c) + c.d_model * c.embedding_size)
    kv = 2 * 2 * c.n_layers * rows * c.n_kv_heads * (P + sampler.gen_length) * c.head_dim
    n, full = sum(stats["forwards"]), sum(stats["full"])
    return n * weights + (0 if sampler.cache == "none" else (n - full) * kv)


# dense bf16 FLOP/s and memory bandwidth (bytes/s) per GPU, from the vendor's datasheet; the first
# key that is part of torch.cuda.get_device_name() wins (so the 40GB A100s before the 80GB's)
GPU_CEILINGS = {"H100": (989e12, 3.35e12),  # SXM (a PCIe or NVL card: give its own by hand)
                "H200": (989e12, 4.8e12),
                "A100-SXM4-40GB": (312e12, 1.555e12), "A100-PCIE-40GB": (312e12, 1.555e12),
                "A100": (312e12, 2.039e12),  # A100 80GB SXM
                "B200": (2.25e15, 8e12)}


def gpu_ceilings(name):
    """(peak FLOP/s, bytes/s) of the GPU called `name`, or (0, 0) for one not in GPU_CEILINGS."""
    return next((v for k, v in GPU_CEILINGS.items() if k in name), (0.0, 0.0))
