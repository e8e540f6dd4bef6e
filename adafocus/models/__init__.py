"""AdaFocusV2 model core: plain nn.Modules, no Lightning."""

from adafocus.models.adafocus import AdaFocusOutput, AdaFocusV2, GlanceOutput, StepOutput, StreamState
from adafocus.models.backbones import BACKBONES, build_trunk, get_backbone
from adafocus.models.classifier import RecurrentPoolingClassifier
from adafocus.models.glance import GlanceNetwork
from adafocus.models.official import from_official_state_dict, to_official_state_dict
from adafocus.models.patch import PatchExtractor
from adafocus.models.policy import POLICIES, CenterPolicy, PolicyNetwork, RandomPolicy

__all__ = [
    "BACKBONES", "POLICIES", "AdaFocusOutput", "AdaFocusV2", "CenterPolicy", "GlanceNetwork", "GlanceOutput",
    "PatchExtractor", "PolicyNetwork", "RandomPolicy", "RecurrentPoolingClassifier", "StepOutput",
    "StreamState", "build_trunk",
    "from_official_state_dict", "get_backbone", "to_official_state_dict",
]  # fmt: skip
