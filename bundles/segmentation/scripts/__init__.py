"""Plugins of the segmentation bundle: partial-label loss, cohort sampling, pseudo-label writing."""
