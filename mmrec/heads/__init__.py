"""Joint-task and multi-scenario heads: features [B, d] (+ scenario ids) -> logits [B, T].

Importing the package registers every head in :data:`mmrec.registry.HEADS`.
"""

from mmrec.heads import aitm, esmm, hamur, hierrec, mesi, mmoe, pepnet, ple, shared_bottom, star  # noqa: F401
from mmrec.heads.balancing import BALANCERS, FixedWeights, GradNorm, LossBalancer, UncertaintyWeighting, create_balancer
from mmrec.heads.base import Head, HeadConfig, check_scenario, create_head, task_labels

__all__ = ["Head", "HeadConfig", "create_head", "check_scenario", "task_labels",
           "LossBalancer", "FixedWeights", "UncertaintyWeighting", "GradNorm", "BALANCERS", "create_balancer"]
