"""The built-in synthetic world (``synthetic:tiny|small|medium|demo``).

Latent item factors (shape, colour, texture, category and a continuous vector)
are rendered into images, text and audio; users' latent tastes over the same
factors drive cascaded view => cart => buy behaviors in three scenarios, plus
click / convert exposures. The ground truth travels with the dataset so tests
can assert what must be true. See :mod:`mmrec.datasets.synthetic.world`.
"""

from mmrec.datasets.synthetic.config import PRESETS, WorldConfig
from mmrec.datasets.synthetic.content import LazyContent
from mmrec.datasets.synthetic.factors import TrueAffinity
from mmrec.datasets.synthetic.world import make_world

__all__ = ["PRESETS", "WorldConfig", "LazyContent", "TrueAffinity", "make_world"]
