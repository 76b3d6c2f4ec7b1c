"""transformers integration: `AutoModel*.from_pretrained(export_dir)` loads a tbquant export.

`import tbquant` registers `TbquantConfig` and `TbquantHfQuantizer` for the quantization method
"tbquant" with transformers (`register_quantization_config`, `register_quantizer`). Loading then
follows the lifecycle of transformers' in-tree quantizers:

1. `update_attn_implementation`: turn the export's load guard off (see below);
2. `_process_model_before_weight_loading`: on the meta-device model, replace the quantized
   modules with empty packed ones (`build_packed_skeleton`), so the full-precision weights of
   quantized layers are never allocated. Then check the checkpoint's tensor names, shapes and
   dtypes against them, so a corrupt export fails before any tensor is read;
3. transformers loads the tensors into the packed modules;
4. `_process_model_after_weight_loading`: move the codes to the in-memory layout.

Load guard: without tbquant, transformers only warns about an unknown `quant_method` and would
build a full-precision model with randomly initialised quantized layers. The export's
`config.json` therefore names its weights file in `transformers_weights` with a value that is
not a `.safetensors` name (`LOAD_GUARD`). transformers 5.25 rejects such a value with a
`ValueError` that quotes it, so the user reads the instruction to install tbquant. With tbquant
imported, step 1 sets `transformers_weights` to the real file name.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from tbquant.config import QuantizationConfig
from tbquant.errors import ExportError
from tbquant.nn.convert import build_packed_skeleton
from tbquant.nn.embedding import PackedEmbedding
from tbquant.nn.linear import PackedLinear
from tbquant.quantizers.activation import ActivationQuantizer
from tbquant.serialization import FORMAT_VERSION, LOAD_GUARD, QUANT_METHOD, WEIGHTS_NAME

logger = logging.getLogger(__name__)


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
        return torch.float32 if dtype is None else dtype

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
        build_packed_skeleton(model, self.quantization_config.quantization)
        # Ties whose ends are no longer both parameters (packed modules, an untied head) are
        # dropped, so that transformers does not tie them again after loading.
        parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        model.all_tied_weights_keys = {
            target: source for target, source in model.all_tied_weights_keys.items() if target in parameters and source in parameters
        }
        _keep_shared_buffers(model, getattr(self.quantization_config, "tied", {}), parameters)
        if checkpoint_files:
            check_checkpoint(model, checkpoint_files, getattr(self.quantization_config, "tied", {}))

    def _process_model_after_weight_loading(self, model, **kwargs):
        for module in model.modules():
            if isinstance(module, PackedLinear):
                module.prepare_for_inference()
            if isinstance(module, (PackedLinear, PackedEmbedding, ActivationQuantizer)):
                # Tensors loaded in their stored dtype (scales, learned activation scales, flags)
                # are views of the memory-mapped file, which stays mapped while any of them lives.
                # NOTE: SmolLM2's export file was still mapped after this, so another reference
                # to it remains; it costs up to the file size in resident memory.
                for name, tensor in list(module._buffers.items()) + list(module._parameters.items()):
                    if tensor is not None and tensor.device.type == "cpu":
                        tensor.data = tensor.data.clone()
        return model

    def is_serializable(self) -> bool:
        # NOTE: saving goes through `tbquant compress`; `save_pretrained` of a loaded export is
        # not supported because transformers would drop the load guard from config.json.
        return False

    @property
    def is_trainable(self) -> bool:
        return False


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


def check_checkpoint(model: torch.nn.Module, checkpoint_files: list[str], tied: dict[str, str]) -> None:
    """Compare the checkpoint's tensor names, shapes and dtypes with the packed model's.

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


def register() -> None:
    """Register the config and quantizer with transformers (once; `import tbquant` calls it)."""
    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return
    register_quantization_config(QUANT_METHOD)(TbquantConfig)
    register_quantizer(QUANT_METHOD)(TbquantHfQuantizer)
