"""mmrec.fusion: how item content meets behaviour.

Three jobs, one subpackage or module each:

- ``bridge``: item-item kNN graphs built from content features (the sparse,
  blockwise builder in ``bridge.knn``) and the models that propagate over them
  (LATTICE/MICRO style);
- attention fusion (NOVA) and simple fusions (concat, sum, gated);
- filtration: behaviour-guided denoising of features and edges.

Nothing heavy is imported here, so ``import mmrec.fusion`` stays cheap; import
the submodule you need.
"""
