"""Evaluation: ranking and binary metrics, and the full / sampled ranking protocols.

Eval knows protocols and metrics, not models: protocols take any *scorer* with
``prepare_eval``, ``score_all`` and ``score`` (see :mod:`mmrec.eval.protocols`).
"""

from mmrec.eval.metrics import (
    RANKING_METRICS,
    RankingMetrics,
    auc,
    binary_metrics,
    gauc,
    log_loss,
    metrics_from_ranks,
    ranking_metrics,
)
from mmrec.eval.protocols import PROTOCOLS, EvalResult, evaluate, evaluate_full, evaluate_sampled

__all__ = ["RANKING_METRICS", "RankingMetrics", "auc", "binary_metrics", "gauc", "log_loss",
           "metrics_from_ranks", "ranking_metrics", "PROTOCOLS", "EvalResult", "evaluate",
           "evaluate_full", "evaluate_sampled"]
