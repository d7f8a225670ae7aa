"""Fused LoRA-family kernels (LoRA, DoRA, VeRA, AdaLoRA) on numpy float32 arrays, and
bitsandbytes-compatible NF4 quantization in ``lorafuse.nf4``.

Layouts follow PEFT: weights ``[out, in]`` (torch ``nn.Linear``), activations ``[T, in]``,
``lora_A [r, in]``, ``lora_B [out, r]``. Every array must be a C-contiguous float32 numpy
array with finite values; anything else raises TypeError/ValueError naming the argument.
Kernels run on lorafuse's CPU reference backend with the GIL released.

Many adapters in one batch (serving; PEFT's ``model(..., adapter_names=[...])`` per row):
``lora_forward_multi(x, w0, adapters, adapter_of_row)``, or a ``LoraPool(adapters, in_features,
out_features)`` packed once and its ``forward(x, w0, adapter_of_row)`` per batch; LoRA, VeRA
and AdaLoRA adapters of any ranks mix in one call.

``lorafuse.torch`` (imported only on request, and only usable when torch is installed) holds
the torch drop-in: nn.Modules over these kernels and ``replace_peft_layers(model)`` for PEFT
models on CPU float32 tensors. ``import lorafuse`` itself never imports torch.
"""

from . import _lorafuse
from ._lorafuse import (
    FrozenWeight,
    LoraPool,
    __version__,
    adalora_backward,
    adalora_forward,
    adalora_merge,
    adalora_unmerge,
    dora_backward,
    dora_forward,
    dora_merge,
    dora_unmerge,
    dora_weight_norm,
    finetune,
    load_adapter,
    lora_backward,
    lora_forward,
    lora_forward_multi,
    lora_merge,
    lora_unmerge,
    nf4,
    save_adapter,
    vera_backward,
    vera_forward,
    vera_merge,
    vera_unmerge,
)

__all__ = [
    "FrozenWeight",
    "LoraPool",
    "__version__",
    "adalora_backward",
    "adalora_forward",
    "adalora_merge",
    "adalora_unmerge",
    "dora_backward",
    "dora_forward",
    "dora_merge",
    "dora_unmerge",
    "dora_weight_norm",
    "finetune",
    "load_adapter",
    "lora_backward",
    "lora_forward",
    "lora_forward_multi",
    "lora_merge",
    "lora_unmerge",
    "nf4",
    "save_adapter",
    "vera_backward",
    "vera_forward",
    "vera_merge",
    "vera_unmerge",
]

# Every name the extension defines is re-exported above; this catches one added to
# python/src/ but not here (it is still reachable as lorafuse._lorafuse.NAME).
for _name in dir(_lorafuse):
    if not _name.startswith("_") and _name not in globals():
        globals()[_name] = getattr(_lorafuse, _name)
        __all__.append(_name)
del _name
