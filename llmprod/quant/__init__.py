"""Weight quantization: int8 linear layers for the Engine.

One module per part (docs/quantization.md describes the whole):

- :mod:`~llmprod.quant.scheme`: per-output-channel symmetric int8, and the
  float32 reference matmul;
- :mod:`~llmprod.quant.weight_only`: :class:`WeightOnlyInt8Linear`, the
  ``"int8-wo"`` runtime layer around ``aten._weight_int8pack_mm``;
- :mod:`~llmprod.quant.bnb_linear`: the ``"int8-bnb"`` runtime layer
  (bitsandbytes ``Linear8bitLt``);
- :mod:`~llmprod.quant.runtime`: :func:`resolve_method`, which path runs here;
- :mod:`~llmprod.quant.convert`: :func:`quantize_model` and its two explicit
  steps, :func:`create_quantized_state_dict` and :func:`convert_for_runtime`;
- :mod:`~llmprod.quant.checkpoint`: :func:`save_quantized` and
  :func:`load_quantized`, llmprod's own int8 files;
- :mod:`~llmprod.quant.bnb`: loading a transformers-saved bitsandbytes int8
  checkpoint (:func:`load_bnb_int8_model`);
- :mod:`~llmprod.quant.errors`: :class:`Int8UnavailableError`,
  :class:`QuantizedCheckpointError`.

:mod:`llmprod.quant.int8` gathers the same names as this package, for
``from llmprod.quant import int8`` callers.
"""

from llmprod.quant.bnb import SOURCE as BNB_CHECKPOINT_SOURCE
from llmprod.quant.bnb import is_bnb_int8_checkpoint, load_bnb_int8_model
from llmprod.quant.checkpoint import (
    FORMAT_NAME,
    FORMAT_VERSION,
    load_quantized,
    read_quantized_metadata,
    save_quantized,
)
from llmprod.quant.convert import (
    DEFAULT_SKIP,
    convert_for_runtime,
    create_quantized_state_dict,
    linear_weight_bytes,
    quantize_model,
)
from llmprod.quant.errors import Int8UnavailableError, QuantizedCheckpointError
from llmprod.quant.runtime import resolve_method
from llmprod.quant.scheme import (
    dequantize_per_channel,
    int8_linear_ref,
    quantize_per_channel,
)
from llmprod.quant.weight_only import WeightOnlyInt8Linear, is_int8pack_available

__all__ = [
    "BNB_CHECKPOINT_SOURCE",
    "DEFAULT_SKIP",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Int8UnavailableError",
    "QuantizedCheckpointError",
    "WeightOnlyInt8Linear",
    "convert_for_runtime",
    "create_quantized_state_dict",
    "dequantize_per_channel",
    "int8_linear_ref",
    "is_bnb_int8_checkpoint",
    "is_int8pack_available",
    "linear_weight_bytes",
    "load_bnb_int8_model",
    "load_quantized",
    "quantize_model",
    "quantize_per_channel",
    "read_quantized_metadata",
    "resolve_method",
    "save_quantized",
]
