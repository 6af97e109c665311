"""``fastprompt.prompt_concat``: the public functional op, as torch custom ops with autograd.

Custom ops in the ``fastprompt`` namespace (``torch.ops.fastprompt.*``):

- ``prompt_concat(input_ids, word_weight, prompt_weight, prompt_indices, embed_scale,
  embed_scale_tensor, padding_idx, check_bounds)`` -> [B, T+L, D]
- ``prompt_concat_prompt_grad(grad_out, prompt_indices, batch, num_prompt_rows, dtype)`` -> [P, D]
- ``prompt_concat_word_grad(grad_out, input_ids, num_prompt, num_word_rows, embed_scale,
  embed_scale_tensor, padding_idx, dtype)`` -> [V, D]

A scale is either a float (``embed_scale``) or a 0-dim float tensor on the tables' device
(``embed_scale_tensor``, read on device: no host sync, compile- and CUDA-graph-safe), never both.

Each has a fake kernel (so ``torch.compile(fullgraph=True)`` traces it without a graph break) and the
forward op has autograd registered. The backend is picked per call (``backend_for``): the Triton kernel
on CUDA, the same kernel in Triton's interpreter, or the pure-PyTorch path. Value checks (ids in range)
live inside the implementations, where compile does not trace them.

``prompt_concat`` itself checks the arguments once, then: under ``torch.compile`` (or for tensor
subclasses, functorch transforms) it calls the custom op; in plain eager mode it calls the same
implementations directly (``_forward_impl``, and ``_EagerPromptConcat`` when a gradient is needed),
which saves the dispatcher's and the generic autograd wrapper's per-call cost on small calls.
A tensor ``embed_scale`` that requires grad gets its gradient on both routes.
"""

# ruff: noqa: UP007, UP035, UP045
# No `from __future__ import annotations` here: torch.library.custom_op reads these annotations at
# run time to infer the op schemas, and older torch releases need real types (typing.Optional).
from typing import Optional, Union

import torch

from . import torch_path
from .backend import backend_for, load_kernels
from .checks import bounds_check_requested, check_index_bounds, check_metadata


def _scale(embed_scale, embed_scale_tensor):
    """The one scale the kernels take: None, a float, or a 0-dim tensor."""
    return embed_scale_tensor if embed_scale_tensor is not None else embed_scale


def _num_prompt(prompt_weight: torch.Tensor, prompt_indices: Optional[torch.Tensor]) -> int:
    return prompt_weight.shape[0] if prompt_indices is None else prompt_indices.shape[-1]


# ------------------------------------------------------------------------------------ implementations
# The work itself, arguments already checked and the backend already chosen. The custom ops below call
# these after their checks; eager calls (``prompt_concat`` outside torch.compile) call them directly,
# skipping the dispatcher's per-call cost.


def _forward_impl(input_ids, word_weight, prompt_weight, prompt_indices, scale, check_bounds, backend):
    device = input_ids.device
    if backend == "torch" and device.type == "cpu":
        # index_select checks every id on CPU: look at the values only once it has failed, to turn
        # its bare "index out of range in self" into a message naming the argument and the value.
        try:
            return torch_path.forward(input_ids, word_weight, prompt_weight, prompt_indices, scale)
        except IndexError:
            check_index_bounds(input_ids, word_weight, prompt_weight, prompt_indices)
            raise
    if bounds_check_requested(device, check_bounds):
        check_index_bounds(input_ids, word_weight, prompt_weight, prompt_indices)
    if backend == "torch":
        return torch_path.forward(input_ids, word_weight, prompt_weight, prompt_indices, scale)
    return load_kernels().prompt_concat_forward(input_ids, word_weight, prompt_weight, prompt_indices, scale)


def _prompt_grad_impl(grad_out, prompt_indices, num_prompt_rows, dtype, backend):
    if backend == "torch":
        return torch_path.prompt_grad(grad_out, prompt_indices, num_prompt_rows, dtype)
    kernels = load_kernels()
    if prompt_indices is None:  # all rows in order: one launch, no sort
        return kernels.batch_rows_sum(grad_out, num_prompt_rows, dtype)
    index = prompt_indices.expand(grad_out.shape[0], -1) if prompt_indices.dim() == 1 else prompt_indices
    return kernels.segment_rows_sum(grad_out, 0, index, num_prompt_rows, dtype)


def _word_grad_impl(grad_out, input_ids, num_prompt, num_word_rows, scale, padding_idx, dtype, backend):
    if backend == "torch":
        return torch_path.word_grad(grad_out, input_ids, num_prompt, num_word_rows, scale, padding_idx, dtype)
    return load_kernels().segment_rows_sum(
        grad_out, num_prompt, input_ids, num_word_rows, dtype, scale=scale, zero_row=padding_idx
    )


# --------------------------------------------------------------------------------------------- forward


@torch.library.custom_op("fastprompt::prompt_concat", mutates_args=())
def _prompt_concat_op(
    input_ids: torch.Tensor,
    word_weight: torch.Tensor,
    prompt_weight: torch.Tensor,
    prompt_indices: Optional[torch.Tensor],
    embed_scale: Optional[float],
    embed_scale_tensor: Optional[torch.Tensor],
    padding_idx: Optional[int],
    check_bounds: Optional[bool],
) -> torch.Tensor:
    check_metadata(input_ids, word_weight, prompt_weight, prompt_indices, padding_idx, embed_scale_tensor)
    scale = _scale(embed_scale, embed_scale_tensor)
    backend = backend_for(input_ids.device)
    return _forward_impl(input_ids, word_weight, prompt_weight, prompt_indices, scale, check_bounds, backend)


@_prompt_concat_op.register_fake
def _prompt_concat_fake(
    input_ids,
    word_weight,
    prompt_weight,
    prompt_indices,
    embed_scale,
    embed_scale_tensor,
    padding_idx,
    check_bounds,
):
    check_metadata(input_ids, word_weight, prompt_weight, prompt_indices, padding_idx, embed_scale_tensor)
    batch, seq_len = input_ids.shape
    num_prompt = _num_prompt(prompt_weight, prompt_indices)
    return word_weight.new_empty(batch, num_prompt + seq_len, word_weight.shape[1])


# -------------------------------------------------------------------------------------------- backward


@torch.library.custom_op("fastprompt::prompt_concat_prompt_grad", mutates_args=())
def _prompt_grad_op(
    grad_out: torch.Tensor,
    prompt_indices: Optional[torch.Tensor],
    num_prompt_rows: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    return _prompt_grad_impl(grad_out, prompt_indices, num_prompt_rows, dtype, backend_for(grad_out.device))


@_prompt_grad_op.register_fake
def _prompt_grad_fake(grad_out, prompt_indices, num_prompt_rows, dtype):
    return grad_out.new_empty(num_prompt_rows, grad_out.shape[2], dtype=dtype)


@torch.library.custom_op("fastprompt::prompt_concat_word_grad", mutates_args=())
def _word_grad_op(
    grad_out: torch.Tensor,
    input_ids: torch.Tensor,
    num_prompt: int,
    num_word_rows: int,
    embed_scale: Optional[float],
    embed_scale_tensor: Optional[torch.Tensor],
    padding_idx: Optional[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    scale = _scale(embed_scale, embed_scale_tensor)
    backend = backend_for(grad_out.device)
    return _word_grad_impl(grad_out, input_ids, num_prompt, num_word_rows, scale, padding_idx, dtype, backend)


@_word_grad_op.register_fake
def _word_grad_fake(
    grad_out, input_ids, num_prompt, num_word_rows, embed_scale, embed_scale_tensor, padding_idx, dtype
):
    return grad_out.new_empty(num_word_rows, grad_out.shape[2], dtype=dtype)


def _scale_grad(grad_out, input_ids, word_weight, num_prompt, scale_tensor):
    """d out / d embed_scale_tensor: the sum over token rows of <grad_out row, word row>, in float32.

    Plain torch on every backend (one gather of the token rows; only computed when the scale tensor
    requires grad). Returns a 0-dim tensor in the scale's dtype.
    """
    dim = word_weight.shape[1]
    rows = word_weight.index_select(0, input_ids.reshape(-1).long()).float()  # [B*L, D]
    grads = grad_out[:, num_prompt:].reshape(-1, dim).float()  # [B*L, D]
    return (rows * grads).sum().to(scale_tensor.dtype)


# -------------------------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    input_ids, word_weight, prompt_weight, prompt_indices, embed_scale, scale_tensor, padding_idx, _ = inputs
    scale_needs_grad = scale_tensor is not None and scale_tensor.requires_grad
    ctx.save_for_backward(input_ids, prompt_indices, scale_tensor, word_weight if scale_needs_grad else None)
    ctx.num_word_rows = word_weight.shape[0]
    ctx.word_dtype = word_weight.dtype
    ctx.num_prompt_rows = prompt_weight.shape[0]
    ctx.prompt_dtype = prompt_weight.dtype
    ctx.num_prompt = _num_prompt(prompt_weight, prompt_indices)
    ctx.embed_scale = embed_scale
    ctx.padding_idx = None if padding_idx is None else padding_idx % word_weight.shape[0]


def _grads(ctx, grad_out, prompt_grad, word_grad):
    """The op's input gradients, the table gradients computed by ``prompt_grad`` / ``word_grad``."""
    input_ids, prompt_indices, scale_tensor, word_weight = ctx.saved_tensors
    grad_word = grad_prompt = grad_scale = None
    if ctx.needs_input_grad[2]:
        grad_prompt = prompt_grad(grad_out, prompt_indices, ctx.num_prompt_rows, ctx.prompt_dtype)
    if ctx.needs_input_grad[1]:
        scale = ctx.embed_scale if scale_tensor is None else scale_tensor.detach()
        grad_word = word_grad(
            grad_out, input_ids, ctx.num_prompt, ctx.num_word_rows, scale, ctx.padding_idx, ctx.word_dtype
        )
    if ctx.needs_input_grad[5]:
        grad_scale = _scale_grad(grad_out, input_ids, word_weight, ctx.num_prompt, scale_tensor)
    return None, grad_word, grad_prompt, None, None, grad_scale, None, None


def _op_word_grad(grad_out, input_ids, num_prompt, num_word_rows, scale, padding_idx, dtype):
    scale_float, scale_tensor = (None, scale) if isinstance(scale, torch.Tensor) else (scale, None)
    return _word_grad_op(
        grad_out, input_ids, num_prompt, num_word_rows, scale_float, scale_tensor, padding_idx, dtype
    )


def _backward(ctx, grad_out):
    """The registered autograd (torch.compile, opcheck, torch.ops calls): through the backward ops."""
    return _grads(ctx, grad_out, _prompt_grad_op, _op_word_grad)


_prompt_concat_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerPromptConcat(torch.autograd.Function):
    """The same autograd as registered on the op, as a plain ``autograd.Function`` for eager calls.

    ``register_autograd`` is what ``torch.compile``, ``opcheck`` and direct ``torch.ops`` calls use;
    in eager mode its generic wrapper and the dispatcher cost tens of microseconds per call, which
    dominates small shapes. This class runs the same implementations directly, on the backend
    chosen once per call, with the same ``_setup_context`` and gradients.
    """

    @staticmethod
    def forward(
        ctx, input_ids, word, prompt, pidx, scale_float, scale_tensor, padding_idx, check_bounds, backend
    ):
        scale = scale_tensor if scale_tensor is not None else scale_float
        output = _forward_impl(input_ids, word, prompt, pidx, scale, check_bounds, backend)
        inputs = (input_ids, word, prompt, pidx, scale_float, scale_tensor, padding_idx, check_bounds)
        _setup_context(ctx, inputs, output)
        ctx.backend = backend
        return output

    @staticmethod
    def backward(ctx, grad_out):
        backend = ctx.backend

        def prompt_grad(*args):
            return _prompt_grad_impl(*args, backend)

        def word_grad(*args):
            return _word_grad_impl(*args, backend)

        return (*_grads(ctx, grad_out, prompt_grad, word_grad), None)


# ------------------------------------------------------------------------------------------ public API


def _split_scale(embed_scale) -> tuple[Optional[float], Optional[torch.Tensor]]:
    """(float scale, 0-dim tensor scale) for the op schema; at most one is not None.

    A tensor scale keeps its autograd history (``reshape`` is differentiable): if it requires grad,
    it gets its gradient.
    """
    if embed_scale is None:
        return None, None
    if isinstance(embed_scale, torch.Tensor):
        if embed_scale.numel() != 1 or not embed_scale.is_floating_point():
            raise ValueError(
                "embed_scale must be a number or a one-element floating-point tensor, got a "
                f"{embed_scale.dtype} tensor of shape {tuple(embed_scale.shape)}"
            )
        return None, embed_scale if embed_scale.dim() == 0 else embed_scale.reshape(())
    if isinstance(embed_scale, bool) or not isinstance(embed_scale, (int, float)):
        raise TypeError(f"embed_scale must be None, a float or a one-element tensor, got {embed_scale!r}")
    return float(embed_scale), None


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _eager(*tensors) -> bool:
    """True when the call can skip the dispatcher: not compiling or tracing, no functorch transform,
    no TorchDispatchMode active (a mode sees ``torch.ops.fastprompt.prompt_concat`` as always), and
    plain tensors (a FakeTensor, DTensor or other subclass goes through the custom op)."""
    if (
        torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
        or torch._C._len_torch_dispatch_stack()
    ):
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


def prompt_concat(
    input_ids: torch.Tensor,
    word_weight: torch.Tensor,
    prompt_weight: torch.Tensor,
    prompt_indices: Optional[torch.Tensor] = None,
    *,
    embed_scale: Optional[Union[float, torch.Tensor]] = None,
    padding_idx: Optional[int] = None,
    check_bounds: Optional[bool] = None,
) -> torch.Tensor:
    """Prompt rows then token rows, in one pass: what PEFT builds with ``torch.cat``.

    ``out[b, t] = prompt_weight[prompt_indices[b, t]].to(word_weight.dtype)`` for t < T and
    ``out[b, T + l] = word_weight[input_ids[b, l]] * embed_scale``, bit for bit what PyTorch's
    ``emb * embed_scale`` gives for a float or a 0-dim tensor (float32 math, one rounding).

    Args:
        input_ids: [B, L] int64 or int32 token ids into ``word_weight``.
        word_weight: [V, D] float32, float16 or bfloat16: the model's word-embedding table.
        prompt_weight: [P, D] float32, float16 or bfloat16: the virtual-token table.
        prompt_indices: None (all P rows in order, T = P), a [T] tensor shared by every batch row,
            or a [B, T] tensor, one prompt selection per batch row. int64 or int32.
        embed_scale: multiplies the token rows only (scaled word embeddings of Gemma, BART, ...).
            A float, or a one-element float tensor on the tables' device, read on device (no host
            sync). It is used at its own precision: to reproduce Gemma3's
            ``emb * self.embed_scale.to(self.weight.dtype)``, pass ``embed_scale.to(word_weight.dtype)``.
        padding_idx: the ``word_weight`` row that gets zero gradient, like ``nn.Embedding``.
        check_bounds: on CUDA, check that every id is in range before the launch (a device sync).
            Default: ``FASTPROMPT_CHECK_BOUNDS=1``. Off CUDA the check always runs.

    Returns:
        [B, T+L, D] tensor in ``word_weight.dtype``, differentiable w.r.t. both tables. The word
        gradient is only computed when ``word_weight.requires_grad``.

    Raises:
        IndexError: an id outside its table (CPU always; CUDA when checked). Unchecked on CUDA, an
            out-of-range id is never dereferenced: its output row is NaN.
        TypeError / ValueError: wrong dtypes, ranks, shapes or devices.
    """
    scale_float, scale_tensor = _split_scale(embed_scale)
    # Checked once, here, before anything else: the dispatcher's own errors (e.g. for a list) name no
    # argument. The custom op checks again only when it is the one called (compile, torch.ops).
    check_metadata(input_ids, word_weight, prompt_weight, prompt_indices, padding_idx, scale_tensor)
    if not _eager(input_ids, word_weight, prompt_weight, prompt_indices, scale_tensor):
        inputs = (
            input_ids,
            word_weight,
            prompt_weight,
            prompt_indices,
            scale_float,
            scale_tensor,
            padding_idx,
        )
        return _prompt_concat_op(*inputs, check_bounds)
    backend = backend_for(input_ids.device)
    needs_grad = torch.is_grad_enabled() and (
        word_weight.requires_grad
        or prompt_weight.requires_grad
        or (scale_tensor is not None and scale_tensor.requires_grad)
    )
    if needs_grad:
        return _EagerPromptConcat.apply(
            input_ids, word_weight, prompt_weight, prompt_indices, scale_float, scale_tensor, padding_idx,
            check_bounds, backend,
        )  # fmt: skip
    scale = scale_tensor if scale_tensor is not None else scale_float
    return _forward_impl(input_ids, word_weight, prompt_weight, prompt_indices, scale, check_bounds, backend)
