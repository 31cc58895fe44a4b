"""Bridge: item-item graphs built from content features (LATTICE/MICRO style).

``knn_graph`` turns a feature matrix (plus its presence mask) into a sparse,
normalised top-k cosine graph without ever materialising the N x N similarity.
"""

from mmrec.fusion.bridge.knn import KNN_BACKENDS, KnnGraph, exact_topk, knn_graph

__all__ = ["KNN_BACKENDS", "KnnGraph", "exact_topk", "knn_graph"]
