"""Evaluation of trained models, one module per kind of metric.

Nothing here imports mora_train.data: an evaluator takes plain examples and callables (prompt
renderers, the collator that batches tokenized examples), which the task registry, mora_train.tasks,
builds from the data side.
"""
