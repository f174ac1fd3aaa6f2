"""Workflows: the top floor below the CLI, plain Python functions a notebook can call.

Each ``medkd`` command is a thin typer shell over one of these (or over a lower-floor function):

* :mod:`medkd.workflows.train`          - resolve a run config (``--config`` + flags + ``--set``), run or resume it;
* :mod:`medkd.workflows.distill`        - the distill config: teacher's data settings, recipe, ``distill`` section;
* :mod:`medkd.workflows.teacher_plan`   - plan a teacher set: its members by kind, ``plan.json``;
* :mod:`medkd.workflows.train_teachers` - train a teacher set member by member (``medkd train-teachers``);
* :mod:`medkd.workflows.predict`        - segment a folder with a checkpoint, a teacher set or a bundle (``medkd predict``);
* :mod:`medkd.workflows.export`         - a run's network as an ONNX bundle that runs without PyTorch (``medkd export``);
* :mod:`medkd.workflows.postprocess`    - (re)decide a run's post-processing and report it (``medkd postprocess``);
* :mod:`medkd.workflows.evaluate`       - evaluate predictions against labels (``medkd evaluate``);
* :mod:`medkd.workflows.catalog`        - tables of the shipped recipes and registry models (``medkd recipes/models``);
* :mod:`medkd.workflows.demo`           - the synthetic end-to-end demo (``medkd demo``);
* :mod:`medkd.workflows.study`          - the study file of ``medkd experiment``: schema and checks before training;
* :mod:`medkd.workflows.experiment`     - plan, run and resume every run of a study (``medkd experiment``);
* :mod:`medkd.workflows.study_results`  - evaluate a study's runs; results.csv, runs.csv, summary.csv;
* :mod:`medkd.workflows.study_summary`  - summary.csv: means over seeds, paired tests with Holm, bootstrap CIs, gap closed;
* :mod:`medkd.workflows.study_cost`     - ``--dry-run``: what is left of each run and its estimated cost;
* :mod:`medkd.workflows.study_plots`, :mod:`medkd.workflows.study_report` - ``medkd report``: HTML/Markdown with figures.
"""
