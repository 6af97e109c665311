"""Packed / padding-free rows with a prefix-tuning adapter: each document on its own prefix, as if alone.

A document run alone through prefix tuning's definition sees the N prefix keys/values of every layer and its
own tokens, at positions N + its own positions; its first token is predicted by nothing (the prefix has no
logits). Packed rows (``position_ids`` restarting per document, no attention mask: TRL's packing and
padding-free collators, transformers' ``DataCollatorWithFlattening``) are run here in the unpacked layout of
:mod:`.packed` with no prompt rows (``n = 0``): at the decoder, each document is a row of a right-padded
batch ``[R, S]``, with the mask ``[ones(R, N), padding mask]`` and a prefix cache of R rows (the encoder
still runs once per adapter; the cache is expanded over the R documents). Its hidden states are read back
into the packed ``[B, L]`` layout (:func:`.packed_forward.unpacked_plan`), so whatever head the model has
(its own loss, TRL's fused LM head) sees the rows' own shapes and labels.

Labels: the token before a later document's first token belongs to another document, so that label is set
to -100 (alone, nothing predicts it: exact whatever the caller's labels there). ``shift_labels`` likewise.

Flash attention's varlen keywords are dropped: the documents run as a padded batch with a padding mask.
"""

from __future__ import annotations

import dataclasses

import torch

from . import packed
from .decoder_share import decoder_plan
from .packed_forward import unpacked_plan
from .policy import padding_sensitive, rope_length_reason
from .prefix_kv import PrefixTuningError


@dataclasses.dataclass
class PrefixUnpacked:
    """Packed rows laid out for a prefix adapter.

    Attributes:
        layout: the unpacked layout with no prompt rows: ``source`` / ``back`` map the ``[B, L]`` tokens to
            ``[R, S]`` and back, and ``attention_mask`` is ``[R, N + S]`` (the prefix's N ones first).
        batch_row: ``[R]`` the batch row each unpacked row comes from (its adapter's).
    """

    layout: packed.UnpackedLayout
    batch_row: tuple[int, ...]

    @property
    def rows(self) -> int:
        return len(self.batch_row)

    @property
    def width(self) -> int:
        """S, the longest unpacked row (a row's trailing pads are one row)."""
        return self.layout.source.shape[1]


def why_not_exact(base_model, rows: packed.PackedRows, unpacked: PrefixUnpacked, n: int) -> str | None:
    """Why the documents cannot run as one padded batch exactly (None: they can): a result that depends on
    the padding, or rope frequencies picked by the forward's length (the padded batch is N + S long, a
    document alone N + its length)."""
    if padding_sensitive(base_model):
        return "its sparse-attention indexer counts a padded batch's padded keys"
    return rope_length_reason(base_model, n + min(packed.document_lengths(rows)), n + unpacked.width)


def unpack(rows: packed.PackedRows, n: int) -> PrefixUnpacked:
    """The documents of packed rows as a right-padded batch, with the prefix's N mask columns."""
    layout = packed.unpacked_layout(rows, 0)
    batch_row = tuple((layout.source[:, 0] // rows.length).tolist())
    mask = layout.attention_mask
    prefix = torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device)
    return PrefixUnpacked(
        dataclasses.replace(layout, attention_mask=torch.cat((prefix, mask), dim=1)), batch_row
    )


def document_labels(labels, rows: packed.PackedRows):
    """``labels`` (``[B, L]``, or None) with each later document's first label -100: alone, nothing
    predicts a document's first token."""
    if labels is None:
        return None
    later = rows.starts.clone()
    later[:, 0] = False
    return labels.masked_fill(later.to(labels.device), -100)


def document_shift_labels(shift_labels, rows: packed.PackedRows):
    """Pre-shifted labels (``[B, L]``: position t's target is token t + 1) with every target that starts a
    document -100."""
    if shift_labels is None:
        return None
    ends = torch.zeros_like(rows.starts)
    ends[:, :-1] = rows.starts[:, 1:]
    ends[:, -1] = True
    return shift_labels.masked_fill(ends.to(shift_labels.device), -100)


def run_unpacked(base_model, call, inputs_embeds: torch.Tensor, unpacked: PrefixUnpacked):
    """``call(inputs_embeds)`` (the model's call over the packed ``[B, L, D]`` embeddings, with a prefix
    cache of ``unpacked.rows`` rows among its keywords) with the decoder running the documents as rows.

    Raises:
        PrefixTuningError: the model's forward never called its decoder with the rows' embeddings.
    """
    with decoder_plan(base_model, inputs_embeds, unpacked_plan(unpacked.layout)) as state:
        output = call(inputs_embeds)
    if not state.ran:
        raise PrefixTuningError(
            "packed rows with a prefix-tuning adapter: the model's forward never called its decoder with the "
            "rows' embeddings, so the documents could not be run apart"
        )
    return output
