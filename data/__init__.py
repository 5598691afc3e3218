"""The datasets of the experiments (Section 5 of "Matrix capsules with EM routing"), by name.

One module per dataset (`data.mnist`), each with a `SPEC`; beside them the shared readers
(`data.idx`), the verified download (`data.download`) and the `tf.data` input pipeline
(`data.pipeline`, imported on its own so that reading data never needs TensorFlow).
"""

from data import mnist
from data.spec import DatasetSpec

__all__ = ["DATASETS", "DatasetSpec", "get"]

DATASETS = {mnist.SPEC.name: mnist.SPEC}


def get(name):
    """Returns the `DatasetSpec` called `name`.

    Args:
        name: a key of `DATASETS`, e.g. "mnist".

    Returns:
        The dataset's `DatasetSpec`.

    Raises:
        ValueError: no dataset has that name.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]
