"""Contrastive alignment pre-training: content encoders aligned with behavior
embeddings and with each other (losses here; trainer and extraction beside it)."""

from mmrec.pretrain.losses import ContrastiveAlignmentLoss, info_nce

__all__ = ["ContrastiveAlignmentLoss", "info_nce"]
