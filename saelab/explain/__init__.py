"""Explanations of features: LM clients (local transformers or any OpenAI-compatible endpoint),
explainers, and scorers that report every score beside its chance and shuffled-label controls."""
