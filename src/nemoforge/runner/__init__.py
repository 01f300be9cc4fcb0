"""Run the recipe's steps: the library half of every KFP component and TrainJob worker.

- :mod:`~nemoforge.runner.index`: a step's key, the store's step index (``index/<step>/<key>.json``), the cache.
- :mod:`~nemoforge.runner.stage_table`: the one table of stages (where each ``run()`` lives, what its key covers,
  what its task outputs).
- :mod:`~nemoforge.runner.retrain`: the pipeline's first task, retrain or skip by the champion's input digests.
- :mod:`~nemoforge.runner.execute`: run or reuse a step under its MLflow run (locally or as a TrainJob).
- :mod:`~nemoforge.runner.register`: register the evaluated model and move its aliases.

Nothing here imports ``kfp``: the components (``nemoforge_components``) turn KFP artifacts into the plain
references (:data:`~nemoforge.runner.index.Ref`) these functions take and return.
"""
