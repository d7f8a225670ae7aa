"""Type stubs of the `lorafuse._lorafuse` extension module (python/src/), re-exported by `lorafuse`.

Every array argument must be a C-contiguous float32 numpy array with finite values and the
shape given in its docstring; otherwise TypeError (not an ndarray, wrong dtype) or ValueError
(ndim, shape, contiguity, NaN/Inf) is raised naming the argument. Results are new float32 arrays.
"""

import os
from typing import Any, Optional, Sequence, Tuple, TypedDict, Union

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
# A base weight [out, in]: a float32 array, a FrozenWeight, or (LoRA and DoRA forward/backward,
# dora_weight_norm and the mixed-batch ops: QLoRA / QDoRA) an nf4.Nf4Tensor, dequantized tile
# by tile inside the products and never whole.
W0 = Union[F32, "FrozenWeight", "Nf4Tensor"]

__version__: str

# ---- LoRA: x [T, in], w0 [out, in], lora_A [r, in], lora_B [out, r], bias [out] ----
def lora_forward(
    x: F32, w0: W0, lora_A: F32, lora_B: F32, scaling: float, bias: Optional[F32] = None
) -> F32:
    """y [T, out] = x @ w0.T + bias + scaling * (x @ lora_A.T) @ lora_B.T"""

def lora_backward(
    dy: F32, x: F32, w0: W0, lora_A: F32, lora_B: F32, scaling: float, h: Optional[F32] = None
) -> Tuple[F32, F32, F32]:
    """(dx [T, in], d_lora_A [r, in], d_lora_B [out, r]); h = x @ lora_A.T, recomputed if None."""

def lora_merge(w0: F32, lora_A: F32, lora_B: F32, scaling: float) -> F32:
    """New w0 + scaling * lora_B @ lora_A, [out, in]."""

def lora_unmerge(w: F32, lora_A: F32, lora_B: F32, scaling: float) -> F32:
    """New w - scaling * lora_B @ lora_A, [out, in]."""

# ---- DoRA: magnitude [out] (lora_magnitude_vector), weight_norm [out] ----
def dora_weight_norm(w0: W0, lora_A: F32, lora_B: F32, scaling: float) -> F32:
    """||w0 + scaling * lora_B @ lora_A|| per output row, [out]."""

def dora_forward(
    x: F32,
    w0: W0,
    lora_A: F32,
    lora_B: F32,
    scaling: float,
    magnitude: F32,
    weight_norm: Optional[F32] = None,
    bias: Optional[F32] = None,
    return_saved: bool = False,
) -> F32 | Tuple[F32, F32, F32, F32]:
    """y [T, out] = (magnitude / weight_norm) * (x @ w0.T + s * x @ lora_A.T @ lora_B.T) + bias;
    with return_saved, (y, h [T, r], z [T, out], weight_norm [out]) for dora_backward."""

def dora_backward(
    dy: F32,
    x: F32,
    w0: W0,
    lora_A: F32,
    lora_B: F32,
    scaling: float,
    magnitude: F32,
    weight_norm: Optional[F32] = None,
    h: Optional[F32] = None,
    z: Optional[F32] = None,
) -> Tuple[F32, F32, F32, F32]:
    """(dx [T, in], d_lora_A [r, in], d_lora_B [out, r], d_magnitude [out]); h, z and
    weight_norm from dora_forward(..., return_saved=True) skip recomputing the forward."""

def dora_merge(
    w0: F32,
    lora_A: F32,
    lora_B: F32,
    scaling: float,
    magnitude: F32,
    weight_norm: Optional[F32] = None,
) -> F32:
    """New (magnitude / weight_norm)[:, None] * (w0 + s * lora_B @ lora_A), [out, in]."""

def dora_unmerge(
    w: F32, lora_A: F32, lora_B: F32, scaling: float, magnitude: F32, weight_norm: F32
) -> F32:
    """New w / (magnitude / weight_norm)[:, None] - s * lora_B @ lora_A, [out, in]."""

# ---- VeRA: vera_A [r, max_in], vera_B [max_out, r], lambda_d [r], lambda_b [out] ----
def vera_forward(
    x: F32,
    w0: F32,
    vera_A: F32,
    vera_B: F32,
    lambda_d: F32,
    lambda_b: F32,
    bias: Optional[F32] = None,
) -> F32:
    """y [T, out] = x @ w0.T + bias + lambda_b * ((lambda_d * (x @ As.T)) @ Bs.T)"""

def vera_backward(
    dy: F32,
    x: F32,
    w0: F32,
    vera_A: F32,
    vera_B: F32,
    lambda_d: F32,
    lambda_b: F32,
    h: Optional[F32] = None,
) -> Tuple[F32, F32, F32]:
    """(dx [T, in], d_lambda_d [r], d_lambda_b [out])"""

def vera_merge(w0: F32, vera_A: F32, vera_B: F32, lambda_d: F32, lambda_b: F32) -> F32: ...
def vera_unmerge(w: F32, vera_A: F32, vera_B: F32, lambda_d: F32, lambda_b: F32) -> F32: ...

# ---- AdaLoRA: lora_E [r, 1]; c = scaling / (ranknum + 1e-5) ----
def adalora_forward(
    x: F32,
    w0: F32,
    lora_A: F32,
    lora_B: F32,
    lora_E: F32,
    scaling: float,
    ranknum: float,
    bias: Optional[F32] = None,
) -> F32:
    """y [T, out] = x @ w0.T + bias + (x @ (lora_A * lora_E).T) @ lora_B.T * c"""

def adalora_backward(
    dy: F32,
    x: F32,
    w0: F32,
    lora_A: F32,
    lora_B: F32,
    lora_E: F32,
    scaling: float,
    ranknum: float,
    h: Optional[F32] = None,
) -> Tuple[F32, F32, F32, F32]:
    """(dx [T, in], d_lora_A [r, in], d_lora_B [out, r], d_lora_E [r, 1]); h = x @ lora_A.T
    (before lora_E, as for lora_backward), recomputed if None."""

def adalora_merge(
    w0: F32, lora_A: F32, lora_B: F32, lora_E: F32, scaling: float, ranknum: float
) -> F32: ...
def adalora_unmerge(
    w: F32, lora_A: F32, lora_B: F32, lora_E: F32, scaling: float, ranknum: float
) -> F32: ...

# ---- many adapters in one batch (serving; PEFT's model(..., adapter_names=[...]) per row) ----
# One adapter's term on a projection [out, in]: a dict whose keys say the method (ranks may
# differ between adapters), or None where the adapter leaves the projection alone. DoRA (a
# `magnitude` key) is refused: its column scale rescales the base product per adapter.
class LoraTerm(TypedDict):
    """LoRA / rsLoRA: scaling * (x @ lora_A.T) @ lora_B.T; lora_A [r, in], lora_B [out, r]."""

    lora_A: F32
    lora_B: F32
    scaling: float

class VeraTerm(TypedDict):
    """VeRA: lambda_b * ((lambda_d * (x @ vera_A[:, :in].T)) @ vera_B[:out].T);
    vera_A [r, max_in], vera_B [max_out, r], lambda_d [r], lambda_b [out]."""

    vera_A: F32
    vera_B: F32
    lambda_d: F32
    lambda_b: F32

class AdaLoraTerm(TypedDict):
    """AdaLoRA: (x @ (lora_A * lora_E).T) @ lora_B.T * scaling / (ranknum + 1e-5);
    lora_A [r, in], lora_B [out, r], lora_E [r, 1], scaling = lora_alpha."""

    lora_A: F32
    lora_B: F32
    lora_E: F32
    scaling: float
    ranknum: float

AdapterTerm = Optional[Union[LoraTerm, VeraTerm, AdaLoraTerm]]
# adapter_of_row: T ints in -1..K (-1: the base model only), a 1-D integer array or a list.
Indices = Union[npt.NDArray[np.integer[Any]], Sequence[int]]

def lora_forward_multi(
    x: F32, w0: W0, adapters: Sequence[AdapterTerm], adapter_of_row: Indices,
    bias: Optional[F32] = None,
) -> F32:
    """y [T, out]: y[t] = x[t] @ w0.T + bias + term of adapters[adapter_of_row[t]] (none for -1
    or a None entry); one base product for all rows. Packs a LoraPool per call."""

class LoraPool:
    """The terms of K adapters on one projection [out_features, in_features], packed once
    (scales folded into each B, ragged ranks) for mixed-batch forwards."""

    def __init__(
        self, adapters: Sequence[AdapterTerm], in_features: int, out_features: int
    ) -> None: ...
    def forward(
        self, x: F32, w0: W0, adapter_of_row: Indices, bias: Optional[F32] = None
    ) -> F32:
        """y [T, out_features], as lora_forward_multi with this pool's adapters."""
    @property
    def ranks(self) -> list[int]:
        """Each adapter's rank (0 for a None entry)."""
    @property
    def methods(self) -> list[Optional[str]]:
        """Each adapter's method: "lora", "vera", "adalora" or None."""
    @property
    def in_features(self) -> int: ...
    @property
    def out_features(self) -> int: ...
    def __len__(self) -> int: ...

# ---- NF4 (the `lorafuse.nf4` submodule) ----
class Nf4Tensor:
    """NF4 tensor in bitsandbytes' layout (QuantState field names)."""

    @property
    def packed(self) -> npt.NDArray[np.uint8]:
        """uint8 [(n + 1) // 2, 1], element 2k in the high nibble."""
    @property
    def absmax(self) -> npt.NDArray[np.uint8] | F32:
        """uint8 [nblocks] under double quant, else float32 [nblocks]."""
    @property
    def quant_map(self) -> F32:
        """float32 [16], the NF4 code."""
    @property
    def nested_absmax(self) -> Optional[F32]: ...
    @property
    def nested_quant_map(self) -> Optional[F32]: ...
    @property
    def offset(self) -> Optional[float]: ...
    @property
    def nested_blocksize(self) -> Optional[int]: ...
    @property
    def blocksize(self) -> int: ...
    @property
    def shape(self) -> Tuple[int, ...]: ...
    @property
    def double_quant(self) -> bool: ...
    @property
    def quant_type(self) -> str: ...
    @property
    def nbytes(self) -> int: ...
    def to_bnb(self, weight_key: str) -> dict[str, npt.NDArray[np.uint8] | F32]:
        """bitsandbytes checkpoint tensors under `weight_key` (weight, .absmax, .quant_map, ...)."""
    @staticmethod
    def from_bnb(tensors: dict[str, npt.NDArray[Any]], weight_key: str) -> "Nf4Tensor": ...
    def absmax_f32(self) -> F32:
        """float32 [nblocks], the decoded absmax."""
    def dequantize(self) -> F32:
        """float32 array of `shape`, bitsandbytes' dequantize_4bit bit for bit."""

class _Nf4Module:
    Nf4Tensor: type[Nf4Tensor]
    @staticmethod
    def quantize(
        w: F32, blocksize: int = 64, double_quant: bool = True, torch_threads: int | None = None
    ) -> Nf4Tensor:
        """bitsandbytes' CPU quantize_4bit(quant_type='nf4'), bit for bit; the double-quant offset
        summed as the torch in this process would (torch_threads: its get_num_threads())."""

nf4: _Nf4Module

# ---- PEFT adapter folders ----
def load_adapter(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, F32]]: ...
def save_adapter(
    path: str | os.PathLike[str], config: dict[str, Any], tensors: dict[str, F32]
) -> None: ...

# ---- fine-tuning ----
def finetune(
    out: str | os.PathLike[str],
    method: str = "lora",
    model: Optional[str | os.PathLike[str]] = None,
    data: Optional[str | os.PathLike[str]] = None,
    *,
    steps: int = 60,
    batch_size: int = 8,
    lr: Optional[float] = None,
    r: int = 8,
    lora_alpha: float = 16.0,
    use_rslora: bool = False,
    target_modules: Optional[list[str]] = None,
    warmup_steps: int = 5,
    weight_decay: float = 0.0,
    max_len: int = 128,
    seed: int = 42,
    eval: bool = True,
    bad_records: str = "reject",
    vera_d_initial: float = 0.1,
    projection_prng_key: int = 0,
    init_r: int = 12,
    target_r: int = 8,
    tinit: int = 10,
    tfinal: int = 20,
    delta_t: int = 5,
    adalora_beta1: float = 0.85,
    adalora_beta2: float = 0.85,
    orth_reg_weight: float = 0.5,
    freeze_embeddings: bool = False,
    unfreeze_every: Optional[int] = None,
    feedforward_modules: Optional[list[str]] = None,
    num_virtual_tokens: int = 20,
    prompt_tuning_init_text: Optional[str] = None,
    encoder_hidden_size: Optional[int] = None,
    prefix_projection: bool = False,
    reduction_factor: float = 16.0,
    non_linearity: Optional[str] = None,
    adapter_name: str = "lorafuse",
    fuse: Optional[list[str | os.PathLike[str]]] = None,
    chat_template: Optional[str | os.PathLike[str]] = None,
    loss_on: str = "assistant",
    truncation: str = "turns",
    compute_dtype: str = "f32",
    progress: bool = True,
) -> dict[str, Any]: ...

class FrozenWeight:
    """A frozen float32 weight checked and copied into lorafuse once; pass it as `w0` to any
    kernel instead of the array (no per-call copy or check)."""

    def __init__(self, w: F32) -> None: ...
    @property
    def shape(self) -> Tuple[int, ...]: ...
    def numpy(self) -> F32: ...
