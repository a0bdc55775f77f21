"""Models: the architecture zoo, the logits+features interface for any classifier, the segmentation wrapper,
the metadata that travels with a model, and checkpoints."""

from ..utils.atomic import file_sha256
from .checkpoint import (
                         load_feature_model,
                         load_model,
                         read_checkpoint,
                         read_meta,
                         read_state_dict,
                         save_atomic,
                         save_checkpoint,
                         unwrap_model,
    weights_hash,
)
from .espnet import ESPNET_ARCHS, ESPNET_PREPROCESSING, ESPNet
from .features import FeatureModel, find_head
from .imported import trusted_archs
from .meta import META_VERSION, RunMeta
from .resnet import ResNet18
from .segmentation import TRAIN_PARTS, SegmentationModel, resolve_train_part
from .wrn import WideResNet
from .zoo import ARCHITECTURES, DEFAULT_DROP_RATE, build_model

__all__ = [
    "ARCHITECTURES", "DEFAULT_DROP_RATE", "ESPNET_ARCHS", "ESPNET_PREPROCESSING", "ESPNet", "META_VERSION",
    "FeatureModel", "ResNet18", "RunMeta", "SegmentationModel", "WideResNet", "build_model", "file_sha256",
    "find_head", "load_feature_model", "load_model", "read_checkpoint", "read_meta", "read_state_dict",
    "save_atomic", "save_checkpoint", "TRAIN_PARTS", "resolve_train_part", "trusted_archs", "unwrap_model",
    "weights_hash",
]
