"""Structured outputs: JSON Schema, regex, choice and Lark grammars, valid by
construction (token masks from llguidance, the ``llmprod[structured]`` extra).

>>> from llmprod.structured import StructuredOutputs
>>> StructuredOutputs(regex=r"\\d{3}").kind
'regex'
"""

from llmprod.structured.params import StructuredOutputs

__all__ = ["StructuredOutputs"]
