"""brownout-serve: SLO-aware serving of Mixture-of-Experts LLMs with brownout routing.

`from brownout import LLM, SamplingParams` loads the engine lazily, so importing the package
(or its HTTP layer) does not import torch.
"""

from brownout.types import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":  # imported by name so that `import brownout` stays light
        import importlib

        return importlib.import_module("brownout.engine.llm").LLM
    raise AttributeError(name)
