"""mmrec: multimodal pre-training and fusion for recommendation.

The path: item content -> encoders / alignment pre-training -> feature store
-> fusion (bridge, attention, filtration) -> multi-behavior graph models
-> joint-task heads -> evaluation. See docs/design.md.
"""

__version__ = "0.1.0"

__all__ = ["Recommender", "__version__"]


def __getattr__(name: str):
    """``mmrec.Recommender``: the serving API (``Recommender.load(RUN).recommend(...)``).

    Imported on first use so that ``import mmrec`` stays cheap (no torch import).
    Not to be confused with ``mmrec.models.base.Recommender``, the model base class.
    """
    if name == "Recommender":
        from mmrec.recommend import Recommender
        return Recommender
    raise AttributeError(f"module 'mmrec' has no attribute '{name}'")
