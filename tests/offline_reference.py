"""PyTorch references for the offline encoder's two towers, written independently of clipsel_jax.models (used by
tests/test_offline.py and scripts/bench_offline.py). torch and transformers are imported when called."""

import math


def torch_efficientnet(sd, pixels):
    """EfficientNet-Lite0 forward with torch ops from the .pth state dict: NCHW float pixels -> (features, logits)."""
    import torch
    import torch.nn.functional as F

    strides = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]  # blocks r1 s1, r2 s2, r2 s2, r3 s2, r3 s1, r4 s2, r1 s1

    def conv_bn(x, conv, bn, stride=1, groups=1):
        w = sd[f"{conv}.weight"]
        k, (h, wd) = w.shape[-1], x.shape[-2:]
        ph = max((math.ceil(h / stride) - 1) * stride + k - h, 0)  # TensorFlow "SAME" (extra pixel bottom/right)
        pw = max((math.ceil(wd / stride) - 1) * stride + k - wd, 0)
        x = F.conv2d(F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]), w, stride=stride, groups=groups)
        return F.batch_norm(x, sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"], sd[f"{bn}.weight"],
                            sd[f"{bn}.bias"], training=False, eps=1e-3)

    with torch.no_grad():
        x = F.relu6(conv_bn(pixels, "_conv_stem", "_bn0", stride=2))
        for i, s in enumerate(strides):
            p = f"_blocks.{i}"
            h = F.relu6(conv_bn(x, f"{p}._expand_conv", f"{p}._bn0")) if f"{p}._expand_conv.weight" in sd else x
            h = F.relu6(conv_bn(h, f"{p}._depthwise_conv", f"{p}._bn1", stride=s, groups=h.shape[1]))
            h = conv_bn(h, f"{p}._project_conv", f"{p}._bn2")
            x = h + x if s == 1 and h.shape == x.shape else h
        x = F.relu6(conv_bn(x, "_conv_head", "_bn1"))
        feats = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return feats.numpy(), F.linear(feats, sd["_fc.weight"], sd["_fc.bias"]).numpy()


def torch_minilm(folder):
    """(tokenizer, transformers.BertModel in eval mode) from the packaged all-MiniLM-L6-v2 folder, offline."""
    from transformers import AutoTokenizer, BertModel

    return AutoTokenizer.from_pretrained(str(folder)), BertModel.from_pretrained(str(folder)).eval()


def torch_sentence_embeddings(model, input_ids, attention_mask):
    """BertModel + mean pooling over real tokens + L2 normalisation (what sentence-transformers does) -> numpy."""
    import torch

    with torch.no_grad():
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask[..., None].to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()
