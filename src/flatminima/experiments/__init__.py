"""Training runs on real data, recorded in SQLite, compared in tables and plots.

``data`` (offline datasets, label noise), ``models``, ``config`` (a run's validated, hashed
configuration), ``store`` (the SQLite database), ``runner`` (training, resumable grids),
``grid`` (expanding methods × seeds × sweeps), ``sharpness_runs`` (the sharpness of finished
runs, measured from their saved weights), ``report`` (tables and plots) and ``demo`` (the main
job's embedded defaults). The ``flatminima`` command (:mod:`flatminima.cli`) drives them.
"""
