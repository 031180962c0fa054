"""Chest X-ray models: training, evaluation against public sets, the gate's corpus."""
