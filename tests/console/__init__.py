# A package, so the console's server and browser (package-scoped fixtures in conftest.py)
# stop after its last test instead of running on through the rest of the suite.
