"""Side-by-side runs of flatminima's methods and their authors' code, one module per family
(each module's ``METHODS`` names what it compares); ``scripts/compare_with_authors.py`` picks
the module for ``--method``."""
