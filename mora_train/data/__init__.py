"""Data builders: each task recipe reads its sources and tokenizes them into training and evaluation examples.

Nothing here imports mora_train.evaluation: what a builder needs from it (e.g. the math recipe's
final-answer reader) is passed in by the task registry, mora_train.tasks.
"""
