"""``BankAdamW``: AdamW over adapter banks, one adapter (row) at a time.

A bank parameter stacks many adapters' vectors, one per row. ``torch.optim.AdamW`` treats
it as one tensor: every step decays every row and moves every row that ever had momentum.
:class:`BankAdamW` keeps AdamW's state per row (moments and the step count) and updates
only the rows a step's gradient holds: with the sparse gradients a bank of several rows
produces, exactly the adapters the batch used. So training many adapters in one batch (or
one adapter among many) gives each adapter what ``torch.optim.AdamW`` would give it if it
were trained alone on its own rows. Parameters with dense gradients (a one-row bank, any
ordinary parameter) are updated whole, as ``torch.optim.AdamW`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from vera_core.segments import grown

__all__ = ["BankAdamW"]


def _grown(state: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``state`` padded with zeros to ``shape`` (its bank grew since the last step)."""
    if tuple(state.shape) == shape:
        return state
    if state.dim() != len(shape):
        raise RuntimeError(f"a parameter changed from {tuple(state.shape)} to {shape}")
    return grown(state, shape)


class BankAdamW(torch.optim.Optimizer):
    """AdamW with per-row state: rows absent from a step's gradient are neither decayed nor moved.

    Parameters
    ----------
    params : iterable
        Parameters or parameter groups, as for ``torch.optim.AdamW`` (typically
        ``[p for p in model.parameters() if p.requires_grad]``).
    lr, betas, eps, weight_decay
        As ``torch.optim.AdamW`` (decoupled weight decay).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import vera_torch as vt
    >>> model = vt.add_vera(nn.Sequential(nn.Linear(8, 4)), ["0"], r=2, adapter_name="a")
    >>> model = vt.add_vera(model, ["0"], r=2, adapter_name="b")
    >>> vt.set_adapter(model, ["a", "b"])
    >>> opt = BankAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    >>> model(torch.randn(2, 8), adapter_names=["a", "a"]).sum().backward()
    >>> opt.step()  # moves adapter a's rows only
    >>> vt.vera_layers(model)["0"].vectors("b")["lambda_d"].tolist()
    [0.10000000149011612, 0.10000000149011612]
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        if not 0.0 <= lr or not 0.0 <= eps or not 0.0 <= weight_decay:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW update of the rows each parameter's gradient holds."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        grad = param.grad
        assert grad is not None
        table = param if param.dim() >= 2 else param.view(1, -1)  # a vector is one row
        state = self.state[param]
        if not state:
            state["exp_avg"] = torch.zeros_like(table)
            state["exp_avg_sq"] = torch.zeros_like(table)
            state["step"] = torch.zeros(table.shape[0], dtype=torch.float64, device=param.device)
        for name in ("exp_avg", "exp_avg_sq"):
            state[name] = _grown(state[name], tuple(table.shape))
        if state["step"].shape[0] != table.shape[0]:
            state["step"] = _grown(state["step"], (table.shape[0],))
        generations = getattr(param, "vera_row_generations", None)
        if grad.is_sparse:
            grad = grad.coalesce()
            rows, values = grad.indices()[0], grad.values()
        else:
            rows = torch.arange(table.shape[0], device=param.device)
            values = grad if grad.dim() >= 2 else grad.view(1, -1)
        if rows.numel() == 0:
            return
        lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        step = state["step"].index_select(0, rows)
        exp_avg = state["exp_avg"].index_select(0, rows)
        exp_avg_sq = state["exp_avg_sq"].index_select(0, rows)
        if generations is not None:  # a row reused by another adapter since its state was made starts afresh
            now = generations.on(param.device).index_select(0, rows)
            seen = state.setdefault("generation", torch.zeros(table.shape[0], dtype=torch.int64, device=param.device))
            if seen.shape[0] != table.shape[0]:
                seen = state["generation"] = _grown(seen, (table.shape[0],))
            fresh = (seen.index_select(0, rows) == now).to(exp_avg.dtype).view((-1,) + (1,) * (exp_avg.dim() - 1))
            exp_avg.mul_(fresh)
            exp_avg_sq.mul_(fresh)
            step = step * fresh.view(-1).to(step.dtype)
            seen.index_copy_(0, rows, now)
        step = step + 1
        state["step"].index_copy_(0, rows, step)
        p = table.index_select(0, rows)
        # torch.optim.AdamW's single-tensor update, row by row (bias corrections per row's own step)
        p.mul_(1 - lr * decay)
        exp_avg.lerp_(values, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(values, values, value=1 - beta2)
        shape = (-1,) + (1,) * (p.dim() - 1)
        step_size = (lr / (1 - beta1**step)).to(p.dtype).view(shape)
        correction = ((1 - beta2**step) ** 0.5).to(p.dtype).view(shape)
        denom = (exp_avg_sq.sqrt() / correction).add_(eps)
        p.sub_(step_size * (exp_avg / denom))
        table.index_copy_(0, rows, p)
        state["exp_avg"].index_copy_(0, rows, exp_avg)
        state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
