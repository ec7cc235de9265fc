"""A user's own project: a model builder, a data factory and a callback that tfharness runs."""
