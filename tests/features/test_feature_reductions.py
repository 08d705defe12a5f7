"""Capture-time reductions against hand-written formulas, and their use inside hooks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from distillx.features import (REDUCTIONS, ChannelStats, FeatureExtractor, FeatureSpec, adaptive_pool,
                               attention_map, channel_stats, chunk, l2_normalize, masked_mean)

from .models import ConvNet


@pytest.fixture
def fmap():
    torch.manual_seed(0)
    return torch.randn(3, 5, 4, 6, dtype=torch.float64)


def _attention_by_hand(f, p):
    B, C, H, W = f.shape
    out = torch.empty(B, H * W, dtype=f.dtype)
    for b in range(B):
        a = torch.zeros(H, W, dtype=f.dtype)
        for c in range(C):
            a += f[b, c].abs() ** p
        a = (a / C).reshape(-1)
        out[b] = a / a.pow(2).sum().sqrt()
    return out


@pytest.mark.parametrize("p", [2, 1, 3.5])
def test_attention_map_formula(fmap, p):
    a = attention_map(fmap, p=p)
    torch.testing.assert_close(a, _attention_by_hand(fmap, p))
    torch.testing.assert_close(a.norm(dim=1), torch.ones(3, dtype=fmap.dtype))


def test_attention_map_on_tokens_and_with_pooling(fmap):
    tokens = fmap.flatten(2).transpose(1, 2)  # (B, L=H*W, D=C)
    torch.testing.assert_close(attention_map(tokens, channel_dim=-1), _attention_by_hand(fmap, 2))
    pooled = attention_map(fmap, size=(2, 3))
    energy = fmap.pow(2).mean(1)  # (B, 4, 6) -> 2x2 windows -> (B, 2, 3)
    windows = energy.reshape(3, 2, 2, 3, 2).mean(dim=(2, 4)).reshape(3, -1)
    torch.testing.assert_close(pooled, windows / windows.norm(dim=1, keepdim=True))
    with pytest.raises(ValueError, match="p must be a finite number > 0"):
        attention_map(fmap, p=0)
    with pytest.raises(ValueError, match="at least 3 dims"):
        attention_map(fmap[:, :, 0, 0])
    with pytest.raises(ValueError, match="channel_dim must not be the batch dim"):
        attention_map(fmap, channel_dim=0)


def test_adaptive_pool_formula(fmap):
    y = adaptive_pool(fmap, output_size=(2, 3))
    by_hand = fmap.reshape(3, 5, 2, 2, 3, 2).mean(dim=(3, 5))
    torch.testing.assert_close(y, by_hand)
    torch.testing.assert_close(adaptive_pool(fmap), fmap.mean(dim=(2, 3), keepdim=True))
    torch.testing.assert_close(adaptive_pool(fmap, flatten=True), fmap.mean(dim=(2, 3)))
    tokens = torch.randn(2, 6, 4)  # (B, L, D): pool the 6 tokens into 2 groups of 3, channels first
    torch.testing.assert_close(adaptive_pool(tokens, output_size=2, channel_dim=-1),
                               tokens.reshape(2, 2, 3, 4).mean(2).transpose(1, 2))


@pytest.mark.parametrize("unbiased", [False, True])
def test_channel_stats_formula(fmap, unbiased):
    stats = channel_stats(fmap, unbiased=unbiased)
    assert isinstance(stats, ChannelStats) and stats.mean.shape == stats.var.shape == (5,)
    for c in range(5):
        values = fmap[:, c].reshape(-1)
        n = values.numel()
        mean = values.sum() / n
        var = ((values - mean) ** 2).sum() / (n - 1 if unbiased else n)
        torch.testing.assert_close(stats.mean[c], mean)
        torch.testing.assert_close(stats.var[c], var)
    mean, var = channel_stats(fmap.permute(0, 2, 3, 1), channel_dim=-1, unbiased=unbiased)  # unpacks as a tuple
    torch.testing.assert_close(mean, stats.mean)
    torch.testing.assert_close(var, stats.var)


def test_l2_normalize_formula(fmap):
    y = l2_normalize(fmap)
    flat = fmap.reshape(3, -1)
    torch.testing.assert_close(y, flat / (flat ** 2).sum(1, keepdim=True).sqrt())
    zero = l2_normalize(torch.zeros(2, 3))
    assert torch.equal(zero, torch.zeros(2, 3))  # eps keeps all-zero rows finite


def test_low_precision_inputs_keep_their_dtype_and_match_float32(fmap):
    x = fmap.to(torch.bfloat16)
    ref = x.float()
    tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, C): the token reductions' input
    for name, fn in REDUCTIONS.items():
        args = {"masked_mean": (), "chunk": (5, 2)}.get(name)
        got, want = (fn(x), fn(ref)) if args is None else (fn(tokens, *args), fn(tokens.float(), *args))
        got, want = (got, want) if isinstance(got, torch.Tensor) else (got.var, want.var)
        assert got.dtype == torch.bfloat16, name
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2, msg=name)


def test_reductions_registry_is_read_only():
    assert set(REDUCTIONS) == {"attention_map", "adaptive_pool", "channel_stats", "l2_normalize", "masked_mean", "chunk"}
    with pytest.raises(TypeError):
        REDUCTIONS["mine"] = l2_normalize


def test_hook_stores_only_the_reduced_feature():
    torch.manual_seed(0)
    net = ConvNet()
    x = torch.randn(2, 3, 8, 8)
    specs = {"raw": "layer1",
             "at": FeatureSpec("layer1", reduction="attention_map", reduction_kwargs={"p": 2}),
             "pool": FeatureSpec("layer1", reduction="adaptive_pool", reduction_kwargs={"output_size": 2}),
             "stats": FeatureSpec("layer1", reduction="channel_stats"),
             "norm": FeatureSpec("layer1", reduction="l2_normalize"),
             "custom": FeatureSpec("layer1", reduction=lambda f, k: f[:, :k].sum(1), reduction_kwargs={"k": 2})}
    with FeatureExtractor(net, specs) as ex:
        net(x)
    f = ex["raw"]
    assert f.shape == (2, 6, 8, 8)
    assert ex["at"].shape == (2, 64)
    torch.testing.assert_close(ex["at"], attention_map(f, p=2))
    assert ex["pool"].shape == (2, 6, 2, 2)
    torch.testing.assert_close(ex["pool"], f.reshape(2, 6, 2, 4, 2, 4).mean(dim=(3, 5)))
    torch.testing.assert_close(ex["stats"].mean, f.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(ex["stats"].var, f.var(dim=(0, 2, 3), unbiased=False))
    torch.testing.assert_close(ex["norm"], nn.functional.normalize(f.flatten(1), dim=1))
    torch.testing.assert_close(ex["custom"], f[:, 0] + f[:, 1])


def test_reduction_errors_inside_the_hook_name_the_feature():
    net = ConvNet()
    with FeatureExtractor(net, {"bad": FeatureSpec("fc", reduction="attention_map")}, name="student"), \
            pytest.raises(Exception, match=r"student model: feature 'bad' \(output of 'fc'\): reduction "
                                           r"'attention_map' failed on a Tensor of shape \(2, 5\): .*at least 3 dims"):
        net(torch.randn(2, 3, 8, 8))


def test_masked_mean_and_chunk():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    got = masked_mean(x, attention_mask=mask)
    want = torch.stack([x[0, :3].mean(0), x[1].mean(0), x[2, :1].mean(0)])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(masked_mean(x, normalize=True, attention_mask=mask.bool()),
                               torch.nn.functional.normalize(want, dim=1))
    torch.testing.assert_close(masked_mean(x), x.mean(1))  # no mask: every token
    got.sum().backward()
    assert x.grad[0, 3:].abs().sum() == 0 and x.grad[0, :3].abs().sum() > 0  # padding gets no gradient
    with pytest.raises(ValueError, match=r"'masked_mean': the attention mask has shape \(3, 4\) but the tokens are "
                                         r"\(3, 5\)"):
        masked_mean(x, attention_mask=mask[:, :4])
    with pytest.raises(ValueError, match=r"'masked_mean' needs token features \(B, L, D\)"):
        masked_mean(torch.randn(2, 3, 4, 5))
    qkv = torch.randn(2, 5, 12)
    assert torch.equal(chunk(qkv, 3, 1), qkv[..., 4:8]) and chunk(qkv, 1, 0) is qkv
    with pytest.raises(ValueError, match=r"'chunk': dim -1 of shape \(2, 5, 12\) does not split into 5 equal parts"):
        chunk(qkv, 5, 0)
    with pytest.raises(ValueError, match=r"index=3 must be below chunks=3"):
        chunk(qkv, 3, 3)


def test_the_extractor_passes_the_model_calls_attention_mask():
    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, input_ids, attention_mask=None):
            return self.emb(input_ids)

    torch.manual_seed(0)
    model, ids = Tok(), torch.randint(0, 10, (2, 6))
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1] * 6])
    with FeatureExtractor(model, {"e": FeatureSpec("emb", reduction="masked_mean")}) as ex:
        model(ids, mask)  # positionally
        positional = ex["e"]
        model(input_ids=ids, attention_mask=mask)
        keyword = ex["e"]
        model(ids)
        unmasked = ex["e"]
    h = model.emb(ids)
    torch.testing.assert_close(positional, torch.stack([h[0, :2].mean(0), h[1].mean(0)]))
    torch.testing.assert_close(keyword, positional)
    torch.testing.assert_close(unmasked, h.mean(1))
