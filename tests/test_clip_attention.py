"""The small text tower's attention: the same state dict and outputs as open_clip's TextTransformer with
nn.MultiheadAttention, read from its first input only (DeepSpeed ZeRO-3 hands each input wrapped
separately), and key biases that receive exactly zero gradient (their true gradient is zero)."""
import pytest
import torch
from torch import nn

from visrep.clip.model import (ClipModelConfig, ImageTowerConfig, SelfAttention, SmallText, TextTowerConfig,
                               build_clip_model, zero_key_bias_grads)


def tokens(n=6, length=16):
    t = torch.randint(1, 49000, (n, length))
    t[:, 9] = 49407  # end of text
    t[:, 10:] = 0
    return t


def test_small_text_matches_open_clip_text_transformer():
    from open_clip.transformer import TextTransformer

    torch.manual_seed(0)
    ours = SmallText(TextTowerConfig(width=32, layers=2, heads=4))
    ref = TextTransformer(context_length=16, vocab_size=49408, width=32, heads=4, layers=2, mlp_ratio=4.0,
                          output_dim=None, proj_type="none", pool_type="argmax")
    assert ours.net.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(ours.net.state_dict())
    t = tokens()
    torch.testing.assert_close(ours(t), ref(t), rtol=0, atol=1e-6)


def test_self_attention_reads_only_its_first_input():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    nn.init.normal_(mha.in_proj_bias)
    x = torch.randn(3, 5, 16)
    mask = torch.full((5, 5), float("-inf")).triu_(1)
    want = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
    attn = SelfAttention(mha)
    # a different tensor object with the same values, as under DeepSpeed ZeRO-3
    got = attn(x, x.detach().clone(), x.detach().clone(), need_weights=False, attn_mask=mask)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        attn(x, need_weights=True)


def test_key_bias_gets_exactly_zero_gradient():
    torch.manual_seed(0)
    model = build_clip_model(ClipModelConfig(image=ImageTowerConfig(name="resnet20", kwargs={"width": 0.25}),
                                             text=TextTowerConfig(width=32, layers=2, heads=4)), image_size=8)
    feats = model(torch.randn(4, 3, 8, 8), tokens(4))
    (feats["image_features"] @ feats["text_features"].T).logsumexp(1).sum().backward()
    biases = [m.in_proj_bias for m in model.modules() if isinstance(m, SelfAttention)]
    assert len(biases) == 2
    for b in biases:
        e = b.numel() // 3
        assert b.grad[e:2 * e].abs().max() == 0  # keys: exactly zero
        assert b.grad[:e].abs().max() > 0 and b.grad[2 * e:].abs().max() > 0  # queries, values: trained
    frozen = nn.MultiheadAttention(8, 2).requires_grad_(False)
    assert zero_key_bias_grads(frozen) == 0  # a frozen bias is left alone
