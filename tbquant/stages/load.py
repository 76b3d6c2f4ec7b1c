"""Load stage: the checkpoint, its tokenizer and the data; the teacher is the loaded model.

Sources, tried in this order:

- a `.gguf` file: transformers dequantizes it to float on load;
- a local directory in `save_pretrained` layout;
- a hub id: resolved by huggingface_hub's cache (with `HF_HUB_OFFLINE=1`, only the cache).

Safety: safetensors weights are preferred. `.bin` files are read with
`torch.load(weights_only=True)`, which accepts tensors and plain containers and rejects any
other pickled object. A checkpoint's own Python code runs only with `trust_remote_code`.
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import socket
import struct
from pathlib import Path
from urllib.parse import urlsplit

import huggingface_hub
import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from tbquant.card_facts import public_name, read_base_model_facts
from tbquant.data import TokenizedData, load_examples
from tbquant.errors import ModelLoadError
from tbquant.nn.attention import set_attention_implementation
from tbquant.pipeline.registry import register_stage
from tbquant.pipeline.settings import Task
from tbquant.pipeline.state import PipelineState

logger = logging.getLogger(__name__)

# Exceptions raised by reading a missing, truncated or corrupt checkpoint. The GGUF reader
# raises struct.error and EOFError on truncated files.
_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, struct.error)

# Seconds to wait for a TCP connection to the hub before reporting it unreachable.
HUB_CONNECT_TIMEOUT = 5.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")

AUTO_CLASSES = {
    Task.CAUSAL_LM: AutoModelForCausalLM,
    Task.SEQ2SEQ_LM: AutoModelForSeq2SeqLM,
}


def detect_task(config) -> Task:
    """Return the task of a checkpoint from its config."""
    if getattr(config, "is_encoder_decoder", False):
        return Task.SEQ2SEQ_LM
    architectures = getattr(config, "architectures", None) or []
    if any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures):
        return Task.CAUSAL_LM
    if architectures:
        return Task.ENCODER
    # No architecture recorded: decoder-only families are causal, BERT-like ones encoders.
    is_causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return Task.CAUSAL_LM if is_causal and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES else Task.ENCODER


def auto_class(task: Task, config):
    """Return the transformers Auto class that builds a model of `task` with its head."""
    if task == Task.ENCODER:
        architectures = getattr(config, "architectures", None) or []
        return AutoModelForMaskedLM if any(name.endswith("ForMaskedLM") for name in architectures) else AutoModel
    return AUTO_CLASSES[task]


def resolve_source(model: str) -> tuple[str, dict]:
    """Return the `from_pretrained` location and extra arguments for a model argument.

    Raises:
        ModelLoadError: if a path-like argument does not exist.
    """
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} not found: check the path")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path {path} is a file: pass a save_pretrained directory or a .gguf file")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {path} has no config.json: pass a save_pretrained directory")
        return str(path), {}
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
    if looks_like_path:
        raise ModelLoadError(f"model path {model} not found: check the path, or pass a hub id such as facebook/bart-base")
    return model, {}


def _uncached_message(model: str, reason: str) -> str:
    return (
        f"model {model!r} is not in the local Hugging Face cache and {reason}: "
        "download it on a connected machine first (hf download), or pass a local directory or .gguf file"
    )


def check_hub_reachable(model: str, revision: str | None = None) -> None:
    """Fail fast when the hub id `model` is not cached and the hub does not accept connections.

    Without this check, huggingface_hub retries the connection for about half a minute before
    transformers reports the model missing. The check is skipped in offline mode (transformers
    then reads the cache only), for cached models, and when a proxy is configured, because a
    direct connection does not test the route through a proxy.

    Raises:
        ModelLoadError: if the hub host does not accept a TCP connection within
            `HUB_CONNECT_TIMEOUT` seconds.
    """
    if huggingface_hub.constants.HF_HUB_OFFLINE or any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return
    try:
        cached = huggingface_hub.try_to_load_from_cache(model, "config.json", revision=revision)
    except ValueError:  # not a valid repository id: transformers reports it
        return
    if isinstance(cached, str):
        return

    endpoint = urlsplit(huggingface_hub.constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_CONNECT_TIMEOUT).close()
    except OSError:
        raise ModelLoadError(_uncached_message(model, f"the hub at {huggingface_hub.constants.ENDPOINT} cannot be reached")) from None


def _load_error(model: str, error: Exception) -> ModelLoadError:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, pickle.UnpicklingError):
        return ModelLoadError(
            f"rejected the weights of {model!r}: the .bin checkpoint contains pickled objects other than tensors, "
            "which tbquant does not execute; convert it to safetensors with code you trust"
        )
    if "contains custom code" in text:
        return ModelLoadError(
            f"model {model!r} needs its own Python code to load (auto_map in its config.json), which runs only "
            "with --trust-remote-code: pass it if you trust the code of this model"
        )
    if model.lower().endswith(".gguf") and isinstance(error, (struct.error, EOFError)):
        # The GGUF reader runs past the end of the file and reports only buffer offsets.
        return ModelLoadError(f"GGUF file {model} is truncated or corrupt: download or convert it again")
    if isinstance(error, SafetensorError) or "deserializing header" in text:
        return ModelLoadError(f"the safetensors weights of {model!r} are truncated or corrupt ({text}): download or save the model again")
    local = Path(model).expanduser().exists()
    if local and "is not a valid JSON file" in text:
        return ModelLoadError(f"{Path(model) / 'config.json'} of model {model!r} is not valid JSON: the model directory is corrupt, save it again")
    if not local and isinstance(error, OSError) and ("connect" in text.lower() or "offline" in text.lower() or "cache" in text.lower() or "not a valid" in text.lower() or "does not appear" in text.lower()):
        return ModelLoadError(_uncached_message(model, "the hub cannot be reached"))
    return ModelLoadError(f"cannot load model {model!r}: {text}")


def load_model_and_tokenizer(model: str, trust_remote_code: bool = False, revision: str | None = None):
    """Load a full-precision model, its tokenizer and its task from any supported source."""
    location, extra = resolve_source(model)
    if location == model and not Path(model).expanduser().exists():
        check_hub_reachable(model, revision)
    if revision:
        extra["revision"] = revision
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code, **extra)
    except _READ_ERRORS as error:
        raise _load_error(model, error) from None
    task = detect_task(config)
    try:
        loaded = auto_class(task, config).from_pretrained(
            location, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=None, weights_only=True, **extra
        )
    except (*_READ_ERRORS, RuntimeError, SafetensorError, pickle.UnpicklingError) as error:
        raise _load_error(model, error) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, **extra)
    except _READ_ERRORS as error:
        raise ModelLoadError(f"cannot load the tokenizer of {model!r}: {str(error).strip().splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return loaded, tokenizer, task


@register_stage
class LoadStage:
    """Load the model (which becomes the frozen teacher and the student's starting point),
    the tokenizer and the training and validation data."""

    name = "load"

    def run(self, state: PipelineState) -> None:
        settings = state.settings
        torch.manual_seed(settings.distill.seed)

        train_examples, eval_examples, description = load_examples(settings.data, settings.eval_data)
        model, tokenizer, task = load_model_and_tokenizer(settings.model, settings.trust_remote_code, settings.revision)
        parameters = sum(parameter.numel() for parameter in model.parameters())
        logger.info("Loaded %s (%s, %s, %.1fM parameters)", settings.model, type(model).__name__, task.value, parameters / 1e6)

        max_length = settings.distill.max_length
        state.train_data = TokenizedData(train_examples, tokenizer, task, max_length)
        state.eval_data = TokenizedData(eval_examples, tokenizer, task, max_length) if eval_examples else None
        logger.info(
            "Data: %s, %d training and %d validation sequences of up to %d tokens",
            description,
            len(state.train_data),
            len(state.eval_data) if state.eval_data else 0,
            max_length,
        )

        model.eval()
        set_attention_implementation(model)
        state.teacher = model.requires_grad_(False)
        state.model = copy.deepcopy(model).requires_grad_(True)
        state.tokenizer = tokenizer
        state.task = task
        state.info.update(
            {
                "base_model": public_name(settings.model),
                "architecture": type(model).__name__,
                "model_type": model.config.model_type,
                "parameters": parameters,
                "data": description,
                "train_sequences": len(state.train_data),
                **read_base_model_facts(settings.model, settings.revision),
            }
        )
