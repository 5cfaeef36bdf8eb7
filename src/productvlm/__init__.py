"""productvlm: fine-tune Phi-3-Vision / Phi-3.5-Vision to write catalog entries from product photos.

Importing the package registers the native Phi-3-V classes with transformers' Auto* factories,
so `AutoConfig`, `AutoModelForCausalLM` and `AutoProcessor` load `model_type: phi3_v` folders
without `trust_remote_code`.
"""

from productvlm.models.phi3v import (  # noqa: F401  (import registers the Auto classes)
    Phi3VConfig,
    Phi3VForCausalLM,
    Phi3VImageProcessor,
    Phi3VProcessor,
)

__version__ = "0.1.0"
__all__ = ["Phi3VConfig", "Phi3VForCausalLM", "Phi3VImageProcessor", "Phi3VProcessor", "__version__"]
