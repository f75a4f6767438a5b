"""Curvature capture: layer helpers, hooks and inverse strategies."""
