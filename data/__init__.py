"""The datasets of the experiments (Section 5 of "Matrix capsules with EM routing") and Fashion-MNIST, by name.

One module per dataset (`data.mnist`, `data.fashion_mnist`, `data.smallnorb`), each with a `SPEC`;
beside them the shared readers (`data.idx`, `data.norb_matrix`), the verified download
(`data.download`), and the TensorFlow parts, imported on their own so that reading data never needs
TensorFlow: the `tf.data` input pipeline (`data.pipeline`) and smallNORB's preprocessing
(`data.smallnorb_preprocess`).
"""

from data import fashion_mnist, mnist, smallnorb
from data.spec import DatasetSpec

__all__ = ["DATASETS", "DatasetSpec", "get", "load_arrays", "for_evaluation", "PREPROCESSED"]

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


# Datasets fed to the network as preprocessed float images (data.pipeline.build_preprocessed_pipeline).
PREPROCESSED = (smallnorb.SPEC.name,)


def load_arrays(name, data_dir, split, channels=smallnorb.CHANNELS):
    """The split's images and labels as the input pipeline takes them, the files downloaded when missing.

    Args:
        name: a key of `DATASETS`.
        data_dir: the dataset's folder.
        split: 'train' or 'test'.
        channels: smallNORB only: 1 (the first image of each stereo pair) or 2 (both).

    Returns:
        (images, int64 labels [N]): uint8 [N, H, W] for the IDX datasets; for smallNORB float32
        [N, 48, 48, channels], downsampled and standardised (smallnorb_preprocess.preprocess).
    """
    spec = get(name)
    spec.ensure(data_dir)
    if name not in PREPROCESSED:
        return spec.load(data_dir, split)
    from data import smallnorb_preprocess  # needs TensorFlow

    images, labels = smallnorb.load(data_dir, split, channels)
    return smallnorb_preprocess.preprocess(images), labels


def for_evaluation(name, images):
    """Images as evaluation feeds them: smallNORB's centre 32x32 crop of `load_arrays` output; others as they are."""
    if name not in PREPROCESSED:
        return images
    from data import smallnorb_preprocess  # needs TensorFlow

    return smallnorb_preprocess.centre_crop(images)
