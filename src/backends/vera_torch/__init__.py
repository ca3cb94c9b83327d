"""vera-torch: the PyTorch backend of vera-core (VeRA and DVoRA adapters for ``torch.nn`` models).

All adapter math is vera-core's (reached through ``array_api_compat``); this package adds
``torch.autograd.Function`` wrappers, layer surgery, adapter management, files and PEFT
interop.

Examples
--------
>>> import torch
>>> from torch import nn
>>> import vera_torch as vt
>>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
>>> model = vt.add_vera(model, target_modules="all-linear", r=8, seed=0)
>>> print(vt.trainable_parameters(model))
trainable params: 56 || all params: 864 || trainable%: 6.4815
>>> model(torch.randn(4, 16)).shape
torch.Size([4, 8])
"""

from vera_torch.bank import AdapterBank
from vera_torch.bulk import load_adapters, save_adapters
from vera_torch.distributed import check_projections_identical
from vera_torch.files import load_adapter, restore_adapter, save_adapter
from vera_torch.functional import DvoraFunction, VeraFunction, dvora, vera
from vera_torch.layers import BASE_ADAPTER, VeraLinear
from vera_torch.model import (
    TrainableReport,
    active_adapters,
    adapter_index,
    adapter_names,
    add_vera,
    delete_adapter,
    disable_adapters,
    list_adapters,
    merge_adapter,
    merge_and_unload,
    reserve,
    set_adapter,
    trainable_parameters,
    unmerge_adapter,
    vera_layers,
)
from vera_torch.optim import BankAdamW
from vera_torch.paging import AdapterPager
from vera_torch.peft import load_peft_adapter, save_peft_adapter
from vera_torch.projections import ProjectionKey, ProjectionStore, peft_projections

__all__ = [
    "BASE_ADAPTER",
    "AdapterBank",
    "AdapterPager",
    "BankAdamW",
    "DvoraFunction",
    "ProjectionKey",
    "ProjectionStore",
    "TrainableReport",
    "VeraFunction",
    "VeraLinear",
    "active_adapters",
    "adapter_index",
    "adapter_names",
    "add_vera",
    "check_projections_identical",
    "delete_adapter",
    "disable_adapters",
    "dvora",
    "list_adapters",
    "load_adapters",
    "load_adapter",
    "load_peft_adapter",
    "merge_adapter",
    "merge_and_unload",
    "peft_projections",
    "reserve",
    "restore_adapter",
    "save_adapter",
    "save_adapters",
    "save_peft_adapter",
    "set_adapter",
    "trainable_parameters",
    "unmerge_adapter",
    "vera",
    "vera_layers",
]
