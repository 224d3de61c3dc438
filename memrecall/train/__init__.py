"""Training: train state, objectives, the stages' step functions, checkpoints and logging.

The package is also callable, `memrecall.train(config, workdir)`: the name is both the
public face's training function and this package's, which importing any of its modules sets
as `memrecall`'s attribute, so the package itself runs `trainer.train`.
"""

import sys
import types


class _TrainPackage(types.ModuleType):

  def __call__(self, config, workdir: str, log=print, stop_at=None) -> dict:
    """Runs (or resumes) one training stage: `memrecall.train.trainer.train`, whose docstring
    says what each argument does; returns the last logged metrics."""
    from memrecall.train import trainer  # pylint: disable=g-import-not-at-top
    return trainer.train(config, workdir, log=log, stop_at=stop_at)


sys.modules[__name__].__class__ = _TrainPackage
