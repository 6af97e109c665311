"""Where users train with TRL, measured: a fused-LM-head training step, and a packed (padding-free) one.

The model: the bench Llama of :mod:`.shared_prefix` (``BENCH_LLAMA``: hidden 256, 4 layers, vocabulary
8000), random weights, no dropout, the same base weights and prompt table for every provider.

**TRL's fused LM head** (:func:`fused_head_results`). TRL computes every training loss through
``trl.trainer.utils.add_fused_lm_head`` and ``model(..., labels=..., fused_lm_head=True)`` (per-token
log-probabilities in tiles, never the ``[B, L, V]`` logits). Both base models get the same head (outputs
``FUSED_OUTPUTS``) before they are wrapped; one step is a forward with ``fused_lm_head=True,
use_cache=False`` and labels, backward, AdamW on the prompt table, at each (N, L, B) of ``FUSED_SHAPES``.
Providers ``peft`` and ``fastprompt`` (default ``share_prompt_prefix``: the prompt shared at the decoder).
Off Triton devices TRL's head scores every position, the prompt's too: on a CPU it dominates the step.

**Packed rows** (:func:`packed_results`): ``PACKED_DOCUMENTS`` documents of lengths drawn from
``PACKED_LENGTHS`` (fixed seed), ``PACKED_PROMPT`` virtual tokens. Providers:

- ``peft padded``: PEFT's correct alternative (PEFT is wrong on packed rows, it gives the whole row one
  prompt): the documents right-padded into one batch, attention mask, labels -100 on the padding and on
  each document's first token. The reference of the speedups and memory ratios.
- ``fastprompt packed``: what TRL's padding-free collator gives: one row of the concatenated documents,
  ``position_ids`` restarting at 0 for each, no attention mask, each document's first label -100.
- ``no prompt packed``: the floor: the base model alone on the same packed row (transformers' own
  packed-sequence mask from the positions), forward with labels and backward down to the input embeddings
  (``enable_input_require_grads``: the gradient a prompt would need; there is nothing to step).

Checked before timing: ``fastprompt packed``'s loss and prompt gradient equal ``peft padded``'s (the same
documents and labels; both losses are the mean over the same tokens), and the floor's loss equals the base
model's on the padded batch (transformers' packed path is exact). Entry points: :func:`fused_head_results`
and :func:`packed_results` (the CLI's rows), :func:`fused_head_steps` and :func:`packed_steps`
(``bench/test_bench_trl_packed.py``); ``python -m fastprompt.benchmarks.trl_packed`` prints both tables.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import torch

from . import shared_prefix
from .models import TrainStep
from .report import Result
from .shared_prefix import MODEL_LABEL

FUSED_SHAPES = (shared_prefix.SHAPES[0],)  # (100, 64, 8); the others with --shapes (seconds a step on a CPU)
FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")
FUSED_LABEL = "train step TRL fused head"

PACKED_DOCUMENTS = 8
PACKED_LENGTHS = (16, 128)  # inclusive
PACKED_PROMPT = 100
REFERENCE, PACKED, FLOOR = "peft padded", "fastprompt packed", "no prompt packed"
PACKED_PROVIDERS = (REFERENCE, PACKED, FLOOR)


def trl_available() -> bool:
    """Whether TRL (its fused LM head) can be imported."""
    try:
        from trl.trainer.utils import add_fused_lm_head  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------ TRL's fused LM head


def with_fused_head(model) -> None:
    """TRL's fused LM head added to ``model`` in place (before it is wrapped, as TRL's trainers do)."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, outputs=FUSED_OUTPUTS)


class FusedHeadStep(TrainStep):
    """:class:`TrainStep` through TRL's fused LM head: ``fused_lm_head=True``, ``use_cache=False``."""

    def outputs(self):
        self.model.train()
        return self.model(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            labels=self.input_ids,
            fused_lm_head=True,
            use_cache=False,
        )


def fused_head_steps(
    base, shape: tuple[int, int, int], providers=shared_prefix.DEFAULT_PROVIDERS, *, seed: int = 0
) -> dict:
    """{provider: FusedHeadStep} for one (N, L, B): every base copy with TRL's fused head, then wrapped."""
    return shared_prefix.train_steps(
        base, shape, providers, seed=seed, step=FusedHeadStep, prepare=with_fused_head
    )


def fused_head_results(
    device,
    *,
    budget_s: float = 0.4,
    shapes=FUSED_SHAPES,
    providers=shared_prefix.DEFAULT_PROVIDERS,
    progress=print,
    seed=0,
    notes: list[str] | None = None,
) -> list[Result]:
    """One row per (shape, provider) of the fused-head training step: time, peak memory, speedup and memory
    ratio against ``peft``, whether the first step's loss and prompt gradient matched PEFT's."""
    return shared_prefix.shared_prefix_results(
        device,
        budget_s=budget_s,
        shapes=shapes,
        providers=providers,
        progress=progress,
        seed=seed,
        notes=notes,
        steps=fused_head_steps,
        label=FUSED_LABEL,
        methods=(),
        families=(),
    )


# ------------------------------------------------------------------------------------- packed rows


@dataclasses.dataclass(frozen=True)
class Documents:
    """Token documents (1-D int64 tensors), packed into one row or padded into a batch."""

    docs: tuple[torch.Tensor, ...]

    @property
    def lengths(self) -> list[int]:
        return [len(d) for d in self.docs]

    def packed(self) -> dict[str, torch.Tensor]:
        """TRL's padding-free row: ``input_ids`` / ``position_ids`` / ``labels`` ``[1, T]``, positions
        restarting at 0 for each document, each document's first label -100, no attention mask;
        ``use_cache=False`` (see :func:`packed_steps`)."""
        ids = torch.cat(self.docs)[None]
        positions = torch.cat([torch.arange(n, device=ids.device) for n in self.lengths])[None]
        labels = ids.masked_fill(positions == 0, -100)
        return {"input_ids": ids, "position_ids": positions, "labels": labels, "use_cache": False}

    def padded(self, pad_id: int) -> dict[str, torch.Tensor]:
        """The same documents right-padded into a batch: attention mask, labels -100 on the padding and on
        each document's first token (as in the packed row)."""
        batch, longest = len(self.docs), max(self.lengths)
        device = self.docs[0].device
        ids = torch.full((batch, longest), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, doc in enumerate(self.docs):
            ids[row, : len(doc)] = doc
            mask[row, : len(doc)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, 0] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "use_cache": False}


def documents(
    vocab: int,
    *,
    count: int = PACKED_DOCUMENTS,
    lengths: tuple[int, int] = PACKED_LENGTHS,
    seed: int = 0,
    device="cpu",
) -> Documents:
    """``count`` documents of random lengths in ``lengths`` (inclusive) and random ids in [2, vocab)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sizes = torch.randint(lengths[0], lengths[1] + 1, (count,), generator=gen).tolist()
    return Documents(tuple(torch.randint(2, vocab, (n,), generator=gen).to(device) for n in sizes))


class BatchStep:
    """One training step of ``model`` on fixed keyword inputs (forward with labels, backward, AdamW on the
    parameters that require grad, if any); call it to run a step, get the loss."""

    def __init__(self, model, inputs: dict, *, lr: float = 1e-3):
        self.model = model
        self.inputs = inputs
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr) if params else None

    def outputs(self):
        self.model.train()
        return self.model(**self.inputs)

    def __call__(self) -> torch.Tensor:
        out = self.outputs()
        out.loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()


def _floor_model(base):
    """The base model alone, frozen, its input embeddings' output requiring grad (the backward runs down
    to the inputs, as it does down to a prompt)."""
    model = copy.deepcopy(base).requires_grad_(False)
    model.enable_input_require_grads()
    return model


def packed_steps(
    base, docs: Documents, *, num_virtual_tokens: int = PACKED_PROMPT, seed: int = 0
) -> dict[str, BatchStep]:
    """{provider: BatchStep} of ``PACKED_PROVIDERS`` on ``docs``, with the same prompt table.

    Every call passes ``use_cache=False``, as a training step should: transformers applies its
    packed-sequence mask only when no cache is passed, and a model whose config says ``use_cache=True``
    builds one even in training, so the floor's packed row would attend across documents without it.
    """
    models = shared_prefix.provider_models(base, num_virtual_tokens, shared_prefix.DEFAULT_PROVIDERS, seed)
    pad_id = base.config.pad_token_id
    return {
        REFERENCE: BatchStep(models["peft"], docs.padded(pad_id)),
        PACKED: BatchStep(models["fastprompt"], docs.packed()),
        FLOOR: BatchStep(_floor_model(base), docs.packed()),
    }


def _prompt_grad(model) -> torch.Tensor:
    return model.prompt_encoder["default"].embedding.weight.grad.detach().clone()


def packed_matches(steps: dict[str, BatchStep], docs: Documents) -> dict[str, bool]:
    """Each provider's first step against its reference: ``fastprompt packed``'s loss (relative 1e-5)
    and prompt gradient against ``peft padded``'s; the floor's loss against the base model's on the
    padded batch. Gradients are cleared again."""
    seen = {}
    for name in (REFERENCE, PACKED):
        step = steps[name]
        out = step.outputs()
        out.loss.backward()
        seen[name] = (out.loss.detach(), _prompt_grad(step.model))
        step.model.zero_grad(set_to_none=True)
    (loss, grad), (packed_loss, packed_grad) = seen[REFERENCE], seen[PACKED]
    packed_ok = torch.allclose(packed_loss, loss, rtol=1e-5, atol=0) and bool(
        (packed_grad - grad).abs().max() <= 1e-4 * grad.abs().max()
    )
    floor = steps[FLOOR].model
    with torch.no_grad():
        floor_loss = floor(**steps[FLOOR].inputs).loss
        alone = floor(**docs.padded(floor.config.pad_token_id)).loss
    floor_ok = torch.allclose(floor_loss, alone, rtol=1e-5, atol=0)
    return {REFERENCE: True, PACKED: bool(packed_ok), FLOOR: bool(floor_ok)}


def packed_workload(docs: Documents) -> str:
    """The rows' workload label: ``packed train step N=100 8 docs 16..128 T=546``."""
    low, high = PACKED_LENGTHS
    return f"packed train step N={PACKED_PROMPT} {len(docs.docs)} docs {low}..{high} T={sum(docs.lengths)}"


def packed_results(
    device,
    *,
    budget_s: float = 0.4,
    progress=print,
    seed: int = 0,
    notes: list[str] | None = None,
) -> list[Result]:
    """One row per provider of ``PACKED_PROVIDERS``: time of one training step, peak memory, speedup and
    memory ratio against ``peft padded``, whether its first step matched its reference
    (:func:`packed_matches`). ``fastprompt packed``'s time over the floor's is appended to ``notes``
    (and said by ``progress``)."""
    from ..prompt_once.policy import CALLS

    base = shared_prefix.base_model(seed=seed).to(device)
    docs = documents(base.config.vocab_size, seed=seed, device=device)
    workload = packed_workload(docs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps = packed_steps(base, docs, seed=seed)
        before = CALLS["packed shared"]
        matches = packed_matches(steps, docs)
    shares = CALLS["packed shared"] > before
    progress(
        f"model {MODEL_LABEL}: {workload} (fastprompt {'shares' if shares else 'does not share'} the prompt)"
    )
    for name, ok in matches.items():
        if not ok:
            progress(f"MISMATCH model {MODEL_LABEL}: {workload}: {name} differs from its reference")
    results = shared_prefix.timed_rows(
        workload, steps, matches, device, budget_s=budget_s, reference=REFERENCE
    )
    seconds = {r.provider: r.seconds for r in results}
    line = (
        f"{MODEL_LABEL} {workload}: fastprompt packed {seconds[REFERENCE] / seconds[PACKED]:.2f}x "
        f"peft padded, {seconds[PACKED] / seconds[FLOOR]:.2f}x the no-prompt packed floor's time"
    )
    progress(line)
    if notes is not None:
        notes.append(line)
    return results


def main(argv=None) -> int:
    import argparse
    import sys

    from .measure import keep_freed_memory
    from .shapes import bench_device

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=1.0, help="timing seconds per provider and row")
    parser.add_argument(
        "--shapes",
        default=";".join(",".join(map(str, s)) for s in FUSED_SHAPES),
        help="fused head: N,L,B;...",
    )
    parser.add_argument("--only", choices=("fused", "packed"), help="run one of the two workloads")
    args = parser.parse_args(argv)
    device = bench_device()
    if device.type == "cpu":
        keep_freed_memory()
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    notes: list[str] = []
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    results = []
    if args.only != "packed":
        results += fused_head_results(device, budget_s=args.budget, shapes=shapes, progress=say, notes=notes)
    if args.only != "fused":
        results += packed_results(device, budget_s=args.budget, progress=say, notes=notes)
    print(shared_prefix.results_table(results), flush=True)
    print("\n".join(f"- {line}" for line in notes), flush=True)
    return 0 if all(r.matches_peft for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
