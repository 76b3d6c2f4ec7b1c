"""transformers integration: `AutoModel*.from_pretrained(export_dir)` loads a tbquant export.

`import tbquant` registers `TbquantConfig` and `TbquantHfQuantizer` for the quantization method
"tbquant" with transformers (`register_quantization_config`, `register_quantizer`). Loading then
follows the lifecycle of transformers' in-tree quantizers:

1. `update_attn_implementation`: turn the export's load guard off (see below);
2. `_process_model_before_weight_loading`: on the meta-device model, replace the quantized
   modules with empty packed ones (`build_packed_skeleton`), so the full-precision weights of
   quantized layers are never allocated. Then check the weight files against the export's
   `checksums.sha256` (where it has one) and the checkpoint's tensor names, shapes and dtypes
   against the packed modules, so a corrupt export fails before any tensor is read;
3. transformers loads the tensors into the packed modules;
4. `_process_model_after_weight_loading`: move the codes to the in-memory layout, and keep large
   16-bit full-precision weights (embeddings, head) in their stored dtype (`tbquant.nn.half`).

Load guard: without tbquant, transformers only warns about an unknown `quant_method` and would
build a full-precision model with randomly initialised quantized layers. The export's
`config.json` therefore names its weights file in `transformers_weights` with a value that is
not a `.safetensors` name (`LOAD_GUARD`). transformers 5.25 rejects such a value with a
`ValueError` that quotes it, so the user reads the instruction to install tbquant. With tbquant
imported, step 1 sets `transformers_weights` to the real file name.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from tbquant import packing
from tbquant.config import QuantizationConfig
from tbquant.errors import ExportError
from tbquant.integrity import CHECKSUMS_NAME, verify_export
from tbquant.nn.convert import build_packed_skeleton
from tbquant.nn.half import HALF_DTYPES, eligible_weights, keep_stored_dtype
from tbquant.nn.linear import PackedLinear
from tbquant.serialization import FORMAT_VERSION, LOAD_GUARD, QUANT_METHOD, WEIGHTS_NAME

logger = logging.getLogger(__name__)

# Whether loading checks the weights against the export's checksums.sha256 (load_quantized does it
# itself, or skips it on request, and turns this off around its from_pretrained call).
_VERIFY_CHECKSUMS = contextvars.ContextVar("tbquant_verify_checksums", default=True)


@contextlib.contextmanager
def checksums_checked_by_caller():
    """Skip the checksum verification of `from_pretrained` inside this context."""
    token = _VERIFY_CHECKSUMS.set(False)
    try:
        yield
    finally:
        _VERIFY_CHECKSUMS.reset(token)


# Dtypes that transformers loads without conversion (as views of the file) into a float32 model.
_STORED_DTYPES = (torch.uint8, torch.int32, torch.bool, torch.float16, torch.bfloat16)


class TbquantConfig(QuantizationConfigMixin):
    """The `quantization_config` of a tbquant export, as transformers reads it.

    It keeps every field of the export's `quantization_config` (`tbquant.serialization` lists
    them) and validates the quantization settings with `QuantizationConfig`.

    Raises:
        ValueError: if a field has an invalid value or the export format is newer than this
            version of tbquant reads.
    """

    def __init__(self, **fields: Any) -> None:
        fields.setdefault("quant_method", QUANT_METHOD)
        if fields["quant_method"] != QUANT_METHOD:
            raise ValueError(f"invalid quant_method {fields['quant_method']!r}: expected {QUANT_METHOD!r}")
        if fields.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"export format {fields['format_version']} is newer than this tbquant reads ({FORMAT_VERSION}): upgrade tbquant")
        self.__dict__.update(fields)
        self.quantization = QuantizationConfig.from_dict(fields)

    def to_dict(self) -> dict[str, Any]:
        fields = dict(self.__dict__)
        fields.pop("quantization")
        return fields


class TbquantHfQuantizer(HfQuantizer):
    """Loads tbquant exports (pre-quantized only) with packed modules in place of quantized layers."""

    requires_calibration = True  # an export is quantized by tbquant compress, never at load time
    required_packages = ["tbquant"]
    quantization_config: TbquantConfig

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        # The student computed in float32 with full-precision tensors rounded to fp_dtype; loading
        # in float32 reproduces its outputs. Another dtype can still be requested.
        self.compute_dtype = torch.float32 if dtype is None else dtype
        return self.compute_dtype

    def update_attn_implementation(self, config):
        # This is the only hook that receives the config before transformers resolves the weights
        # file and builds the model. It changes two fields that concern loading, not attention.
        if getattr(config, "transformers_weights", None) == LOAD_GUARD:
            config.transformers_weights = WEIGHTS_NAME
        if getattr(self.quantization_config, "untied", False):
            # The export stores tie_word_embeddings=False after untying a tied head from a
            # quantized embedding. Building the model tied keeps the embeddings that stay tied (a
            # seq2seq model's encoder and decoder tables) shared. The skeleton then unties the
            # head again, as compression did.
            config.tie_word_embeddings = True
        return config

    def _process_model_before_weight_loading(self, model, checkpoint_files: list[str] | None = None, **kwargs) -> None:
        # transformers ties embeddings after loading (and `tie_weights` skips meta tensors). The
        # skeleton must see them tied already, as compression did, to replace every module that
        # shares the token embedding.
        for target, source in model.get_expanded_tied_weights_keys(all_submodels=True).items():
            module_name, _, attribute = target.rpartition(".")
            setattr(model.get_submodule(module_name), attribute, model.get_parameter(source))
        # The packed modules expect the codes in the layout of the export's format (format 1 padded
        # every row of ternary-compact codes, format 2 writes one stream).
        format_version = getattr(self.quantization_config, "format_version", packing.ROW_PADDED_FORMAT_VERSION)
        build_packed_skeleton(model, self.quantization_config.quantization, format_version)
        # Ties whose ends are no longer both parameters (packed modules, an untied head) are
        # dropped, so that transformers does not tie them again after loading.
        parameters = _drop_ties_to_non_parameters(model)
        _keep_shared_buffers(model, getattr(self.quantization_config, "tied", {}), parameters)
        if checkpoint_files:
            directory = Path(checkpoint_files[0]).parent
            if _VERIFY_CHECKSUMS.get() and (directory / CHECKSUMS_NAME).is_file():
                verify_export(directory)
            headers = check_checkpoint(model, checkpoint_files, getattr(self.quantization_config, "tied", {}))
            _load_large_weights_in_stored_dtype(model, headers, getattr(self, "compute_dtype", torch.float32))

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, module in model.named_modules():
            if isinstance(module, PackedLinear):
                try:
                    module.prepare_for_inference()
                except ValueError as error:  # codes that no packing produces, such as a byte above 242
                    raise ExportError(f"tensor {name}.weight_packed of the export is invalid ({error}): the export is corrupt, export it again") from None
        kept_16bit = keep_stored_dtype(model, getattr(self, "compute_dtype", torch.float32))
        # Tensors loaded in their stored dtype (packed codes, scales, kept 16-bit weights) are views
        # of the memory-mapped file, which stays mapped, with every page read so far resident,
        # while any of them lives. Copying them lets the file be unmapped.
        copies: dict[tuple, torch.Tensor] = {}
        for module in model.modules():
            for tensors in (module._buffers, module._parameters):
                for name, tensor in tensors.items():
                    if tensor is None or tensor.device.type != "cpu" or tensor.dtype not in _STORED_DTYPES:
                        continue
                    if name in module._non_persistent_buffers_set:
                        continue  # computed after loading (the planar codes), not read from the file
                    # Tensors that share memory (a tied head) share the copy.
                    key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), isinstance(tensor, torch.nn.Parameter))
                    if key not in copies:
                        copy = tensor.detach().clone()
                        copies[key] = torch.nn.Parameter(copy, requires_grad=False) if key[3] else copy
                    tensors[name] = copies[key]
        del copies
        _release_free_memory()
        if kept_16bit:
            logger.debug("kept the stored 16-bit weights of %s", ", ".join(kept_16bit))
            # The kept weights are buffers now: later `tie_weights` calls must not tie them again.
            _drop_ties_to_non_parameters(model)
        return model

    def is_serializable(self) -> bool:
        # NOTE: saving goes through `tbquant compress`; `save_pretrained` of a loaded export is
        # not supported because transformers would drop the load guard from config.json and write
        # no checksums. transformers calls this only from save_pretrained, before it raises.
        logger.warning(
            "save_pretrained cannot write a loaded tbquant export: copy the export directory instead, "
            "publish it with `tbquant push-to-hub`, or write a new one with `tbquant compress`"
        )
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def _drop_ties_to_non_parameters(model) -> set[str]:
    """Remove the tied-weight entries whose ends are not both parameters; return the parameter names."""
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    model.all_tied_weights_keys = {
        target: source for target, source in model.all_tied_weights_keys.items() if target in parameters and source in parameters
    }
    return parameters


def _release_free_memory() -> None:
    """Return the heap memory freed while loading to the operating system (glibc's `malloc_trim`).

    Loading frees large temporaries (disk-layout codes, file views) that glibc otherwise keeps for
    reuse, which would count as resident memory of the model for as long as the process lives.
    """
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


def _keep_shared_buffers(model, tied: dict[str, str], parameters: set[str]) -> None:
    """Stop transformers from replacing the export's buffer aliases with empty tensors.

    A packed module shared under several names (a seq2seq model's quantized token embedding) is
    stored once, so its other names are missing from the checkpoint. transformers 5.25 gives
    missing tensors empty values after loading, which would overwrite the shared module's loaded
    buffers, so those names are removed from the missing keys it moves.
    """
    names = set(model.state_dict())
    aliases = {alias for alias, source in tied.items() if alias in names and source in names and alias not in parameters}
    if not aliases:
        return
    move_missing_keys = model._move_missing_keys_from_meta_to_device

    def move_missing_keys_except_aliases(missing_keys, *args, **kwargs):
        return move_missing_keys(set(missing_keys) - aliases, *args, **kwargs)

    model._move_missing_keys_from_meta_to_device = move_missing_keys_except_aliases


def _load_large_weights_in_stored_dtype(model: torch.nn.Module, headers: dict[str, tuple[tuple[int, ...], str]], compute_dtype: torch.dtype) -> None:
    """Give large 16-bit embedding and linear weights a meta parameter of their stored dtype.

    transformers loads a tensor in its parameter's dtype when that differs from the requested one.
    These weights are therefore read without an upcast, and `keep_stored_dtype` computes with them.
    """
    if compute_dtype in HALF_DTYPES:
        return
    stored = {"F16": torch.float16, "BF16": torch.bfloat16}
    eligible = eligible_weights(model)
    replaced: dict[int, torch.nn.Parameter] = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        header = headers.get(f"{name}.weight" if name else "weight")
        if weight is None or id(weight) not in eligible or header is None or header[1] not in stored:
            continue
        if id(weight) not in replaced:
            replaced[id(weight)] = torch.nn.Parameter(torch.empty_like(weight, dtype=stored[header[1]], device="meta"), requires_grad=False)
    if not replaced:
        return
    # Modules sharing a weight (a tied head) share the replacement.
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is not None and id(weight) in replaced:
            module._parameters["weight"] = replaced[id(weight)]


def check_checkpoint(
    model: torch.nn.Module, checkpoint_files: list[str], tied: dict[str, str]
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Compare the checkpoint's tensor names, shapes and dtypes with the packed model's.

    Returns the shape and safetensors dtype of every tensor, by name.

    Raises:
        ExportError: if a file is unreadable or truncated, a tensor is missing or unexpected, or
            a packed tensor has the wrong shape or dtype.
    """
    headers: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in checkpoint_files:
        try:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    tensor = handle.get_slice(name)
                    headers[name] = (tuple(tensor.get_shape()), tensor.get_dtype())
        except (SafetensorError, OSError, ValueError) as error:
            raise ExportError(f"{file} is not a readable safetensors file ({str(error).splitlines()[0]}): the export is corrupt, export it again") from None

    for alias, source in tied.items():
        if source in headers:
            headers[alias] = headers[source]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(headers))
    unexpected = sorted(set(headers) - set(expected))
    if missing:
        raise ExportError(f"{checkpoint_files[0]} does not match its config (missing tensor {missing[0]}): the export is corrupt, export it again")
    if unexpected:
        raise ExportError(f"{checkpoint_files[0]} does not match its config (unexpected tensor {unexpected[0]}): the export is corrupt, export it again")
    for name, tensor in expected.items():
        shape, _ = headers[name]
        if shape != tuple(tensor.shape):
            raise ExportError(
                f"{checkpoint_files[0]} does not match its config (tensor {name} has shape {list(shape)}, "
                f"expected {list(tensor.shape)}): the export is corrupt, export it again"
            )
        if tensor.dtype == torch.uint8 and headers[name][1] != "U8":
            raise ExportError(f"{checkpoint_files[0]} does not match its config (tensor {name} has dtype {headers[name][1]}, expected U8): the export is corrupt")
    return headers


def register() -> None:
    """Register the config and quantizer with transformers (once; `import tbquant` calls it)."""
    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return
    register_quantization_config(QUANT_METHOD)(TbquantConfig)
    register_quantizer(QUANT_METHOD)(TbquantHfQuantizer)
