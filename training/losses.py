"""Losses as pure functions of model outputs; each returns a dict of tensors whose keys end in `_loss`.

The training step sums every `*_loss` entry. Nothing here calls the model or `torch.distributed` without
an explicit `rank` / `world_size`; `world_size == 1` skips every collective.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and hands each rank its own slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.world_size, ctx.n = rank, world_size, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None, None


def gather_with_grad(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Concatenate `x` (B, ...) from all ranks -> (W*B, ...), keeping gradients for every rank's rows.

    With per-rank losses averaged by DDP, the gradients equal those of one process holding the whole batch.
    """
    if world_size == 1:
        return x
    return _GatherWithGrad.apply(x, rank, world_size)


def itc_loss(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    temp: torch.Tensor,
    rank: int = 0,
    world_size: int = 1,
    label_smoothing: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Image-text contrastive loss with BLIP-2's max over queries, both directions.

    image_feats (B, Q, E) and text_feats (B, E) are L2-normalised local features; negatives come from every
    rank. Returns the loss and the local similarity rows (divided by temp, no grad) for hard-negative mining.
    """
    B = image_feats.shape[0]
    all_images = gather_with_grad(image_feats, rank, world_size)  # (W*B, Q, E)
    all_texts = gather_with_grad(text_feats, rank, world_size)  # (W*B, E)
    sim_i2t = torch.einsum("iqe,te->itq", image_feats, all_texts).amax(-1) / temp  # (B, W*B)
    sim_t2i = torch.einsum("te,iqe->tiq", text_feats, all_images).amax(-1) / temp  # (B, W*B)
    targets = torch.arange(B, device=image_feats.device) + rank * B
    loss = (
        F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
        + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)
    ) / 2
    return {"itc_loss": loss, "sim_i2t": sim_i2t.detach(), "sim_t2i": sim_t2i.detach()}


def sample_hard_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    generator: torch.Generator,
    rank: int = 0,
    image_ids: torch.Tensor | None = None,
    all_image_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One hard negative per row, drawn from softmax(similarity) with the positives masked out (vectorised).

    Returns (negative image index for each local text, negative text index for each local image), indices
    into the gathered batch. Pairs that share an image id count as positives when ids are given.
    """
    B, N = sim_i2t.shape
    if image_ids is not None and all_image_ids is not None:
        positive = image_ids[:, None] == all_image_ids[None, :]
    else:
        positive = torch.zeros(B, N, dtype=torch.bool, device=sim_i2t.device)
        positive[torch.arange(B), torch.arange(B) + rank * B] = True
    w_t2i = sim_t2i.float().masked_fill(positive, float("-inf")).softmax(dim=1)
    w_i2t = sim_i2t.float().masked_fill(positive, float("-inf")).softmax(dim=1)
    # A row whose every candidate is positive (a batch of one image) falls back to uniform over all columns.
    w_t2i = torch.where(torch.isfinite(w_t2i).all(1, keepdim=True), w_t2i, torch.full_like(w_t2i, 1 / N))
    w_i2t = torch.where(torch.isfinite(w_i2t).all(1, keepdim=True), w_i2t, torch.full_like(w_i2t, 1 / N))
    neg_images = torch.multinomial(w_t2i.cpu(), 1, generator=generator).squeeze(1).to(sim_i2t.device)
    neg_texts = torch.multinomial(w_i2t.cpu(), 1, generator=generator).squeeze(1).to(sim_i2t.device)
    return neg_images, neg_texts


def itm_loss(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """logits (3B, 2) for [positive pairs; (text, negative image); (image, negative text)]."""
    B = logits.shape[0] // 3
    labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)
    return {"itm_loss": F.cross_entropy(logits, labels)}


def itg_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, label_smoothing: float = 0.1
) -> dict[str, torch.Tensor]:
    """Next-token loss of the Q-Former's text decoder: logits (B, T, V) at t predict input_ids at t + 1."""
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
        label_smoothing=label_smoothing,
    )
    return {"itg_loss": loss}


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Stage-2 LM loss over the text positions: logits (B, T, V) at t predict labels at t + 1.

    `labels` is -100 wherever there is no target: the task prompt and padding (`lm_labels` builds it);
    the quality prompt and the queries never reach here, the bridge returns text positions only.
    """
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    return {"lm_loss": loss}


def lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """-100 on the first `prompt_lengths[i]` tokens of each right-padded row and on its padding."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    keep = (positions >= prompt_lengths[:, None]) & (attention_mask == 1)
    return input_ids.masked_fill(~keep, -100)


def context_loss(query_embeds: torch.Tensor, table: torch.Tensor, targets: torch.Tensor,
                 temperature: float = 0.02) -> dict[str, torch.Tensor]:
    """Context distillation: query slot ``s`` writes the LLM's input embedding of context token ``s``.

    ``query_embeds`` (B, Q, D) are the projected queries, ``table`` (V, D) the frozen LLM's input embeddings,
    ``targets`` (B, Q) the context's token ids left-aligned in the slots, -100 on free slots (the LM loss
    alone shapes those). The loss is a nearest-row classification (logits ``-|q - e_v|^2 / temperature``)
    plus the squared distance to the target row itself, so a slot that is right is also *at* the row the
    LLM learned to read. ``context_acc``: the share of slots whose nearest row is the target.
    """
    keep = targets >= 0
    q = query_embeds[keep].float()  # (N, D)
    if q.numel() == 0:
        zero = query_embeds.sum() * 0.0
        return {"context_loss": zero, "context_acc": zero.detach()}
    table = table.float()
    d2 = q.pow(2).sum(-1, keepdim=True) - 2 * q @ table.T + table.pow(2).sum(-1)  # (N, V)
    y = targets[keep]
    ce = F.cross_entropy(-d2 / temperature, y)
    mse = (q - table[y]).pow(2).sum(-1).mean()
    return {"context_loss": ce + mse, "context_acc": (d2.argmin(-1) == y).float().mean().detach()}
