"""Saliency: GradCAM maps, slice selection and thumbnails for the report's visual section."""

from tasks.saliency.saliency import build_visual_summary

__all__ = ["build_visual_summary"]
