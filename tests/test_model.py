"""model.py: the LLaDA architecture and its checkpoints in LLaDA's Hugging Face layout."""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import model as M
from model import LLaDA
from conftest import MASK, VOCAB, tiny_config, tiny_model


def rand_ids(B, S, seed=0):
    return torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# the network


def test_output_shape_and_dtype(model):
    idx = rand_ids(3, 11)
    logits = model(idx)
    assert logits.shape == (3, 11, VOCAB)  # vocab_size columns, not embedding_size
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    # the bf16 model still returns float32 logits
    assert model.to(torch.bfloat16)(idx).dtype == torch.float32


def test_grouped_query_heads_equal_repeated_kv():
    gqa = tiny_model(n_heads=4, n_kv_heads=2)
    cfg = gqa.cfg
    blk = gqa.transformer.blocks[0]
    hd = cfg.d_model // cfg.n_heads
    assert blk.q_proj.weight.shape == (4 * hd, cfg.d_model)
    assert blk.k_proj.weight.shape == (2 * hd, cfg.d_model)
    assert blk.v_proj.weight.shape == (2 * hd, cfg.d_model)
    # the same network written as full multi-head attention: kv head j serves query heads 2j, 2j+1
    mha = tiny_model(n_heads=4, n_kv_heads=4)
    sd = gqa.state_dict()
    for k, v in list(sd.items()):
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            sd[k] = v.view(2, hd, cfg.d_model).repeat_interleave(2, 0).reshape(4 * hd, cfg.d_model)
    mha.load_state_dict(sd)
    idx = rand_ids(2, 9)
    torch.testing.assert_close(gqa(idx), mha(idx), rtol=1e-5, atol=1e-5)


def test_bidirectional_no_causal_mask(model):
    idx = rand_ids(1, 10)
    changed = idx.clone()
    changed[0, -1] = (idx[0, -1] + 1) % VOCAB
    a, b = model(idx), model(changed)
    # a later token changes every earlier position's logits
    assert ((a - b).abs().amax(-1)[0, :-1] > 1e-6).all()


def test_causal_flag_blocks_later_tokens():
    m = tiny_model(causal=True)
    idx = rand_ids(1, 10)
    changed = idx.clone()
    changed[0, -1] = (idx[0, -1] + 1) % VOCAB
    a, b = m(idx), m(changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=0, atol=0)
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-6
    # causal + padding: left padding stays invisible to the real positions
    pad = torch.cat([torch.zeros(1, 3, dtype=torch.long), idx], 1)
    am = torch.cat([torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, 10, dtype=torch.bool)], 1)
    out = m(pad, am)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 3:], a, rtol=1e-4, atol=1e-5)


def test_left_padding_is_invisible(model):
    real = rand_ids(1, 9, seed=1)
    n_pad = 4
    solo = model(real)
    # two different pad contents: neither may change the real positions (RoPE is relative, so the
    # left shift keeps the scores between real tokens)
    for pad_tok in (0, 7):
        idx = torch.cat([torch.full((1, n_pad), pad_tok), real], 1)
        am = torch.cat([torch.zeros(1, n_pad, dtype=torch.bool),
                        torch.ones(1, 9, dtype=torch.bool)], 1)
        out = model(idx, am)
        torch.testing.assert_close(out[:, n_pad:], solo, rtol=1e-4, atol=1e-5)
    # and without the mask the padding does leak in (the test above can fail)
    idx = torch.cat([torch.full((1, n_pad), 7), real], 1)
    assert (model(idx)[:, n_pad:] - solo).abs().max() > 1e-5


def test_batched_rows_with_different_padding(model):
    a, b = rand_ids(1, 6, seed=2), rand_ids(1, 9, seed=3)
    idx = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), a], 1), b])
    am = idx.new_ones(idx.shape, dtype=torch.bool)
    am[0, :3] = False
    out = model(idx, am)
    torch.testing.assert_close(out[0:1, 3:], model(a), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1:2], model(b), rtol=1e-4, atol=1e-5)


def test_start_returns_tail(model):
    idx = rand_ids(2, 12)
    full = model(idx)
    for start in (0, 5, 11):
        tail = model(idx, start=start)
        assert tail.shape == (2, 12 - start, VOCAB)
        torch.testing.assert_close(tail, full[:, start:], rtol=1e-5, atol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError):
        tiny_config(n_heads=3)  # 32 % 3
    with pytest.raises(ValueError):
        tiny_config(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError):
        tiny_config(embedding_size=VOCAB - 1)
    # a config.json with a string where a number belongs, a negative size, or not an object
    for bad in [dict(d_model="32"), dict(n_layers=-1), dict(mlp_hidden_size=0),
                dict(causal="yes"), dict(n_kv_heads=None), dict(rope_theta=-1.0)]:
        with pytest.raises(ValueError, match=f"{next(iter(bad))}="):
            tiny_config(**bad)
    assert tiny_config(rope_theta=10000).rope_theta == 10000  # JSON may write a float as an int
    with pytest.raises(ValueError, match="not a list"):
        M.ModelConfig.from_dict([1, 2])


# ----------------------------------------------------------------------------------------------
# checkpoints


def llada_names(cfg):
    """LLaDA's tensor names and shapes (its Hugging Face checkpoint), written out independently of
    model.py."""
    d, hd, h = cfg.d_model, cfg.d_model // cfg.n_heads, cfg.mlp_hidden_size
    out = {"model.transformer.wte.weight": (cfg.embedding_size, d),
           "model.transformer.ln_f.weight": (d,),
           "model.transformer.ff_out.weight": (cfg.embedding_size, d)}
    for i in range(cfg.n_layers):
        p = f"model.transformer.blocks.{i}."
        out.update({p + "attn_norm.weight": (d,), p + "q_proj.weight": (cfg.n_heads * hd, d),
                    p + "k_proj.weight": (cfg.n_kv_heads * hd, d),
                    p + "v_proj.weight": (cfg.n_kv_heads * hd, d), p + "attn_out.weight": (d, d),
                    p + "ff_norm.weight": (d,), p + "ff_proj.weight": (h, d),
                    p + "up_proj.weight": (h, d), p + "ff_out.weight": (d, h)})
    return out


def stored_tensors(path):
    """{name: shape} over every safetensors file of a checkpoint directory."""
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), framework="pt") as st:
                for k in st.keys():
                    assert k not in out, f"{k} stored twice"
                    out[k] = tuple(st.get_slice(k).get_shape())
    return out


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture
def gqa_model():
    return tiny_model(n_heads=4, n_kv_heads=2, seed=3)


def test_save_load_single_file(tmp_path, gqa_model):
    path = str(tmp_path / "ckpt")
    M.save_pretrained(path, gqa_model.cfg, gqa_model.state_dict())
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    assert stored_tensors(path) == llada_names(gqa_model.cfg)
    loaded = M.from_pretrained(path)
    assert loaded.cfg.n_kv_heads == 2 and loaded.cfg.mask_token_id == MASK
    assert_same_weights(gqa_model, loaded)
    idx = rand_ids(2, 7)
    torch.testing.assert_close(loaded.eval()(idx), gqa_model(idx), rtol=0, atol=0)
    cfg = json.load(open(os.path.join(path, "config.json")))
    for k in ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "vocab_size",
              "embedding_size", "rope_theta", "rms_norm_eps", "max_sequence_length",
              "mask_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[k] == getattr(gqa_model.cfg, k), k
    assert "causal" not in cfg  # LLaDA's config has no such field


def test_save_load_sharded(tmp_path, gqa_model):
    path = str(tmp_path / "ckpt")
    M.save_pretrained(path, gqa_model.cfg, gqa_model.state_dict(), max_shard_bytes=20_000)
    files = sorted(os.listdir(path))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors" not in files
    n = len(shards)
    assert shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    index = json.load(open(os.path.join(path, M.INDEX)))
    names = llada_names(gqa_model.cfg)
    assert set(index["weight_map"]) == set(names)
    assert set(index["weight_map"].values()) == set(shards)
    assert stored_tensors(path) == names
    # each tensor sits in the shard the index names
    for shard in shards:
        with safe_open(os.path.join(path, shard), framework="pt") as st:
            assert all(index["weight_map"][k] == shard for k in st.keys())
    assert index["metadata"]["total_size"] == 4 * sum(p.numel() for p in gqa_model.parameters())
    loaded = M.from_pretrained(path)
    assert_same_weights(gqa_model, loaded)


def test_bf16_round_trip(tmp_path, model):
    path = str(tmp_path / "ckpt")
    M.save_pretrained(path, model.cfg, model.state_dict(), dtype=torch.bfloat16)
    assert json.load(open(os.path.join(path, "config.json")))["torch_dtype"] == "bfloat16"
    loaded = M.from_pretrained(path, dtype=torch.bfloat16)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16)), k


def test_unknown_config_fields_are_kept(tmp_path, model):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    M.save_pretrained(a, model.cfg, model.state_dict())
    cfg_path = os.path.join(a, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["my_custom_field"] = {"x": [1, 2]}
    cfg["use_cache"] = False
    json.dump(cfg, open(cfg_path, "w"))
    loaded = M.from_pretrained(a)
    M.save_pretrained(b, loaded.cfg, loaded.state_dict())
    out = json.load(open(os.path.join(b, "config.json")))
    assert out["my_custom_field"] == {"x": [1, 2]}
    assert out["use_cache"] is False
    assert out["d_model"] == model.cfg.d_model


def test_atomic_save_over_existing(tmp_path):
    path = str(tmp_path / "ckpt")
    first, second = tiny_model(seed=1), tiny_model(seed=2)
    M.save_pretrained(path, first.cfg, first.state_dict(), max_shard_bytes=20_000)  # sharded ...
    M.save_pretrained(path, second.cfg, second.state_dict())  # ... replaced by a single file
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]  # no stale shards
    assert os.listdir(tmp_path) == ["ckpt"]  # no .tmp / .old leftovers
    assert_same_weights(second, M.from_pretrained(path))


def test_failed_save_keeps_old_checkpoint(tmp_path, model):
    path = str(tmp_path / "ckpt")
    M.save_pretrained(path, model.cfg, model.state_dict())
    bad = dict(model.state_dict())
    bad["transformer.ln_f.weight"] = "not a tensor"
    with pytest.raises(Exception):
        M.save_pretrained(path, model.cfg, bad)
    assert_same_weights(model, M.from_pretrained(path))


# strict loading: each broken checkpoint raises CheckpointError naming what is wrong


@pytest.fixture
def saved(tmp_path, model):
    path = str(tmp_path / "ckpt")
    M.save_pretrained(path, model.cfg, model.state_dict())
    return path


def rewrite_tensors(path, fn):
    f = os.path.join(path, "model.safetensors")
    t = load_file(f)
    fn(t)
    save_file(t, f, metadata={"format": "pt"})


def load_error(path):
    with pytest.raises(M.CheckpointError) as e:
        M.from_pretrained(path)
    return str(e.value)


def test_error_missing_tensor(saved):
    name = "model.transformer.blocks.1.up_proj.weight"
    rewrite_tensors(saved, lambda t: t.pop(name))
    msg = load_error(saved)
    assert name in msg and "missing" in msg


def test_error_unexpected_tensor(saved):
    name = "model.transformer.blocks.0.extra.weight"
    rewrite_tensors(saved, lambda t: t.__setitem__(name, torch.zeros(3)))
    msg = load_error(saved)
    assert name in msg and "unexpected" in msg


def test_error_wrong_shape(saved):
    name = "model.transformer.blocks.0.k_proj.weight"
    rewrite_tensors(saved, lambda t: t.__setitem__(name, torch.zeros(8, 32)))
    msg = load_error(saved)
    assert name in msg and "[8, 32]" in msg and "[32, 32]" in msg


def test_error_non_float_dtype(saved):
    name = "model.transformer.ln_f.weight"
    rewrite_tensors(saved, lambda t: t.__setitem__(name, torch.ones(32, dtype=torch.int32)))
    msg = load_error(saved)
    assert name in msg and "I32" in msg


def test_error_config_disagrees_with_tensors(saved):
    cfg_path = os.path.join(saved, "config.json")
    cfg = json.load(open(cfg_path))
    json.dump({**cfg, "n_layers": 3}, open(cfg_path, "w"))
    msg = load_error(saved)
    assert "model.transformer.blocks.2." in msg and "missing" in msg
    json.dump({**cfg, "n_layers": 1}, open(cfg_path, "w"))
    msg = load_error(saved)
    assert "model.transformer.blocks.1." in msg and "unexpected" in msg
    json.dump({**cfg, "mlp_hidden_size": 48}, open(cfg_path, "w"))
    msg = load_error(saved)
    assert "ff_proj.weight" in msg or "up_proj.weight" in msg or "ff_out.weight" in msg
    assert "[48, 32]" in msg or "[32, 48]" in msg


def test_error_missing_config(saved):
    os.remove(os.path.join(saved, "config.json"))
    assert "config.json" in load_error(saved)


def test_error_invalid_config(saved):
    cfg_path = os.path.join(saved, "config.json")
    cfg = json.load(open(cfg_path))
    json.dump({**cfg, "n_heads": 5}, open(cfg_path, "w"))  # 32 % 5
    assert "config.json" in load_error(saved)


def test_error_no_weights(saved):
    os.remove(os.path.join(saved, "model.safetensors"))
    assert "model.safetensors" in load_error(saved)


def test_error_truncated_file(saved):
    f = os.path.join(saved, "model.safetensors")
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 64)
    assert "model.safetensors" in load_error(saved)


@pytest.fixture
def sharded(tmp_path, model):
    path = str(tmp_path / "ckpt")
    M.save_pretrained(path, model.cfg, model.state_dict(), max_shard_bytes=20_000)
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    assert len(shards) >= 3
    return path, shards


def test_error_missing_shard(sharded):
    path, shards = sharded
    os.remove(os.path.join(path, shards[1]))
    msg = load_error(path)
    assert shards[1] in msg and "missing" in msg


def test_error_truncated_shard(sharded):
    path, shards = sharded
    f = os.path.join(path, shards[-1])
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    assert shards[-1] in load_error(path)


def test_error_index_names_tensor_absent_from_shard(sharded):
    path, shards = sharded
    index_path = os.path.join(path, M.INDEX)
    index = json.load(open(index_path))
    # point one tensor at a shard that does not hold it
    name, shard = next((k, v) for k, v in index["weight_map"].items() if v != shards[0])
    index["weight_map"][name] = shards[0]
    json.dump(index, open(index_path, "w"))
    msg = load_error(path)
    assert name in msg and shards[0] in msg


# ----------------------------------------------------------------------------------------------
# the sampler's K/V cache


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_kv_cache_shapes_and_exact_window_recompute(n_kv_heads):
    """A full forward fills one (keys, values) pair per layer, (B, n_kv_heads, S, head_dim); a
    window recomputed from that cache, with nothing changed, gives the full forward's logits
    (positions, RoPE offsets and the in-place writes line up), with and without padding."""
    torch.manual_seed(0)
    m = LLaDA(tiny_config(n_kv_heads=n_kv_heads)).eval()
    B, S = 3, 20
    idx = torch.randint(0, VOCAB, (B, S))
    attn = torch.ones(B, S, dtype=torch.bool)
    attn[0, :4] = False
    for mask in (None, attn):
        cache = {}
        with torch.no_grad():
            full = m(idx, mask, cache=cache)
            assert sorted(cache) == list(range(m.cfg.n_layers))
            for k, v in cache.values():
                assert k.shape == v.shape == (B, n_kv_heads, S, m.cfg.head_dim)
            for lo, hi in [(8, 12), (8, S), (0, 5)]:
                window = m(idx[:, lo:hi], mask, cache=cache, pos=lo)
                torch.testing.assert_close(window, full[:, lo:hi], rtol=1e-5, atol=1e-5)
            # a changed token changes the window's own keys in the cache, nothing else
            before = [k.clone() for k, _ in cache.values()]
            changed = idx.clone()
            changed[:, 9] = (changed[:, 9] + 1) % VOCAB
            m(changed[:, 8:12], mask, cache=cache, pos=8)
            for (k, _), k0 in zip(cache.values(), before):
                assert torch.equal(k[:, :, :8], k0[:, :, :8])
                assert torch.equal(k[:, :, 12:], k0[:, :, 12:])
                assert not torch.equal(k[:, :, 9], k0[:, :, 9])
    with pytest.raises(ValueError):
        m(idx[:, 8:], cache={}, pos=8)  # a cache is filled by a full forward


def test_error_garbage_index(sharded):
    path, _ = sharded
    for text in ["{not json", "[1, 2]", '{"weight_map": 3}', "\udcff"]:
        with open(os.path.join(path, M.INDEX), "w", errors="surrogateescape") as f:
            f.write(text)
        assert M.INDEX in load_error(path)


def test_error_shard_outside_the_directory(sharded, tmp_path):
    """An index names files of its own directory only: ../ or an absolute path would read another
    checkpoint's (or any) file."""
    path, shards = sharded
    index_path = os.path.join(path, M.INDEX)
    index = json.load(open(index_path))
    shutil.copytree(path, str(tmp_path / "other"))
    for outside in [f"../other/{shards[0]}", str(tmp_path / "other" / shards[0])]:
        name = next(k for k, v in index["weight_map"].items() if v == shards[0])
        json.dump({**index, "weight_map": {**index["weight_map"], name: outside}},
                  open(index_path, "w"))
        msg = load_error(path)
        assert outside in msg and "not the name of a .safetensors file" in msg


def test_error_non_finite_tensor(saved):
    """A NaN in a checkpoint is refused on load (it would train on silently and score 0)."""
    name = "model.transformer.blocks.0.q_proj.weight"
    rewrite_tensors(saved, lambda t: t[name].__setitem__((3, 4), float("nan")))
    msg = load_error(saved)
    assert name in msg and "NaN" in msg
