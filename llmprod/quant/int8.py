"""int8 weight quantization in one namespace: ``from llmprod.quant import int8``.

The scheme is per-output-channel symmetric int8 (:mod:`llmprod.quant.scheme`). Each
part lives in its own module, and this one gathers their public names, as
:mod:`llmprod.quant` does:

- :mod:`~llmprod.quant.scheme`: :func:`quantize_per_channel`,
  :func:`dequantize_per_channel`, :func:`int8_linear_ref`;
- :mod:`~llmprod.quant.weight_only`: :class:`WeightOnlyInt8Linear` (``"int8-wo"``)
  and :func:`is_int8pack_available`;
- :mod:`~llmprod.quant.bnb_linear`: bitsandbytes ``Linear8bitLt`` (``"int8-bnb"``);
- :mod:`~llmprod.quant.runtime`: :func:`resolve_method`, which path runs here;
- :mod:`~llmprod.quant.convert`: :func:`quantize_model`,
  :func:`create_quantized_state_dict`, :func:`convert_for_runtime`,
  :func:`linear_weight_bytes`, :data:`DEFAULT_SKIP`;
- :mod:`~llmprod.quant.checkpoint`: :func:`save_quantized`, :func:`load_quantized`,
  :func:`read_quantized_metadata`;
- :mod:`~llmprod.quant.errors`: :class:`Int8UnavailableError`,
  :class:`QuantizedCheckpointError`.
"""

from __future__ import annotations

from llmprod.quant.checkpoint import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SCHEME,
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
from llmprod.quant.runtime import METHODS, resolve_method
from llmprod.quant.scheme import (
    dequantize_per_channel,
    int8_linear_ref,
    quantize_per_channel,
)
from llmprod.quant.weight_only import WeightOnlyInt8Linear, is_int8pack_available

__all__ = [
    "DEFAULT_SKIP",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "METHODS",
    "SCHEME",
    "Int8UnavailableError",
    "QuantizedCheckpointError",
    "WeightOnlyInt8Linear",
    "convert_for_runtime",
    "create_quantized_state_dict",
    "dequantize_per_channel",
    "int8_linear_ref",
    "is_int8pack_available",
    "linear_weight_bytes",
    "load_quantized",
    "quantize_model",
    "quantize_per_channel",
    "read_quantized_metadata",
    "resolve_method",
    "save_quantized",
]
