"""kvd: a KV-cache-centric LLM inference engine and daemon.

`from kvd import LLM, SamplingParams` is the offline API; `kvd.client` talks to a
running daemon. LLM is imported lazily so that light users (the client, the CLI's
help) do not pay for torch and transformers.
"""

from kvd.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":
        from kvd.llm import LLM

        return LLM
    if name == "RequestOutput":
        from kvd.outputs import RequestOutput

        return RequestOutput
    raise AttributeError(f"module 'kvd' has no attribute {name!r}")
