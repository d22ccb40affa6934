"""Interventions: steer with features and vectors, find and remove directions, decompose vectors."""
