"""Circuits: which features a model computes an answer with.

Tasks (prompt pairs or single prompts with a target token and a metric on the output), and the
attribution that reads dictionary sets (`saelab.dictionaries.sets`) to find the features and edges
behind a metric.
"""
