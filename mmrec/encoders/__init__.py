"""Item-content encoders: image (timm, open_clip), text (transformers, open_clip),
audio (transformers, log-mel CNN) and behavior (ID embeddings), each a backbone +
projection head with its library's own preprocessing. See docs/encoders.md.

    from mmrec.encoders import create_encoder
    enc = create_encoder("image")            # efficientnet_lite0, shipped ImageNet weights
    z = enc(enc.preprocess(images))          # [B, 256]
"""

from mmrec.encoders.base import (DEFAULT_FAMILY, DEFAULT_NAME, HEADS, Batch, Encoder, create_encoder,
                                 list_encoders)
from mmrec.encoders.weights import (LOCAL_WEIGHTS, LocalWeights, WeightsError, WeightsNotFoundError,
                                    read_state_dict)
from mmrec.encoders import audio, behavior, image, text  # noqa: E402,F401  (fill the ENCODERS registry)

__all__ = ["Batch", "DEFAULT_FAMILY", "DEFAULT_NAME", "Encoder", "HEADS", "LOCAL_WEIGHTS", "LocalWeights",
           "WeightsError", "WeightsNotFoundError", "create_encoder", "list_encoders", "read_state_dict"]
