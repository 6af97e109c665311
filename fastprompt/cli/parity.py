"""``python -m fastprompt check``: does fastprompt compute what PEFT computes, on this device?

- ``op_parity``: ``prompt_concat`` forward and both table gradients against a float64 reference, for
  every (word dtype, prompt dtype) pair and every prompt-index mode (plus scaled embeddings with a
  padding row); with all prompt rows in order, the forward must also equal PEFT's path bit for bit.
- ``model_parity``: each built-in tiny model prompt-tuned by PEFT and by fastprompt, with the same
  weights: the same logits, the same prompt gradient, and fastprompt's cached greedy generation equal
  to PEFT's without a cache (the whole sequence recomputed at every step: no cache handling to get
  wrong; PEFT 0.21.2's own cached path re-inserts the prompts at every step under transformers 5.24).

Each check gives one ``Check`` (a pass flag and a line); the command prints the lines and exits
non-zero if any failed.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass

import torch

from .benchmarking import DTYPE_NAMES, peft_concat

# DESIGN.md's tolerance table: fp32 exact or ~1e-6; fp16 1e-3; bf16 1.6e-2.
TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_MODES = ("all", "shared", "per-batch", "all+scale+padding")


@dataclass
class Check:
    """One parity check: whether it passed, and its line for the terminal."""

    ok: bool
    line: str


def _reference(ids, word, prompt, indices, scale):
    """[B, T+L, D] float64 from float64 copies of the tables (autograd gives the reference gradients)."""
    batch = ids.shape[0]
    if indices is None:
        rows = prompt.unsqueeze(0).expand(batch, -1, -1)
    elif indices.dim() == 1:
        rows = prompt[indices].unsqueeze(0).expand(batch, -1, -1)
    else:
        rows = prompt[indices]
    tokens = word[ids]
    if scale is not None:
        tokens = tokens * scale
    return torch.cat((rows, tokens), dim=1)


def _max_error(
    actual: torch.Tensor, expected: torch.Tensor, tol: float, terms: int = 1
) -> tuple[bool, float]:
    """(within tolerance, max abs error): atol and rtol ``tol``, atol widened for sums of ``terms``."""
    actual, expected = actual.double(), expected.double()
    if torch.isnan(actual).any():
        return False, math.nan
    error = (actual - expected).abs()
    bound = tol * math.sqrt(max(1, terms)) + tol * expected.abs()
    return bool((error <= bound).all()), float(error.max()) if error.numel() else 0.0


def _one_op_case(device, word_dtype, prompt_dtype, mode, gen) -> Check:
    from fastprompt import prompt_concat

    batch, seq, dim, vocab, prompt_rows, num_prompt = 3, 7, 40, 50, 8, 5
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    word64 = torch.randn(vocab, dim, generator=gen, dtype=torch.float64)
    prompt64 = torch.randn(prompt_rows, dim, generator=gen, dtype=torch.float64)
    indices, scale, padding = None, None, None
    if mode == "shared":
        indices = torch.randint(0, prompt_rows, (num_prompt,), generator=gen)
    elif mode == "per-batch":
        indices = torch.randint(0, prompt_rows, (batch, num_prompt), generator=gen)
    elif mode == "all+scale+padding":
        scale, padding = 2.5, int(ids[0, 0])
    word = word64.to(word_dtype).to(device).requires_grad_()
    prompt = prompt64.to(prompt_dtype).to(device).requires_grad_()
    dev_ids = ids.to(device)
    dev_idx = None if indices is None else indices.to(device)
    out = prompt_concat(dev_ids, word, prompt, dev_idx, embed_scale=scale, padding_idx=padding)
    grad_out = torch.randn(out.shape, generator=gen).to(word_dtype)
    out.backward(grad_out.to(device))

    ref_word = word.detach().cpu().double().requires_grad_()
    ref_prompt = prompt.detach().cpu().double().requires_grad_()
    ref = _reference(ids, ref_word, ref_prompt, indices, scale)
    ref.backward(grad_out.double())
    word_grad_ref = ref_word.grad.clone()
    if padding is not None:
        word_grad_ref[padding] = 0
    tol_out, tol_word, tol_prompt = (TOLERANCE[word_dtype], TOLERANCE[word_dtype], TOLERANCE[prompt_dtype])
    tol_prompt = max(tol_prompt, tol_out)  # the prompt gradient sums output-dtype gradients
    ok_fwd, err_fwd = _max_error(out.detach().cpu(), ref.detach().to(word_dtype), tol_out)
    ok_w, err_w = _max_error(word.grad.cpu(), word_grad_ref, tol_word, terms=batch * seq)
    ok_p, err_p = _max_error(prompt.grad.cpu(), ref_prompt.grad, tol_prompt, terms=batch * num_prompt)
    ok = ok_fwd and ok_w and ok_p
    peft_note = ""
    if mode == "all":
        with torch.no_grad():
            peft_out = peft_concat(dev_ids, word, prompt, torch.arange(prompt_rows, device=device))
        same = torch.equal(peft_out, out.detach())
        ok = ok and same
        peft_note = "  == peft" if same else "  != peft"
    pair = f"word={DTYPE_NAMES[word_dtype]} prompt={DTYPE_NAMES[prompt_dtype]}"
    line = (
        f"op     {pair:22s} indices={mode:18s} max err: out {err_fwd:.1e}  word grad {err_w:.1e}  "
        f"prompt grad {err_p:.1e}{peft_note}"
    )
    return Check(ok, line)


def op_cases() -> list[tuple[torch.dtype, torch.dtype, str]]:
    """Every (word dtype, prompt dtype, index mode) that ``op_parity`` checks: 9 pairs x 4 modes."""
    return list(itertools.product(DTYPES, DTYPES, INDEX_MODES))


def op_case(
    device: torch.device | str, word_dtype: torch.dtype, prompt_dtype: torch.dtype, mode: str, gen=None
) -> Check:
    """One case of ``op_parity`` (one small shape: B=3, L=7, D=40); a crash is a failed check."""
    device = torch.device(device)
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    try:
        return _one_op_case(device, word_dtype, prompt_dtype, mode, gen)
    except Exception as err:  # a crash is a failed check with its reason, not the end of the run
        pair = f"word={DTYPE_NAMES[word_dtype]} prompt={DTYPE_NAMES[prompt_dtype]}"
        return Check(False, f"op     {pair:22s} indices={mode:18s} error: {type(err).__name__}: {err}")


def op_parity(device: torch.device | str) -> list[Check]:
    """Every dtype pair and index mode of ``prompt_concat`` on ``device`` against float64."""
    gen = torch.Generator().manual_seed(0)
    return [op_case(device, *case, gen) for case in op_cases()]


def _model_case(name: str, device: torch.device) -> Check:
    from .model_bench import greedy_generate
    from .tiny_models import load_base_model, prompt_tuned_pair, token_batch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = load_base_model(name).to(device)
        reference, fast = prompt_tuned_pair(base, 10)
        ids = token_batch(reference, 2, 12)
        results = {}
        for label, model in (("peft", reference), ("fastprompt", fast)):
            model.train()
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            grad = next(p.grad for p in model.parameters() if p.requires_grad)
            # Generation: against PEFT without a KV cache (whole sequence recomputed each step), the
            # ground truth; PEFT 0.21.2's cached path re-inserts the prompts under transformers >= 5.24.
            generated = greedy_generate(model, ids[:, :6], 8, use_cache=label == "fastprompt")
            results[label] = (out.logits.detach(), grad, generated)
    (logits_a, grad_a, gen_a), (logits_b, grad_b, gen_b) = results["peft"], results["fastprompt"]
    failed = []
    if not torch.allclose(logits_a, logits_b, atol=1e-5, rtol=1e-5):
        failed.append(f"logits (max diff {float((logits_a - logits_b).abs().max()):.1e})")
    if not torch.allclose(grad_a, grad_b, atol=1e-6, rtol=1e-5):
        failed.append(f"prompt grad (max diff {float((grad_a - grad_b).abs().max()):.1e})")
    if not torch.equal(gen_a, gen_b):
        failed.append("greedy generation (different tokens from PEFT's uncached decoding)")
    detail = (
        "logits, prompt grad, greedy generation (vs PEFT uncached) equal"
        if not failed
        else "differ: " + ", ".join(failed)
    )
    return Check(not failed, f"model  {name:22s} fastprompt vs PEFT: {detail}")


def model_parity(device: torch.device | str, names: tuple[str, ...] | None = None) -> list[Check]:
    """The built-in tiny models prompt-tuned by PEFT and by fastprompt, compared on ``device``."""
    from .tiny_models import TINY_MODELS

    device = torch.device(device)
    checks = []
    for name in names or tuple(TINY_MODELS):
        try:
            checks.append(_model_case(name, device))
        except Exception as err:
            checks.append(Check(False, f"model  {name:22s} error: {type(err).__name__}: {err}"))
    return checks
