"""Chest X-ray analysis: lung segmentation, finding classification, Grad-CAM."""
