"""The ``nemoforge`` command line, the top layer: it compiles, submits and runs the recipe pipeline
(``nemoforge_pipelines``, ``nemoforge_components``) over the library (``nemoforge``).

``nemoforge`` (the console command) and ``python -m nemoforge_cli`` both run :func:`nemoforge_cli.main.main`,
which parses the arguments (:mod:`~nemoforge_cli.parser`) and hands them to one command's module:
:mod:`~nemoforge_cli.run` (run), :mod:`~nemoforge_cli.recipe` (show, compile), :mod:`~nemoforge_cli.cluster`
(submit, schedule), :mod:`~nemoforge_cli.status` (status), :mod:`~nemoforge_cli.serve` (serve);
:mod:`~nemoforge_cli.console` filters the tasks' output under ``run``.
"""
