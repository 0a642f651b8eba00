"""Plugins of the preprocessing bundle: layouts, geometry, label remapping, the cohort runner."""
