"""Packed / padding-free rows (beyond PEFT): each document with its own soft prompt, as if run alone.

TRL's packing and padding-free collators and transformers' ``DataCollatorWithFlattening`` hand the model
rows of concatenated documents, with ``position_ids`` that restart for each document and no attention
mask. PEFT prepends the N virtual tokens once to the whole row and drops the positions: documents attend
to the documents before them and only the first starts right after the prompt. Here each document gets
the prompt at positions 0..N-1, its tokens at N + their own positions, and attends to its own prompt and
its own earlier tokens only, so every token's logits, the loss and the gradients equal each document run
alone through PEFT.

- **Detection** (:func:`find_packed_rows`): ``position_ids`` given, no attention mask (transformers' own
  rule for its packed-sequence mask), and a position that is not the previous one + 1 inside a row (a new
  document starts there). With an attention mask a batch is an ordinary one, positions as PEFT's.
- **Shared layout** (the default): PEFT's own ``[B, N + L]`` rows (the prompt once, first) with
  positions ``0..N-1, N + p`` and a mask that is prompt-visible and block-causal per document, keeping each
  layer's sliding window or chunk (counted in positions): the prompt runs once per row, whatever the
  number of documents. The masks reach the model where it makes its own, one per kind of layer it has
  (:mod:`.packed_masks`), in the form its attention implementation takes (boolean for SDPA, additive
  for eager).
- **Inserted layout** (``share_prompt_prefix=False``, dropout active in training, and flash attention's
  varlen kernels, whose keys must be contiguous): the prompt inserted before each document,
  ``[P d1 P d2 ...]``, positions restarting per segment, ``cu_seq_lens_*`` / ``max_length_*`` /
  ``seq_idx`` rewritten to match; the decoder's output is gathered back to PEFT's ``[B, N + L, D]``
  (:mod:`fastprompt.prompt_once.decoder_share` runs it).
- **Unpacked layout** (a model whose masks the shared layout cannot reach: it builds them its own way,
  takes no ``position_ids`` (ALiBi), carries recurrent state across documents, or runs an attention
  implementation that takes no dense mask): each document a row of a right-padded batch with its own
  prompt and a padding mask, exactly what PEFT does with one document per row; gathered back the same way.
- **Pads**: ``pad_to_multiple_of`` pads a packed row with single-token "documents" (position 0, the pad
  token, label -100). They cost no prompt: in the shared layout they see the row's prompt like any
  document; in the inserted layout they get no prompt of their own (they see the first segment's prompt
  where a mask is used, and nothing but themselves under varlen kernels).
"""

from __future__ import annotations

import dataclasses

import torch

# Attention implementations that take a dense 4D mask, and the form they take it in. Eager ADDS the mask
# to the scores: a boolean mask would be silently wrong there. (Flex attention is not among them: it is
# not tested with a dense mask, and crashes on the CPU with one, in transformers alone as well.)
MASK_FORMS = {"sdpa": "bool", "eager": "additive"}
FLASH_KWARGS = frozenset({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"})


@dataclasses.dataclass
class PackedRows:
    """The documents of packed rows (B rows of L tokens).

    Attributes:
        positions: ``[B, L]`` int64, each token's own position in its document.
        doc: ``[B, L]`` int64, the document index of each token within its row (0, 1, ...).
        starts: ``[B, L]`` bool, True where a document starts (column 0 always).
        pads: ``[B, L]`` bool, True for single-token padding "documents" at the end of a row.
    """

    positions: torch.Tensor
    doc: torch.Tensor
    starts: torch.Tensor
    pads: torch.Tensor

    @property
    def batch(self) -> int:
        return self.doc.shape[0]

    @property
    def length(self) -> int:
        return self.doc.shape[1]


def is_varlen(implementation: str | None) -> bool:
    """Whether an attention implementation runs flash attention's varlen kernels (no dense mask)."""
    return implementation is not None and "flash" in implementation


def _restarts(positions: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool: True where a position is not the previous one + 1 (and at column 0)."""
    first = torch.ones_like(positions[:, :1], dtype=torch.bool)
    return torch.cat((first, positions[:, 1:] != positions[:, :-1] + 1), dim=1)


def find_packed_rows(
    input_ids: torch.Tensor,
    position_ids,
    attention_mask,
    *,
    labels: torch.Tensor | None = None,
    pad_token_id: int | None = None,
) -> PackedRows | None:
    """The packed rows of a call, or None for an ordinary batch.

    Args:
        input_ids: ``[B, L]`` int token ids.
        position_ids: None, or ``[B, L]`` / ``[1, L]`` int positions (``[1, L]`` is shared by every row).
        attention_mask: None, or the caller's mask (``[B, L]``; then the batch is an ordinary one).
        labels: ``[B, L]`` int64 or None; with ``pad_token_id``, tells trailing pads from documents.
        pad_token_id: the model's pad token id, or None.

    Raises:
        ValueError: ``position_ids`` of another length than the ids, another batch, not integers or
            negative; or positions that restart inside a row where ``attention_mask`` marks one sequence.
    """
    if position_ids is None:
        return None
    batch, length = input_ids.shape
    if not torch.is_tensor(position_ids) or position_ids.is_floating_point() or position_ids.is_complex():
        raise ValueError(f"position_ids must be an integer tensor, got {_describe(position_ids)}.")
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.dim() != 2 or position_ids.shape[1] != length or position_ids.shape[0] not in (1, batch):
        raise ValueError(
            f"position_ids has shape {tuple(position_ids.shape)}, input_ids {tuple(input_ids.shape)}: "
            f"expected [{batch}, {length}] or [1, {length}] (one position per token)."
        )
    positions = position_ids.to(device=input_ids.device, dtype=torch.int64).expand(batch, length)
    if length == 0:
        return None
    restarts = _restarts(positions)
    if attention_mask is not None:
        if torch.is_tensor(attention_mask) and attention_mask.dim() == 2:
            real = attention_mask.to(input_ids.device) != 0
            inside = restarts[:, 1:] & real[:, 1:] & real[:, :-1]
            if bool(inside.any()):
                raise ValueError(
                    "position_ids restart inside a row where attention_mask marks one sequence: packed rows "
                    "(several documents per row) come without attention_mask, as transformers' "
                    "DataCollatorWithFlattening and TRL's padding-free collators give them; pass either "
                    "attention_mask or restarting position_ids."
                )
        return None  # an ordinary batch: positions as PEFT's
    if not bool(restarts[:, 1:].any()):
        return None
    if bool((positions < 0).any()):
        raise ValueError("position_ids of packed rows must be >= 0.")
    doc = restarts.to(torch.int64).cumsum(1) - 1
    pads = _trailing_pads(input_ids, positions, restarts, labels, pad_token_id)
    return PackedRows(positions=positions, doc=doc, starts=restarts, pads=pads)


def _describe(value) -> str:
    if torch.is_tensor(value):
        return f"a {value.dtype} tensor"
    return type(value).__name__


def _trailing_pads(input_ids, positions, starts, labels, pad_token_id) -> torch.Tensor:
    """``[B, L]`` bool: the trailing run of single-token documents at position 0 of each row that hold the
    pad token (where the config names one) with label -100 (where labels are given): what TRL's
    ``pad_to_multiple_of`` appends to a packed row (its configs often name no pad token)."""
    if pad_token_id is None and labels is None:
        return torch.zeros_like(starts)
    single = starts & (positions == 0)
    single[:, :-1] &= starts[:, 1:]  # the next token starts another document
    if pad_token_id is not None:
        single &= input_ids == pad_token_id
    if labels is not None:
        single &= labels.to(input_ids.device) == -100
    # only a trailing run counts: flip, keep the leading run of True, flip back
    run = torch.flip(single, dims=[1]).to(torch.int64).cumprod(1).flip(dims=[1]).bool()
    run[:, 0] = False  # a row's first document is a document
    return run


def document_lengths(rows: PackedRows) -> list[int]:
    """The token count of every document of the rows (pads left out)."""
    lengths = []
    for doc, pad in zip(rows.doc.tolist(), rows.pads.tolist(), strict=True):
        counts: dict = {}
        for d, is_pad in zip(doc, pad, strict=True):
            if not is_pad:
                counts[d] = counts.get(d, 0) + 1
        lengths += counts.values()
    return lengths


def shared_positions(rows: PackedRows, n: int) -> torch.Tensor:
    """``[B, N + L]`` int64 positions of the shared layout: ``0..N-1`` (prompt), ``N + p`` (a token)."""
    prompt = torch.arange(n, device=rows.positions.device).expand(rows.batch, n)
    return torch.cat((prompt, rows.positions + n), dim=1)


@dataclasses.dataclass
class Layout:
    """A sequence layout for the mask: per row and slot, its segment, position and visibility.

    Attributes:
        segment: ``[B, S]`` int64 segment of each slot (slots of one segment see each other causally).
        positions: ``[B, S]`` int64 positions.
        shared_key: ``[B, S]`` bool, a prompt slot that ``sees_shared`` queries see whatever their segment.
        sees_shared: ``[B, S]`` bool, queries that see the shared prompt slots.
        valid: ``[B, S]`` bool, False for slots that only pad a row to S.
    """

    segment: torch.Tensor
    positions: torch.Tensor
    shared_key: torch.Tensor
    sees_shared: torch.Tensor
    valid: torch.Tensor


def shared_layout(rows: PackedRows, n: int) -> Layout:
    """The shared layout's slots: PEFT's ``[B, N + L]`` (the prompt once per row, first)."""
    device = rows.doc.device
    prompt_segment = torch.full((rows.batch, n), -1, dtype=torch.int64, device=device)
    shared_key = torch.zeros(rows.batch, n + rows.length, dtype=torch.bool, device=device)
    shared_key[:, :n] = True
    return Layout(
        segment=torch.cat((prompt_segment, rows.doc), dim=1),
        positions=shared_positions(rows, n),
        shared_key=shared_key,
        sees_shared=torch.ones_like(shared_key),
        valid=torch.ones_like(shared_key),
    )


def layout_mask(layout: Layout, kind: str, span: int | None, implementation: str, dtype: torch.dtype):
    """The ``[B, 1, S, S]`` attention mask of a layout for one kind of layer.

    A query sees key k when k is not after it, k is in its segment (or is a shared prompt slot it sees),
    and, by kind: ``"full"`` nothing more; ``"sliding"``: their positions are less than ``span`` apart;
    ``"chunked"``: their positions are in the same chunk of ``span``. Boolean for SDPA (True: attend),
    additive (0 / the dtype's min) for eager.

    Raises:
        ValueError: an attention implementation no dense mask is known to be exact for, or an unknown kind.
    """
    form = MASK_FORMS.get(implementation)
    if form is None:
        raise ValueError(
            f"packed rows with attn_implementation={implementation!r}: fastprompt builds their mask for "
            f"{', '.join(sorted(MASK_FORMS))}."
        )
    if kind not in ("full", "sliding", "chunked"):
        raise ValueError(f"packed rows: no mask of kind {kind!r}.")
    window, chunk = (span, None) if kind == "sliding" else (None, span if kind == "chunked" else None)
    return _mask(layout, window, form, dtype, chunk)


def _mask(layout: Layout, window: int | None, form: str, dtype: torch.dtype, chunk: int | None = None):
    size = layout.segment.shape[1]
    index = torch.arange(size, device=layout.segment.device)
    causal = index[None, :] <= index[:, None]  # [S(q), S(k)]
    seg_q, seg_k = layout.segment[:, :, None], layout.segment[:, None, :]
    visible = (seg_q == seg_k) | (layout.shared_key[:, None, :] & layout.sees_shared[:, :, None])
    allowed = causal[None] & visible & layout.valid[:, None, :]
    if window is not None:
        allowed &= (layout.positions[:, :, None] - layout.positions[:, None, :]) < window
    if chunk is not None:
        allowed &= (layout.positions[:, :, None] // chunk) == (layout.positions[:, None, :] // chunk)
    allowed |= torch.eye(size, dtype=torch.bool, device=allowed.device)[None]  # no query sees nothing
    allowed = allowed[:, None]  # [B, 1, S, S]
    if form == "bool":
        return allowed
    additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return additive.masked_fill_(~allowed, torch.finfo(dtype).min)


@dataclasses.dataclass
class InsertedLayout:
    """The prompt inserted before each document: ``[B, S]`` slots.

    Attributes:
        source: ``[B, S]`` int64, the column of PEFT's ``[B, N + L]`` layout each slot copies (prompt row
            j: column j; token t: column N + t; padding slots: 0).
        back: ``[B, N + L]`` int64, the slot each column of PEFT's layout is read back from (the prompt
            from the first segment).
        layout: the mask's view of the slots.
        varlen: the ``cu_seq_lens_*`` / ``max_length_*`` / ``seq_idx`` keywords of the segments.
    """

    source: torch.Tensor
    back: torch.Tensor
    layout: Layout
    varlen: dict


def inserted_layout(rows: PackedRows, n: int) -> InsertedLayout:
    """The inserted layout of packed rows: per row, ``[P, d1, P, d2, ..., pads]``, padded to the longest
    row; positions ``0..N-1`` then ``N + p`` per segment (pads ``N``)."""
    device = rows.doc.device
    # A host-side plan per row (documents are few; this runs once per forward). A slot is
    # (source column, position, segment, shared prompt key, sees the shared prompt).
    plans, backs = [], []
    for doc, pad, pos in zip(rows.doc.tolist(), rows.pads.tolist(), rows.positions.tolist(), strict=True):
        slots, back, segment = [], [0] * (n + rows.length), -1
        for t in range(rows.length):
            if t == 0 or doc[t] != doc[t - 1]:
                segment += 1
                if not pad[t]:
                    first = segment == 0
                    if first:
                        back[:n] = range(len(slots), len(slots) + n)
                    slots.extend((j, j, segment, first, False) for j in range(n))
            back[n + t] = len(slots)
            slots.append((n + t, n + pos[t], segment, False, pad[t]))
        plans.append(slots)
        backs.append(back)
    size = max(len(slots) for slots in plans)
    filler = (0, 0, -2, False, False)
    columns = list(zip(*(slots + [filler] * (size - len(slots)) for slots in plans), strict=True))

    def column(i, dtype=torch.int64):
        return torch.tensor([[slot[i] for slot in row] for row in columns], dtype=dtype, device=device).T

    valid = torch.tensor([[i < len(slots) for i in range(size)] for slots in plans], device=device)
    slot = torch.arange(size, device=device).expand(len(plans), size)
    layout = Layout(
        segment=torch.where(valid, column(2), -2 - slot),  # padding slots: each a segment of its own
        positions=column(1),
        shared_key=column(3, torch.bool),
        sees_shared=column(4, torch.bool),
        valid=valid,
    )
    return InsertedLayout(
        source=column(0),
        back=torch.tensor(backs, dtype=torch.int64, device=device),
        layout=layout,
        varlen=_varlen_keywords(layout),
    )


def _varlen_keywords(layout: Layout) -> dict:
    """Flash attention's varlen keywords for the segments of a layout, over its rows flattened: segment
    boundaries ``cu_seq_lens_q/k`` (int32 ``[S_count + 1]``), ``max_length_q/k`` (int) and ``seq_idx``
    (int32 ``[B, S]``, each slot's segment in the flattened batch)."""
    segment = layout.segment.reshape(-1)
    row = torch.arange(layout.segment.shape[0], device=segment.device).repeat_interleave(
        layout.segment.shape[1]
    )
    change = torch.ones_like(segment, dtype=torch.bool)
    change[1:] = (segment[1:] != segment[:-1]) | (row[1:] != row[:-1])
    starts = change.nonzero().flatten()
    cu = torch.cat((starts, torch.tensor([segment.numel()], device=segment.device))).to(torch.int32)
    longest = int(cu.diff().max())
    seq_idx = (change.to(torch.int64).cumsum(0) - 1).to(torch.int32).view_as(layout.segment)
    return {
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
        "seq_idx": seq_idx,
    }


def inserted_inputs(embeds: torch.Tensor, inserted: InsertedLayout) -> torch.Tensor:
    """``[B, S, D]``: PEFT's ``[B, N + L, D]`` rows copied into the inserted layout (a gather: the prompt
    copies' gradients add up in PEFT's prompt rows)."""
    index = inserted.source[:, :, None].expand(-1, -1, embeds.shape[-1])
    return embeds.gather(1, index)


def gathered_back(hidden: torch.Tensor, inserted: InsertedLayout) -> torch.Tensor:
    """``[B, N + L, ...]``: the inserted layout's ``[B, S, ...]`` outputs read back into PEFT's layout."""
    index = inserted.back.view(*inserted.back.shape, *([1] * (hidden.dim() - 2)))
    return hidden.gather(1, index.expand(-1, -1, *hidden.shape[2:]))


@dataclasses.dataclass
class UnpackedLayout:
    """Each document a row of its own, right-padded: ``[R, S]`` slots (R: the documents, and one row per
    batch row that ends in pads, which get the prompt too).

    Attributes:
        source: ``[R, S]`` int64, the element of PEFT's ``[B, N + L]`` layout, flattened, each slot copies
            (prompt row j of batch row b: ``b * (N + L) + j``; padding slots: 0).
        back: ``[B, N + L]`` int64, the slot of ``[R, S]``, flattened, each element of PEFT's layout is read
            back from (a row's prompt from its first document's row).
        attention_mask: ``[R, S]`` int64, 1 for the prompt and the document's tokens, 0 for padding.
    """

    source: torch.Tensor
    back: torch.Tensor
    attention_mask: torch.Tensor


def unpacked_layout(rows: PackedRows, n: int) -> UnpackedLayout:
    """The unpacked layout of packed rows: ``[P d]`` per document, right-padded to the longest."""
    device = rows.doc.device
    width = n + rows.length
    plans, backs = [], []  # per unpacked row: the flat source of each slot
    for b, (doc, pad) in enumerate(zip(rows.doc.tolist(), rows.pads.tolist(), strict=True)):
        back = [0] * width
        segments: dict = {}
        for t in range(rows.length):
            key = "pads" if pad[t] else doc[t]
            segments.setdefault(key, []).append(t)
        for first, tokens in enumerate(segments.values()):
            row = len(plans)
            if first == 0:  # the row's first document: its prompt is read back from here
                back[:n] = [(row, j) for j in range(n)]
            plans.append([b * width + j for j in range(n)] + [b * width + n + t for t in tokens])
            for i, t in enumerate(tokens):
                back[n + t] = (row, n + i)
        backs.append(back)
    size = max(len(plan) for plan in plans)
    source = torch.tensor([plan + [0] * (size - len(plan)) for plan in plans], dtype=torch.int64)
    mask = torch.tensor([[1] * len(plan) + [0] * (size - len(plan)) for plan in plans], dtype=torch.int64)
    back = torch.tensor([[r * size + s for r, s in row] for row in backs], dtype=torch.int64)
    return UnpackedLayout(source=source.to(device), back=back.to(device), attention_mask=mask.to(device))


def unpacked_inputs(embeds: torch.Tensor, unpacked: UnpackedLayout) -> torch.Tensor:
    """``[R, S, D]``: PEFT's ``[B, N + L, D]`` rows copied into the unpacked layout (the prompt copies'
    gradients add up in PEFT's prompt rows)."""
    flat = embeds.reshape(-1, *embeds.shape[2:])
    return flat.index_select(0, unpacked.source.reshape(-1)).view(*unpacked.source.shape, *embeds.shape[2:])


def unpacked_back(hidden: torch.Tensor, unpacked: UnpackedLayout) -> torch.Tensor:
    """``[B, N + L, ...]``: the unpacked layout's ``[R, S, ...]`` outputs read back into PEFT's layout."""
    flat = hidden.reshape(-1, *hidden.shape[2:])
    return flat.index_select(0, unpacked.back.reshape(-1)).view(*unpacked.back.shape, *hidden.shape[2:])


def doc_start_labels_matter(rows: PackedRows, labels: torch.Tensor | None) -> bool:
    """Whether a document after a row's first has a label on its first token (TRL's collators set them to
    -100): then the token before it in the row (another document's last) must not predict it."""
    if labels is None:
        return False
    later_starts = rows.starts.clone()
    later_starts[:, 0] = False
    return bool(((labels.to(later_starts.device) != -100) & later_starts).any())
