"""Targets of the heads: padding and document-boundary masks."""

import torch

from mtp_pretrain.targets import target_mask

EOS, PAD = 0, 1


def test_target_mask_marks_padding_and_documents() -> None:
    tokens = torch.tensor([[5, 6, EOS, 7, 8, EOS, 9, PAD]])
    valid, seg = target_mask(tokens, EOS, PAD, mask_doc_boundaries=True)
    assert valid.tolist() == [[True] * 7 + [False]]
    assert seg.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2]]  # a document's EOS belongs to it
    valid, seg = target_mask(tokens, EOS, PAD, mask_doc_boundaries=False)
    assert not seg.any() and valid.sum() == 7
