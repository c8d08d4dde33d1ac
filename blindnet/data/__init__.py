"""Training and evaluation data: real dataset loaders, synthetic aligned-appearance scenes, the recipe's joint
transforms and class-uniform sampling.

``DATASETS`` maps names to classes; :func:`build_train_dataset` / :func:`build_eval_dataset` build them with the
paper's transforms. See :mod:`blindnet.data.datasets` for layouts and item formats.
"""

from blindnet.data.datasets import (
    ACDC,
    BDD100K,
    DATASETS,
    GTAV,
    SYNTHIA,
    AlignedAppearanceDataset,
    Cityscapes,
    DarkZurich,
    DatasetError,
    Mapillary,
    SegmentationDataset,
    build_eval_dataset,
    build_train_dataset,
)
from blindnet.data.sampling import ClassUniformSampler, SampleKey, class_uniform_epoch, item_seed
from blindnet.data.transforms import (
    ColorJitter,
    EvalTransform,
    TrainTransform,
    build_eval_transform,
    build_train_transform,
    gaussian_blur,
)

__all__ = [
    "ACDC",
    "BDD100K",
    "DATASETS",
    "GTAV",
    "SYNTHIA",
    "AlignedAppearanceDataset",
    "Cityscapes",
    "ClassUniformSampler",
    "ColorJitter",
    "DarkZurich",
    "DatasetError",
    "EvalTransform",
    "Mapillary",
    "SampleKey",
    "SegmentationDataset",
    "TrainTransform",
    "build_eval_dataset",
    "build_eval_transform",
    "build_train_dataset",
    "build_train_transform",
    "class_uniform_epoch",
    "gaussian_blur",
    "item_seed",
]
