"""The datasets of the experiments (Section 5 of "Matrix capsules with EM routing") and Fashion-MNIST, by name.

One module per dataset (`data.mnist`, `data.fashion_mnist`, `data.smallnorb`), each with a `SPEC`;
beside them the shared readers (`data.idx`, `data.norb_matrix`), the verified download
(`data.download`), and the TensorFlow parts, imported on their own so that reading data never needs
TensorFlow: the `tf.data` input pipeline (`data.pipeline`) and smallNORB's preprocessing
(`data.smallnorb_preprocess`).
"""

from data import fashion_mnist, mnist, smallnorb
from data.spec import DatasetSpec

__all__ = ["DATASETS", "DatasetSpec", "get"]

DATASETS = {spec.name: spec for spec in (mnist.SPEC, fashion_mnist.SPEC, smallnorb.SPEC)}


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
