"""Workflows: the top floor below the CLI, plain Python functions a notebook can call.

Each ``medkd`` command is a thin typer shell over one of these (or over a lower-floor function):

* :mod:`medkd.workflows.train_teachers` - plan and train a teacher set (``medkd train-teachers``).
"""
