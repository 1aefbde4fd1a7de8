"""Token importance from the observation window, shared by every method that selects by attention.

SnapKV (Li et al., 2024, arXiv 2404.14469) observed that the last prompt tokens (the *observation
window*) attend to the same context the answer will need. FastKV (arXiv 2502.01068) ranks tokens for
propagation with the same signal. One function computes it for all methods, so they differ only in what
they do with the scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POOLINGS = ("max", "avg")


def window_scores(
    q_window: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    kernel_size: int,
    pooling: str = "max",
) -> torch.Tensor:
    """Importance of each prefix key, one score per KV head.

    Args:
        q_window: queries of the last `w` tokens present, after RoPE, [B, Hq, w, d].
        keys: all keys present, after RoPE, [B, Hkv, n, d]; the last `w` belong to the window.
        scale: the attention's softmax scale.
        kernel_size: odd width of the pooling along the token axis (stride 1, same length).
        pooling: "max" or "avg".

    Returns:
        float32 scores [B, Hkv, n - w] of the prefix keys (the window itself is always kept):
        softmax(q k^T) of the window queries (causal inside the window), summed over the window
        queries, pooled along tokens, then summed over the query heads of each GQA group.
    """
    b, hq, w, d = q_window.shape
    hkv, n = keys.shape[1], keys.shape[2]
    group = hq // hkv
    # [B, Hkv, group*w, d] @ [B, Hkv, d, n]: no repeat of the keys over query heads.
    q = q_window.reshape(b, hkv, group * w, d).float()
    logits = torch.matmul(q, keys.float().transpose(-1, -2)).mul_(scale).view(b, hkv, group, w, n)
    # Window query j sits at index n - w + j and must not see keys after it.
    future = torch.arange(n, device=keys.device)[None, :] > torch.arange(n - w, n, device=keys.device)[:, None]
    logits.masked_fill_(future, float("-inf"))
    probs = logits.softmax(dim=-1)
    summed = probs[..., : n - w].sum(dim=3)  # over window queries -> [B, Hkv, group, n - w]
    flat = summed.reshape(-1, 1, n - w)
    if pooling == "max":
        pooled = F.max_pool1d(flat, kernel_size, stride=1, padding=kernel_size // 2)
    elif pooling == "avg":
        pooled = F.avg_pool1d(flat, kernel_size, stride=1, padding=kernel_size // 2)
    else:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return pooled.view(b, hkv, group, n - w).sum(dim=2)


def top_with_window(scores: torch.Tensor, keep: int, window_size: int) -> torch.Tensor:
    """Indices of the `keep - window_size` best prefix entries plus the window, sorted by position.

    scores: [..., p] over the prefix (p = n - window_size). Returns [..., keep] indices into the
    n tokens present.
    """
    p = scores.shape[-1]
    top = scores.topk(keep - window_size, dim=-1).indices
    window = torch.arange(p, p + window_size, device=scores.device).expand(*scores.shape[:-1], window_size)
    return torch.cat([top, window], dim=-1).sort(dim=-1).values


def accumulated_scores(q: torch.Tensor, keys: torch.Tensor, scale: float, chunk_mib: float = 64) -> torch.Tensor:
    """H2O's score: the attention each key receives from every prompt query, causally.

    q [B, Hq, n, d], keys [B, Hkv, n, d] -> float32 [B, Hkv, n], summed over queries and the query heads
    of each GQA group. Queries are processed in chunks so that only [B, Hq, chunk, n] is held at a time
    (about `chunk_mib` MiB), never the n x n matrix.
    """
    b, hq, n, d = q.shape
    hkv = keys.shape[1]
    group = hq // hkv
    chunk = max(1, int(chunk_mib * 2**20 // (4 * b * hq * n)))
    k32 = keys.float().transpose(-1, -2)
    total = torch.zeros(b, hkv, n, dtype=torch.float32, device=q.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        # Queries start..stop-1 see keys 0..stop-1 only.
        qc = q[:, :, start:stop].float().reshape(b, hkv, group * (stop - start), d)
        logits = torch.matmul(qc, k32[..., :stop]).mul_(scale).view(b, hkv, group, stop - start, stop)
        future = torch.arange(stop, device=q.device)[None, :] > torch.arange(start, stop, device=q.device)[:, None]
        logits.masked_fill_(future, float("-inf"))
        total[..., :stop] += logits.softmax(dim=-1).sum(dim=(2, 3))
    return total


def last_query_scores(q: torch.Tensor, keys: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """GemFilter's score: the last query's q.k, summed over all heads, average-pooled along tokens.

    q [B, Hq, n, d], keys [B, Hkv, n, d] -> float32 [B, 1, n].
    """
    b, hq, _, d = q.shape
    hkv = keys.shape[1]
    last = q[:, :, -1].float().reshape(b, hkv, hq // hkv, d)
    dots = torch.matmul(last, keys.float().transpose(-1, -2)).sum(dim=(1, 2))  # [B, n]
    return F.avg_pool1d(dots[:, None], kernel_size, stride=1, padding=kernel_size // 2)
