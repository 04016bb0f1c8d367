"""dare: a plugin-based post-training platform for diffusion language models."""
from dare.hookspecs import hookimpl
from dare.checkpoint import load_model, load_tokenizer, save_model
from dare.generation import generate
from dare.protocol import GenerationOutput, ModelOutput

__version__ = "0.1.0"

__all__ = [
    "hookimpl", "load_model", "load_tokenizer", "save_model", "generate",
    "GenerationOutput", "ModelOutput", "__version__",
]
