"""The ``nemoforge`` command line, the top layer: it compiles, submits and runs the recipe pipeline
(``nemoforge_pipelines``, ``nemoforge_components``) over the library (``nemoforge``).

``nemoforge`` (the console command) and ``python -m nemoforge_cli`` both run :func:`nemoforge_cli.main.main`.
"""
