"""torch drop-in for PEFT's LoRA-family layers, running lorafuse's fused kernels on CPU tensors.

``import lorafuse.torch`` needs torch (2.x); ``import lorafuse`` alone never imports it.

What is here:

* ``torch.autograd.Function``s (``LoraFunction``, ``DoraFunction``, ``VeraFunction``,
  ``AdaLoraFunction``) whose forward and backward call the ``lorafuse`` kernels. Tensors are
  handed over as zero-copy ``.numpy()`` views where they are contiguous (a contiguous copy is
  made otherwise); the extension copies them into its own buffers, runs the kernel with the GIL
  released, and the results come back as tensors that own numpy's memory (no further copy).
  Inputs ``x [..., in]`` of any leading shape are flattened to ``[T, in]``.
* nn.Modules ``LoraLinear``, ``DoraLinear``, ``VeraLinear``, ``AdaLoraLinear`` that hold the
  SAME Parameter objects as PEFT's layers, under PEFT's state-dict names
  (``base_layer.weight``, ``lora_A.<adapter>.weight``, ``lora_magnitude_vector.<adapter>.weight``,
  ``vera_lambda_d.<adapter>``, ``lora_E.<adapter>``, ...), and ``Nf4Linear``, a frozen 4-bit
  base weight (``lorafuse.nf4``, bitsandbytes' layout) usable as their ``base_layer``.
* ``replace_peft_layers(model)``: swaps PEFT's ``lora.Linear`` (plain, rsLoRA, DoRA),
  ``vera.Linear`` and ``adalora.SVDLinear``, and their bitsandbytes 4-bit (nf4) versions, in a
  PeftModel for these, in place. Parameters are shared, so an optimizer built before the swap
  keeps training the same tensors.

Semantics follow PEFT 0.21 exactly: the base weight and bias are frozen (no gradient, unless the
bias itself has ``requires_grad``, PEFT's ``bias="all"``); DoRA's weight norm
``||W0 + s B A||`` (per output row) is recomputed every forward and detached; AdaLoRA scales by
``scaling / (ranknum + 1e-5)``; VeRA slices ``vera_A[:, :in]`` and ``vera_B[:out, :]`` from
the shared projections and has no alpha scaling. ``merge()``/``unmerge()`` fold the adapter
into ``base_layer.weight`` (in place, as PEFT), after which forward is the plain base layer.

Mixed-adapter batches (serving, forward only): ``lora_forward_multi(x, weight, adapters,
adapter_names)`` and the module ``MultiLoraLinear`` (``MultiLoraLinear.from_peft(layer)`` over
every adapter of a PEFT layer) give, per sample, what PEFT's ``model(..., adapter_names=[...])``
gives: one base product for the whole batch plus each sample's own LoRA / VeRA / AdaLoRA term
(ranks may differ; ``"__base__"`` for none). DoRA cannot mix (PEFT refuses it too).

Scope: CPU tensors of dtype float32 only. CUDA tensors are NOT supported yet (lorafuse's CUDA
backend is not validated, and the wheel is built without it): a tensor on another device, or of
another dtype, raises ValueError/TypeError naming it. Dropout, several adapters on one layer
(outside ``MultiLoraLinear``) and ``fan_in_fan_out`` are not supported by the modules;
``replace_peft_layers`` leaves such layers to PEFT and warns (or raises with ``strict=True``).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import _lorafuse as _k

__all__ = [
    "AdaLoraFunction",
    "AdaLoraLinear",
    "DoraFunction",
    "DoraLinear",
    "LoraFunction",
    "LoraLinear",
    "MultiLoraLinear",
    "Nf4Linear",
    "VeraFunction",
    "VeraLinear",
    "lora_forward_multi",
    "replace_peft_layers",
    "restore_peft_layers",
]

Tensor = torch.Tensor


# ---- tensors <-> numpy -------------------------------------------------------------------------


def _np(t: Tensor, name: str) -> np.ndarray:
    """A float32 numpy view of CPU tensor `t` (zero-copy when contiguous).

    Raises:
        ValueError: `t` is not on the CPU.
        TypeError: `t` is not float32.
    """
    if t.device.type != "cpu":
        raise ValueError(
            f"`{name}` is on {t.device}; lorafuse.torch runs on CPU tensors only "
            "(the CUDA backend is not validated yet)"
        )
    if t.dtype != torch.float32:
        raise TypeError(f"`{name}` must be torch.float32, got {t.dtype}")
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.resolve_conj().resolve_neg().numpy()


def _frozen(w: Tensor):
    """The frozen base weight `w` as a `lorafuse.FrozenWeight`: copied into lorafuse and checked
    once, then reused by every call until `w` changes: a new storage (``w.data = ...``) or an
    in-place change that autograd counts (``copy_``/``add_`` under ``no_grad``, a merge,
    ``load_state_dict``). A change made through ``w.data.<op>_()`` is invisible to torch's
    version counter; after one, delete ``w._lorafuse_frozen`` to refresh.
    """
    key = (w.data_ptr(), w._version)
    cached = getattr(w, "_lorafuse_frozen", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    fw = _k.FrozenWeight(_np(w, "w0"))
    w._lorafuse_frozen = (key, fw)
    return fw


def _base(w0: Any):
    """A base weight as the kernels take it: a float32 tensor as a cached `FrozenWeight`, or an
    ``nf4.Nf4Tensor`` as it is (the products dequantize it tile by tile)."""
    return _frozen(w0) if isinstance(w0, Tensor) else w0


def _save_base(ctx: Any, w0: Any, *tensors: Tensor) -> None:
    """save_for_backward for the tensors (w0 among them when it is a tensor)."""
    if isinstance(w0, Tensor):
        ctx.save_for_backward(w0, *tensors)
        ctx.nf4 = None
    else:
        ctx.save_for_backward(*tensors)
        ctx.nf4 = w0


def _saved_base(ctx: Any) -> Tuple[Any, Tuple[Tensor, ...]]:
    saved = ctx.saved_tensors
    return (saved[0], saved[1:]) if ctx.nf4 is None else (ctx.nf4, saved)


def _opt(t: Optional[Tensor], name: str) -> Optional[np.ndarray]:
    return None if t is None else _np(t, name)


def _tokens(x: Tensor) -> Tensor:
    """`x [..., in]` as `[T, in]` (a view when possible)."""
    if x.dim() < 1:
        raise ValueError(f"`x` must have at least 1 dim [..., in], got shape {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1])


def _back(a: np.ndarray, lead: Tuple[int, ...]) -> Tensor:
    """A result array as a tensor of shape `lead + (last dim,)`, sharing numpy's memory."""
    t = torch.from_numpy(a)
    return t.reshape(*lead, t.shape[-1])


def _bias_grad(ctx: Any, i: int, dy2: Tensor) -> Optional[Tensor]:
    return dy2.sum(0) if ctx.needs_input_grad[i] else None


# ---- autograd functions ------------------------------------------------------------------------


class LoraFunction(torch.autograd.Function):
    """``y = x @ w0.T + bias + scaling * (x @ lora_A.T) @ lora_B.T`` with lorafuse's kernels.

    ``apply(x [..., in], w0 [out, in], bias [out] | None, lora_A [r, in], lora_B [out, r],
    scaling: float) -> y [..., out]``; all float32 CPU tensors, except that w0 may be an
    ``nf4.Nf4Tensor`` (QLoRA). Gradients: x, lora_A, lora_B (and bias when it requires grad); w0
    is treated as frozen (no gradient).
    """

    @staticmethod
    def forward(ctx, x, w0, bias, lora_A, lora_B, scaling):  # type: ignore[override]
        x2 = _tokens(x)
        y = _k.lora_forward(
            _np(x2, "x"), _base(w0), _np(lora_A, "lora_A"), _np(lora_B, "lora_B"),
            float(scaling), _opt(bias, "bias"),
        )
        _save_base(ctx, w0, x2, lora_A, lora_B)
        ctx.scaling, ctx.x_shape = float(scaling), x.shape
        return _back(y, tuple(x.shape[:-1]))

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        w0, (x2, a, b) = _saved_base(ctx)
        dy2 = _tokens(dy)
        dx, da, db = _k.lora_backward(
            _np(dy2, "dy"), _np(x2, "x"), _base(w0), _np(a, "lora_A"), _np(b, "lora_B"),
            ctx.scaling,
        )
        dx = torch.from_numpy(dx).reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return dx, None, _bias_grad(ctx, 2, dy2), torch.from_numpy(da), torch.from_numpy(db), None


class DoraFunction(torch.autograd.Function):
    """DoRA (PEFT ``use_dora=True``): ``y = (m / n) * (x @ w0.T + s * (x @ lora_A.T) @ lora_B.T) + bias``
    with ``n = ||w0 + s * lora_B @ lora_A||`` per output row, computed here and detached.

    ``apply(x [..., in], w0 [out, in], bias [out] | None, lora_A [r, in], lora_B [out, r],
    magnitude [out], scaling: float) -> y [..., out]``; float32 CPU tensors, except that w0 may
    be an ``nf4.Nf4Tensor`` (QDoRA). Gradients: x, lora_A, lora_B, magnitude (and bias when it
    requires grad); none for w0 or through n.
    """

    @staticmethod
    def forward(ctx, x, w0, bias, lora_A, lora_B, magnitude, scaling):  # type: ignore[override]
        x2 = _tokens(x)
        s = float(scaling)
        # weight_norm=None: the kernel computes n itself (low-rank identity, no B @ A) and
        # returns it with the forward's saved h and z, so backward recomputes nothing.
        y, h, z, n = _k.dora_forward(
            _np(x2, "x"), _base(w0), _np(lora_A, "lora_A"), _np(lora_B, "lora_B"), s,
            _np(magnitude, "magnitude"), None, _opt(bias, "bias"), return_saved=True,
        )
        _save_base(ctx, w0, x2, lora_A, lora_B, magnitude)
        ctx.dora_saved = (h, z, n)
        ctx.scaling, ctx.x_shape = s, x.shape
        return _back(y, tuple(x.shape[:-1]))

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        w0, (x2, a, b, m) = _saved_base(ctx)
        h, z, n = ctx.dora_saved
        dy2 = _tokens(dy)
        dx, da, db, dm = _k.dora_backward(
            _np(dy2, "dy"), _np(x2, "x"), _base(w0), _np(a, "lora_A"), _np(b, "lora_B"),
            ctx.scaling, _np(m, "magnitude"), n, h, z,
        )
        dx = torch.from_numpy(dx).reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return (
            dx, None, _bias_grad(ctx, 2, dy2),
            torch.from_numpy(da), torch.from_numpy(db), torch.from_numpy(dm), None,
        )


class VeraFunction(torch.autograd.Function):
    """VeRA (PEFT ``vera.Linear``): ``y = x @ w0.T + bias + lambda_b * ((lambda_d * (x @ As.T)) @ Bs.T)``
    with ``As = vera_A[:, :in]``, ``Bs = vera_B[:out, :]`` (sliced inside the kernel).

    ``apply(x [..., in], w0 [out, in], bias [out] | None, vera_A [r, max_in],
    vera_B [max_out, r], lambda_d [r], lambda_b [out]) -> y [..., out]``; float32 CPU tensors.
    Gradients: x, lambda_d, lambda_b (and bias when it requires grad); the shared projections
    and w0 are frozen.
    """

    @staticmethod
    def forward(ctx, x, w0, bias, vera_A, vera_B, lambda_d, lambda_b):  # type: ignore[override]
        x2 = _tokens(x)
        y = _k.vera_forward(
            _np(x2, "x"), _frozen(w0), _np(vera_A, "vera_A"), _np(vera_B, "vera_B"),
            _np(lambda_d, "lambda_d"), _np(lambda_b, "lambda_b"), _opt(bias, "bias"),
        )
        ctx.save_for_backward(x2, w0, vera_A, vera_B, lambda_d, lambda_b)
        ctx.x_shape = x.shape
        return _back(y, tuple(x.shape[:-1]))

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x2, w0, va, vb, ld, lb = ctx.saved_tensors
        dy2 = _tokens(dy)
        dx, dld, dlb = _k.vera_backward(
            _np(dy2, "dy"), _np(x2, "x"), _frozen(w0), _np(va, "vera_A"), _np(vb, "vera_B"),
            _np(ld, "lambda_d"), _np(lb, "lambda_b"),
        )
        dx = torch.from_numpy(dx).reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return (
            dx, None, _bias_grad(ctx, 2, dy2), None, None,
            torch.from_numpy(dld), torch.from_numpy(dlb),
        )


class AdaLoraFunction(torch.autograd.Function):
    """AdaLoRA (PEFT ``adalora.SVDLinear``):
    ``y = x @ w0.T + bias + (x @ (lora_A * lora_E).T) @ lora_B.T * scaling / (ranknum + 1e-5)``.

    ``apply(x [..., in], w0 [out, in], bias [out] | None, lora_A [r, in], lora_B [out, r],
    lora_E [r, 1], scaling: float, ranknum: float) -> y [..., out]``; float32 CPU tensors.
    Gradients: x, lora_A, lora_B, lora_E (also for masked ranks, as PEFT) and bias when it
    requires grad.
    """

    @staticmethod
    def forward(ctx, x, w0, bias, lora_A, lora_B, lora_E, scaling, ranknum):  # type: ignore[override]
        x2 = _tokens(x)
        y = _k.adalora_forward(
            _np(x2, "x"), _frozen(w0), _np(lora_A, "lora_A"), _np(lora_B, "lora_B"),
            _np(lora_E, "lora_E"), float(scaling), float(ranknum), _opt(bias, "bias"),
        )
        ctx.save_for_backward(x2, w0, lora_A, lora_B, lora_E)
        ctx.scaling, ctx.ranknum, ctx.x_shape = float(scaling), float(ranknum), x.shape
        return _back(y, tuple(x.shape[:-1]))

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x2, w0, a, b, e = ctx.saved_tensors
        dy2 = _tokens(dy)
        dx, da, db, de = _k.adalora_backward(
            _np(dy2, "dy"), _np(x2, "x"), _frozen(w0), _np(a, "lora_A"), _np(b, "lora_B"),
            _np(e, "lora_E"), ctx.scaling, ctx.ranknum,
        )
        dx = torch.from_numpy(dx).reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return (
            dx, None, _bias_grad(ctx, 2, dy2),
            torch.from_numpy(da), torch.from_numpy(db), torch.from_numpy(de), None, None,
        )


# ---- the frozen NF4 base -----------------------------------------------------------------------


class Nf4Linear(nn.Module):
    """A frozen linear layer whose weight is stored NF4-quantized (``lorafuse.nf4.Nf4Tensor``,
    bitsandbytes' layout and values): ``y = x @ W.T + bias`` with ``W = weight.dequantize()``.

    Its own forward dequantizes the weight to float32 ``[out, in]``. As the ``base_layer`` of
    ``LoraLinear`` / ``DoraLinear`` (QLoRA / QDoRA on CPU) the kernels take the NF4 tensor itself
    and dequantize it tile by tile inside the products, so the float32 weight never exists
    whole; ``VeraLinear`` and ``AdaLoraLinear`` over it use the dequantized weight.

    Args:
        weight: an ``Nf4Tensor`` of shape ``(out, in)``.
        bias: optional float32 ``[out]`` tensor (frozen unless it requires grad).

    Raises:
        ValueError: ``weight`` is not 2-D, or ``bias`` does not have ``out`` elements.
    """

    def __init__(self, weight: Any, bias: Optional[Tensor] = None) -> None:
        super().__init__()
        shape = tuple(weight.shape)
        if len(shape) != 2:
            raise ValueError(f"`weight` must be a 2-D Nf4Tensor (out, in), got shape {shape}")
        self.out_features, self.in_features = shape
        self.nf4 = weight
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"`bias` must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(
            bias.detach(), requires_grad=False
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> "Nf4Linear":
        """Quantizes a float32 CPU ``nn.Linear``'s weight with ``lorafuse.nf4.quantize`` (bit for
        bit bitsandbytes' CPU ``quantize_4bit``); the bias Parameter is shared, not copied."""
        q = _k.nf4.quantize(_np(linear.weight, "weight"), blocksize=blocksize, double_quant=double_quant)
        return cls(q, linear.bias)

    @classmethod
    def from_bnb(cls, layer: nn.Module) -> "Nf4Linear":
        """From a bitsandbytes ``Linear4bit`` (nf4) on the CPU: its packed weight and quant state
        go through ``Nf4Tensor.from_bnb`` (the checkpoint tensors bitsandbytes writes).

        Raises:
            ValueError: the layer is not quantized nf4 (e.g. fp4 or not yet quantized).
        """
        w = layer.weight
        qs = getattr(w, "quant_state", None)
        if qs is None or getattr(qs, "quant_type", "nf4") != "nf4":
            raise ValueError("`layer` must be a quantized bitsandbytes Linear4bit with quant_type='nf4'")
        key = "weight"
        tensors = {key: w.detach().cpu().numpy()}
        for k, v in qs.as_dict(packed=True).items():
            tensors[f"{key}.{k}"] = v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)
        return cls(_k.nf4.Nf4Tensor.from_bnb(tensors, key), layer.bias)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight, float32 ``[out, in]`` (a new tensor on each access)."""
        return torch.from_numpy(self.nf4.dequantize())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4={self.nf4!r}"


# ---- modules -----------------------------------------------------------------------------------


class _Weight(nn.Module):
    """Holds one Parameter as ``weight``, so state-dict names match PEFT's
    (``lora_A.default.weight``, ``lora_magnitude_vector.default.weight``)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight


def _param(t: Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t)


def _check_base(base_layer: nn.Module) -> None:
    if not isinstance(base_layer, (nn.Linear, Nf4Linear)):
        raise TypeError(f"`base_layer` must be nn.Linear or Nf4Linear, got {type(base_layer).__name__}")
    if isinstance(base_layer, nn.Linear):
        # Frozen, as PEFT freezes it; the kernels never produce a gradient for it.
        base_layer.weight.requires_grad_(False)


class _AdapterLinear(nn.Module):
    """Shared plumbing: ``base_layer``, the merged flag, ``in_features``/``out_features``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str) -> None:
        super().__init__()
        _check_base(base_layer)
        self.base_layer = base_layer
        self.adapter_name = adapter_name
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.merged = False

    def _w0(self) -> Tensor:
        return self.base_layer.weight

    def _kernel_w0(self) -> Any:
        """What the LoRA/DoRA kernels take as w0: the NF4 tensor itself over an ``Nf4Linear``
        (QLoRA/QDoRA: dequantized tile by tile inside the products), else the weight."""
        if isinstance(self.base_layer, Nf4Linear):
            return self.base_layer.nf4
        return self.base_layer.weight

    def _set_w0(self, w: np.ndarray) -> None:
        if isinstance(self.base_layer, Nf4Linear):
            raise TypeError("merge/unmerge need a float base weight; an NF4 base cannot hold the merged weight")
        with torch.no_grad():
            self.base_layer.weight.copy_(torch.from_numpy(w))

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., in]`` float32 CPU -> ``[..., out]``.

        Raises:
            ValueError: ``x``'s last dim is not ``in_features``, or a tensor is not on the CPU.
            TypeError: a tensor is not float32.
        """
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"`x` must have shape [..., in={self.in_features}], got {tuple(x.shape)}"
            )
        if self.merged:
            return self.base_layer(x)
        return self._adapter_forward(x)

    def _adapter_forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def merge(self) -> None:
        """Folds the adapter into ``base_layer.weight`` in place (as PEFT's ``merge``);
        forward is then the base layer alone. A second merge warns and does nothing."""
        if self.merged:
            warnings.warn("Already merged. Nothing to do.")
            return
        self._merge()
        self.merged = True

    def unmerge(self) -> None:
        """Undoes ``merge`` (PEFT's ``unmerge``). Warns and does nothing when not merged."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self._unmerge()
        self.merged = False


class LoraLinear(_AdapterLinear):
    """LoRA over a frozen linear layer (PEFT ``lora.Linear``, incl. rsLoRA via ``scaling``):
    ``y = base_layer(x) + scaling * (x @ lora_A.T) @ lora_B.T``.

    Args:
        base_layer: ``nn.Linear`` (float32, CPU) or ``Nf4Linear``; its weight is set frozen.
        lora_A: float32 ``[r, in]`` Parameter (used as is, not copied).
        lora_B: float32 ``[out, r]`` Parameter.
        scaling: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` for rsLoRA).
        adapter_name: the key in the PEFT-style containers (``lora_A.<name>.weight``).

    Forward: ``x [..., in]`` float32 CPU -> ``[..., out]``; TypeError/ValueError for another
    dtype/device or a shape mismatch (raised by the kernel, naming the argument).
    """

    def __init__(
        self, base_layer: nn.Module, lora_A: Tensor, lora_B: Tensor, scaling: float,
        adapter_name: str = "default",
    ) -> None:
        super().__init__(base_layer, adapter_name)
        self.lora_A = nn.ModuleDict({adapter_name: _Weight(_param(lora_A))})
        self.lora_B = nn.ModuleDict({adapter_name: _Weight(_param(lora_B))})
        self.scaling = float(scaling)

    @property
    def A(self) -> nn.Parameter:
        return self.lora_A[self.adapter_name].weight

    @property
    def B(self) -> nn.Parameter:
        return self.lora_B[self.adapter_name].weight

    def _adapter_forward(self, x: Tensor) -> Tensor:
        return LoraFunction.apply(x, self._kernel_w0(), self.base_layer.bias, self.A, self.B, self.scaling)

    def _merge(self) -> None:
        self._set_w0(_k.lora_merge(_np(self._w0(), "w0"), _np(self.A, "lora_A"), _np(self.B, "lora_B"), self.scaling))

    def _unmerge(self) -> None:
        self._set_w0(_k.lora_unmerge(_np(self._w0(), "w"), _np(self.A, "lora_A"), _np(self.B, "lora_B"), self.scaling))

    def extra_repr(self) -> str:
        return f"r={self.A.shape[0]}, scaling={self.scaling}, merged={self.merged}"


class DoraLinear(LoraLinear):
    """DoRA over a frozen linear layer (PEFT ``lora.Linear`` with ``use_dora=True``):
    ``y = (m / n) * (x @ W0.T + scaling * (x @ lora_A.T) @ lora_B.T) + bias`` where
    ``n = ||W0 + scaling * lora_B @ lora_A||`` per output row, recomputed each forward and
    detached (DoRA paper section 4.3, as PEFT).

    Args:
        base_layer, lora_A, lora_B, scaling, adapter_name: as ``LoraLinear``.
        magnitude: float32 ``[out]`` Parameter (PEFT's ``lora_magnitude_vector[name].weight``).
    """

    def __init__(
        self, base_layer: nn.Module, lora_A: Tensor, lora_B: Tensor, scaling: float,
        magnitude: Tensor, adapter_name: str = "default",
    ) -> None:
        super().__init__(base_layer, lora_A, lora_B, scaling, adapter_name)
        self.lora_magnitude_vector = nn.ModuleDict({adapter_name: _Weight(_param(magnitude))})
        self._merged_norm: Optional[np.ndarray] = None

    @property
    def magnitude(self) -> nn.Parameter:
        return self.lora_magnitude_vector[self.adapter_name].weight

    def _adapter_forward(self, x: Tensor) -> Tensor:
        return DoraFunction.apply(
            x, self._kernel_w0(), self.base_layer.bias, self.A, self.B, self.magnitude, self.scaling
        )

    def _merge(self) -> None:
        w0, a, b = _np(self._w0(), "w0"), _np(self.A, "lora_A"), _np(self.B, "lora_B")
        norm = _k.dora_weight_norm(w0, a, b, self.scaling)
        self._set_w0(_k.dora_merge(w0, a, b, self.scaling, _np(self.magnitude, "magnitude"), norm))
        self._merged_norm = norm

    def _unmerge(self) -> None:
        assert self._merged_norm is not None
        self._set_w0(
            _k.dora_unmerge(
                _np(self._w0(), "w"), _np(self.A, "lora_A"), _np(self.B, "lora_B"), self.scaling,
                _np(self.magnitude, "magnitude"), self._merged_norm,
            )
        )
        self._merged_norm = None


class _Buffers(nn.Module):
    """Holds VeRA's shared projections as non-persistent buffers (the same tensor objects)."""

    def __init__(self, name: str, t: Tensor) -> None:
        super().__init__()
        self.register_buffer(name, t, persistent=False)

    def __getitem__(self, name: str) -> Tensor:
        # VeraLinear reads ``vera_A[adapter_name]``, as from PEFT's BufferDict.
        return self._buffers[name]


class VeraLinear(_AdapterLinear):
    """VeRA over a frozen linear layer (PEFT ``vera.Linear``):
    ``y = base_layer(x) + lambda_b * ((lambda_d * (x @ vera_A[:, :in].T)) @ vera_B[:out, :].T)``.

    Args:
        base_layer: as ``LoraLinear``.
        vera_A: float32 ``[r, max_in]`` shared projection (frozen; ``max_in >= in``), or the
            PEFT layer's ``vera_A`` BufferDict (kept as is).
        vera_B: float32 ``[max_out, r]`` shared projection, or PEFT's ``vera_B`` BufferDict.
        lambda_d: float32 ``[r]`` Parameter.
        lambda_b: float32 ``[out]`` Parameter.
        adapter_name: key in the containers (``vera_lambda_d.<name>``).
    """

    def __init__(
        self, base_layer: nn.Module, vera_A: Any, vera_B: Any, lambda_d: Tensor, lambda_b: Tensor,
        adapter_name: str = "default",
    ) -> None:
        super().__init__(base_layer, adapter_name)
        self.vera_A = vera_A if isinstance(vera_A, nn.Module) else _Buffers(adapter_name, vera_A)
        self.vera_B = vera_B if isinstance(vera_B, nn.Module) else _Buffers(adapter_name, vera_B)
        self.vera_lambda_d = nn.ParameterDict({adapter_name: _param(lambda_d)})
        self.vera_lambda_b = nn.ParameterDict({adapter_name: _param(lambda_b)})

    def _tensors(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        n = self.adapter_name
        return self.vera_A[n], self.vera_B[n], self.vera_lambda_d[n], self.vera_lambda_b[n]

    def _adapter_forward(self, x: Tensor) -> Tensor:
        va, vb, ld, lb = self._tensors()
        return VeraFunction.apply(x, self._w0(), self.base_layer.bias, va, vb, ld, lb)

    def _args(self) -> List[np.ndarray]:
        va, vb, ld, lb = self._tensors()
        return [_np(va, "vera_A"), _np(vb, "vera_B"), _np(ld, "lambda_d"), _np(lb, "lambda_b")]

    def _merge(self) -> None:
        self._set_w0(_k.vera_merge(_np(self._w0(), "w0"), *self._args()))

    def _unmerge(self) -> None:
        self._set_w0(_k.vera_unmerge(_np(self._w0(), "w"), *self._args()))


class AdaLoraLinear(_AdapterLinear):
    """AdaLoRA over a frozen linear layer (PEFT ``adalora.SVDLinear``):
    ``y = base_layer(x) + (x @ (lora_A * lora_E).T) @ lora_B.T * scaling / (ranknum + 1e-5)``.

    Args:
        base_layer: as ``LoraLinear``.
        lora_A: float32 ``[r, in]`` Parameter; lora_B: ``[out, r]``; lora_E: ``[r, 1]`` (the
            singular values, which PEFT's RankAllocator masks in place; read at each call).
        scaling: ``lora_alpha`` (PEFT's ``scaling[name]``).
        ranknum: float, or PEFT's ``ranknum[name]`` (a non-trainable Parameter), read at each call.
        adapter_name: key in the containers (``lora_E.<name>``).
    """

    def __init__(
        self, base_layer: nn.Module, lora_A: Tensor, lora_B: Tensor, lora_E: Tensor, scaling: float,
        ranknum: Any, adapter_name: str = "default",
    ) -> None:
        super().__init__(base_layer, adapter_name)
        self.lora_A = nn.ParameterDict({adapter_name: _param(lora_A)})
        self.lora_B = nn.ParameterDict({adapter_name: _param(lora_B)})
        self.lora_E = nn.ParameterDict({adapter_name: _param(lora_E)})
        if not isinstance(ranknum, Tensor):
            ranknum = torch.tensor(float(ranknum))
        if not isinstance(ranknum, nn.Parameter):
            ranknum = nn.Parameter(ranknum, requires_grad=False)
        self.ranknum = nn.ParameterDict({adapter_name: ranknum})
        self.scaling = float(scaling)

    def _tensors(self) -> Tuple[Tensor, Tensor, Tensor, float]:
        n = self.adapter_name
        return self.lora_A[n], self.lora_B[n], self.lora_E[n], float(self.ranknum[n])

    def _adapter_forward(self, x: Tensor) -> Tensor:
        a, b, e, rn = self._tensors()
        return AdaLoraFunction.apply(x, self._w0(), self.base_layer.bias, a, b, e, self.scaling, rn)

    def _merge_with(self, fn: Any, wname: str) -> None:
        a, b, e, rn = self._tensors()
        self._set_w0(fn(_np(self._w0(), wname), _np(a, "lora_A"), _np(b, "lora_B"), _np(e, "lora_E"), self.scaling, rn))

    def _merge(self) -> None:
        self._merge_with(_k.adalora_merge, "w0")

    def _unmerge(self) -> None:
        self._merge_with(_k.adalora_unmerge, "w")


# ---- swapping PEFT's layers --------------------------------------------------------------------


def _peft_classes() -> List[Tuple[str, type]]:
    """(kind, PEFT layer class) pairs; PEFT's bitsandbytes 4-bit classes too when bitsandbytes is
    importable (PEFT defines them only then)."""
    from peft.tuners import adalora, lora, vera

    classes = [("lora", lora.Linear), ("vera", vera.Linear), ("adalora", adalora.SVDLinear)]
    try:
        from peft.tuners.adalora.bnb import SVDLinear4bit
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:
        return classes
    return classes + [("lora", Linear4bit), ("adalora", SVDLinear4bit)]


def _is_bnb_4bit(base: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` (by class name, so bitsandbytes need not be imported)."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes")
               for c in type(base).__mro__)


def _dropout_p(m: nn.Module) -> float:
    return float(m.p) if isinstance(m, nn.Dropout) else 0.0 if isinstance(m, nn.Identity) else math.nan


def _why_not(kind: str, layer: nn.Module) -> Optional[str]:
    """None when `layer` can be swapped, else the reason (for the warning / error)."""
    keys = list((layer.vera_lambda_d if kind == "vera" else layer.lora_A).keys())
    if len(keys) != 1:
        return f"{len(keys)} adapters on the layer ({keys}); only a single adapter is supported"
    name = keys[0]
    if list(layer.active_adapters) != [name]:
        return f"active adapters {list(layer.active_adapters)} are not exactly [{name!r}]"
    if layer.disable_adapters:
        return "adapters are disabled on this layer"
    base = layer.get_base_layer()
    four_bit = _is_bnb_4bit(base)
    if type(base) is not nn.Linear and not four_bit:
        return f"base layer is {type(base).__name__}, not a plain nn.Linear or bitsandbytes Linear4bit"
    if four_bit:
        qs = getattr(base.weight, "quant_state", None)
        if qs is None:
            return "bitsandbytes Linear4bit whose weight is not quantized yet"
        if getattr(qs, "quant_type", None) != "nf4":
            return f"bitsandbytes Linear4bit with quant_type {getattr(qs, 'quant_type', None)!r}; only 'nf4'"
        if layer.merged:
            return "merged 4-bit layer (the merged weight was re-quantized by PEFT; unmerge it first)"
        if base.weight.device.type != "cpu":
            return f"tensor on {base.weight.device}; only CPU tensors are supported (the CUDA backend is not validated yet)"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out=True is not supported"
    drop = (layer.vera_dropout if kind == "vera" else layer.lora_dropout)[name]
    if _dropout_p(drop) != 0.0:
        return f"dropout {drop!r} > 0 is not supported (the kernels have no dropout)"
    tensors = ([] if four_bit else [base.weight]) + ([base.bias] if base.bias is not None else [])
    if kind == "lora":
        tensors += [layer.lora_A[name].weight, layer.lora_B[name].weight]
        variant = layer.lora_variant.get(name)
        if variant is not None and type(variant).__name__ != "DoraLinearVariant":
            return f"LoRA variant {type(variant).__name__} is not supported"
        if variant is not None:
            tensors.append(layer.lora_magnitude_vector[name].weight)
            if layer.merged and f"{name}-weight_norm" not in getattr(layer, "_caches", {}):
                return "merged DoRA layer without PEFT's cached weight norm"
        if getattr(layer, "lora_bias", {}).get(name, False):
            return "lora_bias=True is not supported"
    elif kind == "vera":
        tensors += [layer.vera_A[name], layer.vera_B[name], layer.vera_lambda_d[name], layer.vera_lambda_b[name]]
    else:
        tensors += [layer.lora_A[name], layer.lora_B[name], layer.lora_E[name]]
    for t in tensors:
        if t.device.type != "cpu":
            return f"tensor on {t.device}; only CPU tensors are supported (the CUDA backend is not validated yet)"
        if t.dtype != torch.float32:
            return f"dtype {t.dtype}; only float32 is supported"
    return None


def _swap(kind: str, layer: nn.Module) -> nn.Module:
    name = layer.active_adapters[0]
    base = layer.get_base_layer()
    if _is_bnb_4bit(base):
        # The same NF4 bytes, absmax and quant state, held by lorafuse; the bias is shared.
        base = Nf4Linear.from_bnb(base)
    new: _AdapterLinear
    if kind == "lora":
        a, b, s = layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]
        if name in layer.lora_variant:
            new = DoraLinear(base, a, b, s, layer.lora_magnitude_vector[name].weight, name)
            if layer.merged:
                new._merged_norm = _np(layer._caches[f"{name}-weight_norm"], "weight_norm").copy()
        else:
            new = LoraLinear(base, a, b, s, name)
    elif kind == "vera":
        new = VeraLinear(base, layer.vera_A, layer.vera_B, layer.vera_lambda_d[name], layer.vera_lambda_b[name], name)
    else:
        new = AdaLoraLinear(
            base, layer.lora_A[name], layer.lora_B[name], layer.lora_E[name], layer.scaling[name],
            layer.ranknum[name], name,
        )
    new.merged = bool(layer.merged)
    new.train(layer.training)
    # The PEFT layer, for restore_peft_layers; not a registered submodule, so its parameters
    # (the same objects) are not listed twice.
    object.__setattr__(new, "_peft_layer", layer)
    return new


def replace_peft_layers(model: nn.Module, *, strict: bool = False) -> List[str]:
    """Swaps PEFT's layers in ``model`` for lorafuse's, in place, and returns the swapped names.

    Handled: ``peft.tuners.lora.Linear`` (plain LoRA, rsLoRA, ``use_dora=True``) ->
    ``LoraLinear``/``DoraLinear``; ``peft.tuners.vera.Linear`` -> ``VeraLinear``;
    ``peft.tuners.adalora.SVDLinear`` -> ``AdaLoraLinear``. The new modules hold the SAME
    Parameter objects (base weight and bias, ``lora_A``/``lora_B``, ``lora_magnitude_vector``,
    ``vera_lambda_*``, ``lora_E``, ``ranknum``) under the same state-dict names, so an optimizer
    created before the call keeps working and ``model.state_dict()`` keys do not change. A merged
    layer stays merged (``unmerge()`` works on the new module).

    QLoRA / QDoRA / 4-bit AdaLoRA: PEFT's bitsandbytes layers (``lora.bnb.Linear4bit``, also
    with ``use_dora=True``, and ``adalora.bnb.SVDLinear4bit``) over an nf4 ``Linear4bit`` on the
    CPU are swapped too; their base becomes an ``Nf4Linear`` holding the same packed bytes and
    quant state (``Nf4Linear.from_bnb``, values bit-identical to bitsandbytes' dequantization)
    and the same bias Parameter. The base's packed weight is then not a Parameter of the model:
    ``state_dict()`` loses PEFT's 4-bit base entries until ``restore_peft_layers``.

    Left to PEFT (a warning per layer, or ValueError with ``strict=True``): dropout > 0, more
    than one adapter on the layer or a different active adapter, disabled adapters, a base that
    is neither a plain ``nn.Linear`` nor an nf4 bitsandbytes ``Linear4bit`` (fp4, 8-bit), a
    merged 4-bit layer, ``fan_in_fan_out``, ``lora_bias``, LoRA variants other than DoRA,
    tensors that are not float32 or not on the CPU.

    After the swap, PEFT's own layer-walking helpers (``save_pretrained``, ``merge_and_unload``,
    ``set_adapter``, ``disable_adapter``) no longer see these layers: call
    ``restore_peft_layers(model)`` first (and ``replace_peft_layers`` again to go on training).
    AdaLoRA's ``update_and_allocate`` (rank masking of ``lora_E``) works on the swapped model.

    Args:
        model: any nn.Module, typically a ``peft.PeftModel``.
        strict: raise instead of warning on a layer that cannot be swapped.

    Raises:
        ImportError: peft is not installed.
        ValueError: with ``strict=True``, naming the layer and the reason.
    """
    classes = _peft_classes()
    todo = []
    for mod_name, m in model.named_modules():
        for kind, cls in classes:
            if type(m) is cls:
                todo.append((mod_name, kind, m))
    swapped = []
    for mod_name, kind, m in todo:
        reason = _why_not(kind, m)
        if reason is not None:
            msg = f"lorafuse.torch.replace_peft_layers: {mod_name} ({type(m).__name__}) left to PEFT: {reason}"
            if strict:
                raise ValueError(msg)
            warnings.warn(msg, stacklevel=2)
            continue
        parent_name, _, attr = mod_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, _swap(kind, m))
        swapped.append(mod_name)
    return swapped


def restore_peft_layers(model: nn.Module) -> List[str]:
    """Puts back the PEFT layers that ``replace_peft_layers`` swapped out, in place, and returns
    their names. They hold the same (trained) Parameter objects, and take over the merged state
    of the lorafuse module. Use it before PEFT's ``save_pretrained``, ``merge_and_unload``,
    ``set_adapter``, ... (which only see PEFT's own layer classes); swap again afterwards with
    ``replace_peft_layers``. Modules built by hand (no PEFT layer behind them) are left alone.
    """
    todo = [
        (n, m) for n, m in model.named_modules()
        if isinstance(m, _AdapterLinear) and getattr(m, "_peft_layer", None) is not None
    ]
    for mod_name, m in todo:
        layer = m._peft_layer
        name = m.adapter_name
        if m.merged != bool(layer.merged):
            layer.merged_adapters[:] = [name] if m.merged else []
            caches = getattr(layer, "_caches", None)
            if isinstance(m, DoraLinear) and caches is not None:
                key = f"{name}-weight_norm"
                caches.pop(key, None)
                if m.merged:
                    caches[key] = torch.from_numpy(m._merged_norm.copy())
        layer.train(m.training)
        parent_name, _, attr = mod_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, layer)
    return [n for n, _ in todo]


# ---- many adapters in one batch (serving) ------------------------------------------------------

_BASE = "__base__"
# The keys of a term that are floats (a tensor there, e.g. AdaLoRA's ``ranknum`` Parameter, is
# read as a float); every other value is a float32 CPU tensor.
_SCALAR_KEYS = ("scaling", "ranknum")

Term = Optional[Dict[str, Any]]


def _term_np(term: Term, where: str) -> Optional[Dict[str, Any]]:
    """An adapter term of tensors and floats as the numpy kernels take it (zero-copy views)."""
    if term is None:
        return None
    if not isinstance(term, dict):
        raise TypeError(
            f"`{where}` must be a dict (LoRA: lora_A, lora_B, scaling; VeRA: vera_A, vera_B, "
            f"lambda_d, lambda_b; AdaLoRA: lora_A, lora_B, lora_E, scaling, ranknum) or None, "
            f"got {type(term).__name__}"
        )
    out: Dict[str, Any] = {}
    for k, v in term.items():
        if isinstance(v, Tensor):
            v = float(v.detach()) if k in _SCALAR_KEYS and v.numel() == 1 else _np(v, f"{where}.{k}")
        out[k] = v
    return out


def _split_adapters(adapters: Any) -> Tuple[Optional[List[str]], List[Term]]:
    """(names, terms) of a ``{name: term}`` dict, or (None, terms) of a list."""
    if isinstance(adapters, dict):
        names = list(adapters)
        if not all(isinstance(n, str) for n in names):
            raise TypeError("`adapters` keys must be adapter names (str)")
        return names, list(adapters.values())
    if isinstance(adapters, (list, tuple)):
        return None, list(adapters)
    raise TypeError(
        f"`adapters` must be a dict {{name: term}}, a list of terms or a lorafuse.LoraPool, "
        f"got {type(adapters).__name__}"
    )


def _adapter_rows(
    adapter_names: Any, names: Optional[Sequence[str]], k: int, x: Tensor, strict: bool
) -> np.ndarray:
    """The adapter index (-1: base) of every row of ``x.reshape(-1, in)``, from one entry per
    sample of ``x`` (dim 0, as PEFT's ``adapter_names``): a name (``"__base__"`` or None: the
    base model), or an index in ``-1..k``. A name that is not an adapter here raises with
    ``strict``, and is the base model otherwise (PEFT's layers skip it so)."""
    if isinstance(adapter_names, (Tensor, np.ndarray)):
        adapter_names = adapter_names.tolist()
    if not isinstance(adapter_names, (list, tuple)):
        raise TypeError(
            f"`adapter_names` must be a list with one adapter name or index per sample, "
            f"got {type(adapter_names).__name__}"
        )
    batch = x.shape[0]
    if len(adapter_names) != batch:
        raise ValueError(
            f"`adapter_names` must have one entry per sample of x (x.shape[0] = {batch}), "
            f"got {len(adapter_names)}"
        )
    index = {n: i for i, n in enumerate(names or [])}
    rows = []
    for j, n in enumerate(adapter_names):
        if n is None or n == _BASE:
            rows.append(-1)
        elif isinstance(n, str):
            if n in index:
                rows.append(index[n])
            elif strict:
                known = ", ".join(repr(m) for m in names or []) or "none by name"
                raise ValueError(
                    f"`adapter_names[{j}]` = {n!r} is not one of the adapters ({known}); "
                    f"'__base__' for the base model"
                )
            else:
                rows.append(-1)
        elif isinstance(n, (int, np.integer)) and not isinstance(n, bool):
            if not -1 <= int(n) < k:
                raise ValueError(
                    f"`adapter_names[{j}]` = {int(n)} is outside -1..{k} (-1: the base model)"
                )
            rows.append(int(n))
        else:
            raise TypeError(
                f"`adapter_names[{j}]` must be an adapter name, an index or None, "
                f"got {type(n).__name__}"
            )
    per_sample = int(np.prod(x.shape[1:-1], dtype=np.int64))
    return np.repeat(np.asarray(rows, dtype=np.int64), per_sample)


def _check_multi_x(x: Tensor, in_features: Optional[int] = None) -> Tensor:
    if x.dim() < 2 or (in_features is not None and x.shape[-1] != in_features):
        want = "in" if in_features is None else f"in={in_features}"
        raise ValueError(f"`x` must have shape [batch, ..., {want}], got {tuple(x.shape)}")
    return _tokens(x)


def lora_forward_multi(
    x: Tensor, weight: Any, adapters: Any, adapter_names: Sequence[Any],
    bias: Optional[Tensor] = None,
) -> Tensor:
    """Mixed-adapter batch forward (serving, no autograd): sample ``b`` of the output is what
    PEFT's ``model(..., adapter_names=[...])`` computes for it on this projection,
    ``x[b] @ weight.T + bias + term(x[b])`` with the term of adapter ``adapter_names[b]`` (none
    for ``"__base__"``). One base product for the whole batch; each adapter's samples get its
    low-rank term in the same call, whatever the ranks and methods.

    Args:
        x: float32 CPU ``[batch, ..., in]``; ``adapter_names`` has one entry per sample (dim 0),
            applied to all its rows (tokens), as PEFT's.
        weight: the frozen base weight: a float32 CPU ``[out, in]`` tensor (cached as a
            ``FrozenWeight`` as the modules do) or an ``nf4.Nf4Tensor`` (QLoRA).
        adapters: ``{name: term}`` (or a list of terms, or a prebuilt ``lorafuse.LoraPool``),
            each term None (the adapter leaves this projection alone) or a dict of float32 CPU
            tensors and floats: LoRA ``{lora_A [r, in], lora_B [out, r], scaling}``, VeRA
            ``{vera_A [r, max_in], vera_B [max_out, r], lambda_d [r], lambda_b [out]}``,
            AdaLoRA ``{lora_A, lora_B, lora_E [r, 1], scaling (lora_alpha), ranknum}`` (the
            keys of ``lorafuse.lora_forward_multi``). DoRA is refused, as PEFT's
            ``adapter_names`` refuses it.
        adapter_names: ``batch`` entries: an adapter name (a key of ``adapters``), ``"__base__"``
            or None for the base model, or an index into the adapters (-1: the base model).
        bias: optional float32 CPU ``[out]``.

    Returns:
        y, float32 ``[batch, ..., out]`` (it does not require grad).

    Raises:
        TypeError: a tensor that is not float32, entries of the wrong type.
        ValueError: a tensor not on the CPU, shapes (naming ``adapters[i].lora_A`` ...), an
            unknown adapter name, an index out of range, a DoRA term.
    """
    x2 = _check_multi_x(x)
    if isinstance(adapters, _k.LoraPool):
        rows = _adapter_rows(adapter_names, None, len(adapters), x, strict=True)
        y = adapters.forward(_np(x2, "x"), _base(weight), rows, _opt(bias, "bias"))
    else:
        names, terms = _split_adapters(adapters)
        rows = _adapter_rows(adapter_names, names, len(terms), x, strict=True)
        where = (lambda i: f"adapters[{names[i]!r}]") if names else (lambda i: f"adapters[{i}]")
        terms_np = [_term_np(t, where(i)) for i, t in enumerate(terms)]
        y = _k.lora_forward_multi(_np(x2, "x"), _base(weight), terms_np, rows, _opt(bias, "bias"))
    return _back(y, tuple(x.shape[:-1]))


def _key(v: Any) -> Any:
    return (v.data_ptr(), v._version, tuple(v.shape)) if isinstance(v, Tensor) else v


class MultiLoraLinear(nn.Module):
    """Several adapters on one frozen linear layer, mixed per sample in one batch (serving,
    forward only): ``forward(x, adapter_names=[...])`` gives for each sample what PEFT's
    ``model(..., adapter_names=[...])`` gives on this layer (``lora.Linear._mixed_batch_forward``):
    ``base_layer(x[b]) + term_i(x[b])`` for ``i = adapter_names[b]``, the base layer alone for
    ``"__base__"`` (or a name that has no adapter on this layer, as PEFT skips it). The base
    product runs once for the batch; LoRA, VeRA and AdaLoRA terms of any ranks mix.

    The terms are packed into a ``lorafuse.LoraPool`` on the first forward and re-packed only
    when one of their tensors changes (a new storage or an in-place change torch counts, as for
    the base weight's cache). No gradients flow (use the single-adapter modules to train).

    Args:
        base_layer: ``nn.Linear`` (float32, CPU) or ``Nf4Linear``.
        adapters: ``{name: term}``, each term None or a dict of tensors and floats as for
            ``lora_forward_multi`` (held by reference, not copied or registered as Parameters).
        active_adapter: the adapter of every sample when ``forward`` gets no ``adapter_names``
            (None: the base layer alone).

    Raises:
        TypeError: ``base_layer`` is neither ``nn.Linear`` nor ``Nf4Linear``.
    """

    def __init__(
        self, base_layer: nn.Module, adapters: Dict[str, Term], active_adapter: Optional[str] = None,
    ) -> None:
        super().__init__()
        _check_base(base_layer)
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        names, terms = _split_adapters(dict(adapters))
        self.names: List[str] = names or []
        self.terms: List[Term] = terms
        self.active_adapter = active_adapter
        self._pool: Optional[Tuple[Any, Any]] = None

    @classmethod
    def from_peft(cls, layer: nn.Module) -> "MultiLoraLinear":
        """Every adapter of a PEFT layer (``lora.Linear``, ``vera.Linear``, ``adalora.SVDLinear``,
        or their bitsandbytes nf4 4-bit versions, on the CPU), sharing its tensors; the active
        adapter becomes ``active_adapter`` when there is exactly one.

        Raises:
            ImportError: peft is not installed.
            TypeError: ``layer`` is not one of these PEFT layers.
            ValueError: a DoRA (or other LoRA variant) adapter, ``lora_bias``, merged adapters,
                ``fan_in_fan_out``, a base that is not ``nn.Linear`` or an nf4 ``Linear4bit``.
        """
        kinds = [k for k, c in _peft_classes() if type(layer) is c]
        if not kinds:
            raise TypeError(
                f"`layer` must be a PEFT lora.Linear, vera.Linear or adalora.SVDLinear, got "
                f"{type(layer).__name__}"
            )
        kind = kinds[0]
        if layer.merged:
            raise ValueError("`layer` has merged adapters; unmerge them for mixed batches (PEFT refuses them too)")
        if getattr(layer, "fan_in_fan_out", False):
            raise ValueError("`layer`: fan_in_fan_out=True is not supported")
        base = layer.get_base_layer()
        if _is_bnb_4bit(base):
            base = Nf4Linear.from_bnb(base)
        elif type(base) is not nn.Linear:
            raise ValueError(f"`layer`: base layer {type(base).__name__} is not nn.Linear or an nf4 Linear4bit")
        adapters: Dict[str, Term] = {}
        if kind == "vera":
            for n in layer.vera_lambda_d.keys():
                adapters[n] = dict(
                    vera_A=layer.vera_A[n], vera_B=layer.vera_B[n],
                    lambda_d=layer.vera_lambda_d[n], lambda_b=layer.vera_lambda_b[n],
                )
        elif kind == "adalora":
            for n in layer.lora_A.keys():
                adapters[n] = dict(
                    lora_A=layer.lora_A[n], lora_B=layer.lora_B[n], lora_E=layer.lora_E[n],
                    scaling=layer.scaling[n], ranknum=layer.ranknum[n],
                )
        else:
            for n in layer.lora_A.keys():
                variant = getattr(layer, "lora_variant", {}).get(n)
                if variant is not None:
                    what = "DoRA" if type(variant).__name__ == "DoraLinearVariant" else type(variant).__name__
                    raise ValueError(
                        f"`layer`: adapter {n!r} is {what}, which cannot join a mixed batch (its "
                        "column scale rescales the base product per adapter; PEFT refuses it too)"
                    )
                if getattr(layer, "lora_bias", {}).get(n, False):
                    raise ValueError(f"`layer`: adapter {n!r} has lora_bias=True, which is not supported")
                adapters[n] = dict(
                    lora_A=layer.lora_A[n].weight, lora_B=layer.lora_B[n].weight,
                    scaling=layer.scaling[n],
                )
        active = list(layer.active_adapters)
        return cls(base, adapters, active[0] if len(active) == 1 and active[0] in adapters else None)

    @property
    def adapters(self) -> Dict[str, Term]:
        """``{name: term}`` (a new dict holding the same tensors)."""
        return dict(zip(self.names, self.terms))

    def pool(self) -> Any:
        """The packed ``lorafuse.LoraPool`` of the current adapter tensors."""
        key = tuple(tuple((k, _key(v)) for k, v in t.items()) if t is not None else None for t in self.terms)
        if self._pool is None or self._pool[0] != key:
            terms = [_term_np(t, f"adapters[{n!r}]") for n, t in zip(self.names, self.terms)]
            self._pool = (key, _k.LoraPool(terms, self.in_features, self.out_features))
        return self._pool[1]

    def _kernel_w0(self) -> Any:
        if isinstance(self.base_layer, Nf4Linear):
            return self.base_layer.nf4
        return _frozen(self.base_layer.weight)

    def forward(self, x: Tensor, adapter_names: Optional[Sequence[Any]] = None) -> Tensor:
        """``x [batch, ..., in]`` float32 CPU -> ``[batch, ..., out]``; ``adapter_names``: one
        name (or index, -1 / ``"__base__"`` / None for the base layer) per sample, default
        ``active_adapter`` for all.

        Raises:
            ValueError: ``x``'s shape, a tensor not on the CPU, an index out of range, the wrong
                number of names.
            TypeError: a tensor that is not float32.
        """
        x2 = _check_multi_x(x, self.in_features)
        if adapter_names is None:
            adapter_names = [self.active_adapter] * x.shape[0]
        pool = self.pool()
        rows = _adapter_rows(adapter_names, self.names, len(self.names), x, strict=False)
        y = pool.forward(_np(x2, "x"), self._kernel_w0(), rows, _opt(self.base_layer.bias, "bias"))
        return _back(y, tuple(x.shape[:-1]))

    def extra_repr(self) -> str:
        return f"adapters={self.names}, active_adapter={self.active_adapter!r}"
