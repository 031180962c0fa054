"""Training and evaluation of the pipelines' models: not imported by the node (the ``train`` extra)."""
