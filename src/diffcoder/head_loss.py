"""The LM head and the cross-entropy in one chunked step, so training never holds full-vocabulary logits.

`linear_cross_entropy(hidden, weight, targets, row_weights)` is `sum_i w_i * CE(hidden_i @ weight.T, target_i)`
over the rows given (only the loss-eligible positions: masked slots for diffusion, next-token targets for AR). It
runs over chunks of rows: one chunk's logits exist at a time, in the compute dtype (bf16 under autocast) and
upcast to float32 only there. The gradients for `hidden` and `weight` are computed in the same pass (the loss is
a scalar, so backward only scales them), which costs no matmul beyond what the plain head + cross-entropy does.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 256 << 20  # float32 logits of one chunk


def default_chunk_rows(vocab_size: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so one chunk's float32 logits take about `budget_bytes` (a multiple of 64, at least 64)."""
    return max(64, budget_bytes // (4 * vocab_size) // 64 * 64)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, row_weights: torch.Tensor, want_grad: bool,
           acc_dtype: torch.dtype, suppress_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum of w * CE, dLoss/dlogits in the compute dtype or None) for one chunk of rows."""
    logits = (h @ w.t()).to(acc_dtype)
    if suppress_id is not None:  # a token that is never a valid prediction (the mask token, when scoring)
        logits[:, suppress_id] = -torch.inf
    lse = logits.logsumexp(-1)
    rw = row_weights.to(acc_dtype)
    loss = ((lse - logits.gather(1, targets[:, None]).squeeze(1)) * rw).sum()
    if not want_grad:
        return loss, None
    probs = (logits - lse[:, None]).exp_()  # softmax, in the logits' memory
    probs.scatter_add_(1, targets[:, None], -torch.ones_like(lse)[:, None])
    return loss, probs.mul_(rw[:, None]).to(h.dtype)


_COMPILED: dict[bool, object] = {}


def _chunk_fn(compiled: bool):
    if compiled not in _COMPILED:
        _COMPILED[compiled] = torch.compile(_chunk, dynamic=None) if compiled else _chunk
    return _COMPILED[compiled]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, row_weights, chunk_rows, grad_rows, compiled, suppress_id):
        cdt = _compute_dtype(hidden, weight)
        acc = torch.promote_types(cdt, torch.float32)
        want_h, want_w = hidden.requires_grad, weight.requires_grad
        grad_rows = grad_rows.to(weight.device) if (want_w and grad_rows is not None) else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(cdt)
            total = torch.zeros((), dtype=acc, device=hidden.device)
            grad_h = torch.empty_like(hidden) if want_h else None
            n_w = weight.shape[0] if grad_rows is None else grad_rows.numel()
            grad_w = torch.zeros(n_w, weight.shape[1], dtype=acc, device=weight.device) if want_w else None
            fn = _chunk_fn(compiled)
            for s in range(0, hidden.shape[0], chunk_rows):
                e = min(s + chunk_rows, hidden.shape[0])
                h = hidden[s:e].to(cdt)
                loss, g = fn(h, w, targets[s:e], row_weights[s:e], want_h or want_w, acc, suppress_id)
                total += loss
                if want_h:
                    grad_h[s:e] = g @ w
                if want_w:
                    g_rows = g if grad_rows is None else g.index_select(1, grad_rows)
                    grad_w += (g_rows.t() @ h).to(acc)
        ctx.grad_rows = grad_rows
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = gw = None
        if grad_h is not None:
            gh = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            gw = (grad_w * grad_out).to(ctx.weight_dtype)
            if ctx.grad_rows is not None:  # rows outside grad_rows are frozen: their gradient is exactly zero
                full = torch.zeros(ctx.weight_shape, dtype=ctx.weight_dtype, device=gw.device)
                gw = full.index_copy_(0, ctx.grad_rows, gw)
        return gh, gw, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    row_weights: torch.Tensor,
    chunk_rows: int | None = None,
    grad_rows: torch.Tensor | None = None,
    compiled: bool = False,
    suppress_id: int | None = None,
) -> torch.Tensor:
    """sum_i row_weights[i] * CE(hidden[i] @ weight.T, targets[i]), differentiable in hidden and weight.

    hidden [M, H] (the selected rows only), weight [V, H] (the LM head), targets [M] int64, row_weights [M].
    chunk_rows: rows per chunk (default: `default_chunk_rows(V)`). grad_rows: when only these rows of `weight`
    learn (LoRA trains the new tokens' rows of a tied embedding), the weight gradient is computed for them alone
    and is zero elsewhere. compiled: run each chunk through `torch.compile` (fuses the softmax and its gradient).
    suppress_id: a vocabulary id whose logit is set to -inf first (scoring suppresses the mask token; the
    training loss does not).
    """
    if chunk_rows is None or chunk_rows <= 0:
        chunk_rows = default_chunk_rows(weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, row_weights, chunk_rows, grad_rows, compiled,
                                     suppress_id)


def full_logits_bytes(rows: int, vocab_size: int, dtype_bytes: int = 4) -> int:
    """Bytes of the [rows, V] logits a plain head + cross-entropy materialises (for the benchmark's report)."""
    return rows * vocab_size * dtype_bytes
