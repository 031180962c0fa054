"""A site's own validated model, run from a manifest by configuration only (docs/site-model.md):
:mod:`.manifest` reads and checks the manifest, :mod:`.plugin` is what the node sees before
anything heavy is loaded, :mod:`.pipeline` runs the TorchScript model or MONAI bundle."""
