"""Evaluation of trained models, one module per kind of metric."""
