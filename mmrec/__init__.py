"""mmrec: multimodal pre-training and fusion for recommendation.

The path: item content -> encoders / alignment pre-training -> feature store
-> fusion (bridge, attention, filtration) -> multi-behavior graph models
-> joint-task heads -> evaluation. See docs/design.md.
"""

__version__ = "0.1.0"
