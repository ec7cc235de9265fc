"""The pipeline: one run, from a config to MLflow, in the README's seven steps.

``runner`` is the short orchestration (:func:`run`); the stages it calls live beside it.
"""
