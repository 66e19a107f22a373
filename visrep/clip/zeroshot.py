"""Zero-shot classification with prompt-template ensembles, and image-text retrieval recall@k.

Evaluation across ranks: each rank embeds its shard of the split; ``gather_for_metrics`` collects the
embeddings (dropping the samples Accelerate repeated to even out the last batch), and every rank
scores the whole split, so each sample counts exactly once and all ranks agree.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from visrep.engine.distributed import broadcast_buffers


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, classnames: Sequence[Sequence[str] | str], templates: Sequence[str],
                         device=None, batch_size: int = 256) -> torch.Tensor:
    """Class weights ``(embed_dim, num_classes)`` from prompt templates, as in CLIP (Radford et al.
    2021, arXiv:2103.00020, Sec. 3.1.4): every (template, class name) prompt is embedded and
    L2-normalised, a class's prompts are averaged, and the mean is renormalised. A class may have
    several names (synonyms: ``["seven", "7"]``); all (template, name) prompts enter its mean.
    Templates hold one ``{}`` (or ``{c}``) for the class name."""
    model = getattr(model, "module", model)
    device = device or next(model.parameters()).device
    weights = []
    for names in classnames:
        names = [names] if isinstance(names, str) else list(names)
        prompts = [t.replace("{c}", "{}").format(n) for t in templates for n in names]
        embs = []
        for i in range(0, len(prompts), batch_size):
            embs.append(F.normalize(model.encode_text(tokenizer(prompts[i:i + batch_size]).to(device)).float(), dim=-1))
        e = torch.cat(embs).mean(dim=0)
        weights.append(F.normalize(e, dim=-1))
    return torch.stack(weights, dim=1)


def zero_shot_accuracy(image_features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor,
                       topk: tuple = (1, 5)) -> dict:
    """Top-k accuracy (fractions) of ``argmax(normalised image features @ classifier)``."""
    logits = F.normalize(image_features.float(), dim=-1) @ classifier
    out = {}
    for k in topk:
        k_ = min(k, logits.shape[1])
        hit = (logits.topk(k_, dim=1).indices == labels[:, None]).any(dim=1)
        out[f"top{k}"] = hit.float().mean().item()
    return out


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      keys: Optional[torch.Tensor] = None, ks: tuple = (1, 5, 10), block: int = 1024) -> dict:
    """Recall@k in both directions for ``N`` image-text pairs (row ``i`` of each is a pair).

    ``i2t_rK``: fraction of images whose own caption is among the ``K`` most similar texts;
    ``t2i_rK``: the same for texts. ``keys`` (optional, ``N`` ints) declares pairs interchangeable:
    text ``j`` counts as a correct match for image ``i`` when ``keys[i] == keys[j]`` (identical
    captions; or, for a class-level caption set such as the templated digits, the same class). Without
    keys only the exact pair counts, as in open_clip's retrieval evaluation.

    Queries go ``block`` rows at a time and keep only their top ``max(ks)`` candidates, so memory is
    ``block x N`` similarities, never the ``N x N`` matrix and its ``N x N`` int64 argsort (80 GB at
    N = 100k)."""
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    n = img.shape[0]
    keys = torch.arange(n, device=img.device) if keys is None else keys.to(img.device)
    kmax = min(max(ks), n)
    out = {}
    for name, queries, candidates in (("i2t", img, txt), ("t2i", txt, img)):
        hits = torch.empty(n, kmax, dtype=torch.bool, device=img.device)
        for start in range(0, n, block):
            sim = queries[start:start + block] @ candidates.t()
            top = sim.topk(kmax, dim=1).indices
            hits[start:start + block] = keys[top] == keys[start:start + block, None]
        for k in ks:
            out[f"{name}_r{k}"] = hits[:, :min(k, n)].any(dim=1).float().mean().item()
    return out


@torch.no_grad()
def embed_split(model, loader, accelerator) -> dict:
    """Image and text embeddings, labels and match keys of a whole split, gathered over ranks.
    ``loader`` yields ``(images, tokens, labels, keys)``."""
    net = accelerator.unwrap_model(model)
    was = net.training
    net.eval()
    imgs, txts, labels, keys = [], [], [], []
    for x, tok, y, k in loader:
        with accelerator.autocast():
            fi, ft = net.encode_image(x), net.encode_text(tok)
        fi, ft, y, k = accelerator.gather_for_metrics((fi.float().contiguous(), ft.float().contiguous(), y, k))
        imgs.append(fi)
        txts.append(ft)
        labels.append(y)
        keys.append(k)
    net.train(was)
    return {"image": torch.cat(imgs), "text": torch.cat(txts), "labels": torch.cat(labels), "keys": torch.cat(keys)}


@torch.no_grad()
def evaluate_clip(model, loader, accelerator, tokenizer, classnames=None, templates=None,
                  ks: tuple = (1, 5, 10)) -> dict:
    """Zero-shot accuracy (when ``classnames`` and ``templates`` are given and the split has labels
    >= 0) and retrieval recalls on one split. Under DeepSpeed every rank first takes rank 0's
    buffers (BatchNorm statistics), as DDP does."""
    broadcast_buffers(model, accelerator)
    e = embed_split(model, loader, accelerator)
    out = retrieval_metrics(e["image"], e["text"], e["keys"], ks)
    if classnames and templates and (e["labels"] >= 0).all():
        net = accelerator.unwrap_model(model)
        was = net.training
        net.eval()
        clf = zero_shot_classifier(net, tokenizer, classnames, templates, device=e["image"].device)
        net.train(was)
        zs = zero_shot_accuracy(e["image"], e["labels"], clf)
        out["zero_shot_acc"], out["zero_shot_top5"] = zs["top1"], zs["top5"]
    out["count"] = int(e["image"].shape[0])
    return out
