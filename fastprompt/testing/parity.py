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
import warnings
from dataclasses import dataclass

import torch

from .reference import peft_concat, reference_forward, reference_grads
from .tolerances import DTYPE_NAMES, FLOAT_DTYPES, max_error, tolerance

INDEX_MODES = ("all", "shared", "per-batch", "all+scale+padding")


@dataclass
class Check:
    """One parity check: whether it passed, and its line for the terminal."""

    ok: bool
    line: str


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

    word_cpu, prompt_cpu = word.detach().cpu(), prompt.detach().cpu()
    ref = reference_forward(ids, word_cpu, prompt_cpu, indices, scale)
    word_grad_ref, prompt_grad_ref = reference_grads(
        grad_out, ids, vocab, prompt_rows, indices, scale, padding
    )
    tol_out = tolerance(word_dtype)
    tol_prompt = tolerance(prompt_dtype, word_dtype)  # the prompt gradient sums output-dtype gradients
    ok_fwd, err_fwd = max_error(out.detach().cpu(), ref.to(word_dtype), tol_out)
    ok_w, err_w = max_error(word.grad.cpu(), word_grad_ref, tol_out, terms=batch * seq)
    ok_p, err_p = max_error(prompt.grad.cpu(), prompt_grad_ref, tol_prompt, terms=batch * num_prompt)
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
    return list(itertools.product(FLOAT_DTYPES, FLOAT_DTYPES, INDEX_MODES))


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
    from .tiny_models import greedy_generate, load_base_model, prompt_tuned_pair, token_batch

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
