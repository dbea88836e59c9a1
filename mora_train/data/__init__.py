"""Data builders: each task recipe reads its sources and tokenizes them into training and evaluation examples."""
