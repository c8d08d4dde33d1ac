"""blindnet: BlindNet (CVPR 2024) domain-generalised semantic segmentation, from training to deployment.

The deployable pieces are importable from here; training-only code lives in ``blindnet.losses`` and ``blindnet.task``
and is never imported by this module.
"""

from blindnet.checkpoint import CheckpointError, convert_official_checkpoint, load_model, save_model
from blindnet.inference import Backend, BackendOutput, Prediction, Predictor, TorchBackend
from blindnet.models import DeepLabV3Plus, ModelConfig, build_model, count_parameters

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendOutput",
    "CheckpointError",
    "DeepLabV3Plus",
    "ModelConfig",
    "Prediction",
    "Predictor",
    "TorchBackend",
    "build_model",
    "convert_official_checkpoint",
    "count_parameters",
    "load_model",
    "save_model",
]
