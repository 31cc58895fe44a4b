"""Model base class and factory. Concrete models live in graph/, fusion/, ... and
register themselves in :data:`mmrec.registry.MODELS` on import."""

from mmrec.models.base import Recommender, create_model, import_all_models

__all__ = ["Recommender", "create_model", "import_all_models"]
