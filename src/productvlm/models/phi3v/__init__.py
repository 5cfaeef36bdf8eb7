"""Native Phi-3-Vision / Phi-3.5-Vision for transformers (no trust_remote_code).

Importing this package registers the classes with transformers' Auto* factories for
`model_type: phi3_v`.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoProcessor,
)

from productvlm.models.phi3v.configuration_phi3v import Phi3VConfig
from productvlm.models.phi3v.image_processing_phi3v import Phi3VImageProcessor
from productvlm.models.phi3v.modeling_phi3v import Phi3VForCausalLM, Phi3VModel
from productvlm.models.phi3v.processing_phi3v import Phi3VProcessor

AutoConfig.register("phi3_v", Phi3VConfig, exist_ok=True)
AutoModel.register(Phi3VConfig, Phi3VModel, exist_ok=True)
AutoModelForCausalLM.register(Phi3VConfig, Phi3VForCausalLM, exist_ok=True)
AutoImageProcessor.register(Phi3VConfig, image_processor_classes={"pil": Phi3VImageProcessor}, exist_ok=True)
AutoProcessor.register(Phi3VConfig, Phi3VProcessor, exist_ok=True)

__all__ = ["Phi3VConfig", "Phi3VForCausalLM", "Phi3VImageProcessor", "Phi3VModel", "Phi3VProcessor"]
