"""Training runs on real data, recorded in SQLite, compared in tables and plots.

``data`` (offline datasets, label noise), ``models``, ``config`` (a run's validated, hashed
configuration), ``store`` (the SQLite database), ``runner`` (training, resumable grids),
``grid`` (expanding methods × seeds × sweeps), ``report`` (tables and plots) and ``demo`` (the
main job's embedded defaults). The ``flatminima`` command (:mod:`flatminima.cli`) drives them.
"""
