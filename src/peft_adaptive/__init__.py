"""Adaptive-rank LoRA for Hugging Face PEFT.

Importing this package registers ``AdaptiveLoraConfig``/``AdaptiveLoraModel`` with PEFT, so that
``peft.get_peft_model(model, AdaptiveLoraConfig(...))`` works.
"""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import register_peft_method

from .adapter_files import AdapterError
from .adapter_summary import AdapterSummary, inspect_adapter
from .allocation import Allocation, allocate_ranks
from .calibration import calibrate_adaptive_lora
from .callback import AdaptiveLoraCallback
from .checkpoints import last_complete_checkpoint
from .config import ADAPTIVE_PEFT_TYPE, AdaptiveLoraConfig
from .export import EXPORT_FORMATS, export_adapter
from .model import AdaptiveLoraModel, AllocationReport
from .plotting import plot_ranks
from .resize import resize_factors, resize_lora_layer

__version__ = "0.1.0"

# register_peft_method refuses a second registration (KeyError), e.g. after importlib.reload.
if ADAPTIVE_PEFT_TYPE not in PEFT_TYPE_TO_CONFIG_MAPPING:
    register_peft_method(
        name="adaptive_lora", config_cls=AdaptiveLoraConfig, model_cls=AdaptiveLoraModel, prefix="lora_"
    )

__all__ = [
    "ADAPTIVE_PEFT_TYPE",
    "EXPORT_FORMATS",
    "AdapterError",
    "AdapterSummary",
    "Allocation",
    "AdaptiveLoraCallback",
    "AdaptiveLoraConfig",
    "AdaptiveLoraModel",
    "AllocationReport",
    "allocate_ranks",
    "calibrate_adaptive_lora",
    "export_adapter",
    "inspect_adapter",
    "last_complete_checkpoint",
    "plot_ranks",
    "resize_factors",
    "resize_lora_layer",
]
