"""From a model name to the parts an Engine is built from.

``load_model`` resolves a registered name, folder or GGUF file, builds the model
(native or generic path), loads or applies int8 weights, and loads the tokenizer.
Int8 is quantize-once: the quantized weights are saved in the model cache and
reloaded (with their scales) by later loads instead of quantizing again.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmprod.config import EngineConfig
from llmprod.errors import InvalidConfigError
from llmprod.layers.linear import (
    pack_onednn_linears,
    resolve_linear_backend,
    use_onednn_linears,
)
from llmprod.layers.screened_head import ScreenedGreedyHead, screened_head_for
from llmprod.models.loader import build_model, load_config, pick_dtype
from llmprod.models.registry import resolve_model

if TYPE_CHECKING:
    from llmprod.exec.parallel import TensorParallelGroup

logger = logging.getLogger("llmprod")


@dataclass(slots=True)
class LoadedModel:
    """A model ready to serve, and where its weights came from."""

    model: torch.nn.Module
    tokenizer: Any
    """A transformers tokenizer (``PreTrainedTokenizerBase``)."""
    hf_config: Any
    """The transformers ``PretrainedConfig`` of the model."""
    path: Path
    """The local transformers folder (after any fetch and conversion)."""
    quantization: str | None
    """The int8 method that runs, or None."""
    quantization_source: str | None
    """"quantized-at-load" (llmprod quantized, or reloaded its own saved copy) or
    "bitsandbytes-checkpoint"; None without quantization."""


def load_model(
    model: str | Path, config: EngineConfig, device: torch.device
) -> LoadedModel:
    """Resolve, build and (maybe) quantize a model; load its tokenizer."""
    from transformers import AutoTokenizer

    from llmprod import quant

    path = resolve_model(model)
    hf_config = load_config(path)
    dtype = pick_dtype(config.dtype, device)
    linear_backend(config, device, dtype)  # fail before loading the weights
    quantization: str | None = None
    source: str | None = None
    if quant.is_bnb_int8_checkpoint(hf_config):
        nn_model, quantization = quant.load_bnb_int8_model(
            hf_config, path, dtype, device, config.quantization
        )
        source = quant.BNB_CHECKPOINT_SOURCE
    elif config.quantization in ("int4", "gguf"):
        gguf_path = _gguf_for(path, config) if config.quantization == "gguf" else None
        nn_model, quantization = _build_int4(config, hf_config, path, dtype, device,
                                             gguf_path)  # fmt: skip
        source = "gguf" if gguf_path is not None else "quantized-at-load"
    else:
        nn_model = build_model(hf_config, path, dtype, device, config.model_impl)
        if config.quantization is not None:
            quantization = quantize_once(
                nn_model, config.quantization, path, config.quantization_skip
            )
            source = "quantized-at-load"
    tokenizer = AutoTokenizer.from_pretrained(path)
    return LoadedModel(nn_model, tokenizer, hf_config, path, quantization, source)


def start_tensor_parallel(
    model: str | Path, config: EngineConfig, device: torch.device
) -> TensorParallelGroup:
    """Check that the model splits ``tensor_parallel_size`` ways, then start
    the workers (they load their shards while this process loads its own)."""
    from llmprod.exec import parallel
    from llmprod.models.loader import choose_impl

    size = config.tensor_parallel_size
    path = resolve_model(model)
    hf_config = load_config(path)
    parallel.check_supported(choose_impl(hf_config, config.model_impl),
                             config.quantization)  # fmt: skip
    parallel.shard_plan(hf_config, size, 0)
    dtype = pick_dtype(config.dtype, device)
    spec = parallel.WorkerSpec(
        path=str(path),
        dtype=config.dtype,
        device=device.type,
        linear_backend=linear_backend(config, device, dtype),
        attention_backend=config.attention_backend,
        fused_ops=config.fused_ops,
        num_threads=config.num_threads or 1,
        timeout_s=parallel.DEFAULT_TIMEOUT_S,
    )
    return parallel.TensorParallelGroup(size, spec, device)


@dataclass(slots=True)
class SpeedUps:
    """What :func:`speed_up` did to a loaded model."""

    linear_backend: str
    """"onednn" or "torch": who computes the float32 and bfloat16 linear layers."""
    packed_linears: int
    """Linear layers whose weights oneDNN holds in its blocked layout."""
    greedy_head: ScreenedGreedyHead | None
    """Greedy screening of the lm_head product, or None where it is off."""


def speed_up(
    model: torch.nn.Module,
    config: EngineConfig,
    device: torch.device,
    dtype: torch.dtype,
) -> SpeedUps:
    """Swap in the faster CPU paths the config allows: oneDNN linear layers
    (weights packed in its blocked layout) and greedy screening."""
    backend = linear_backend(config, device, dtype)
    packed = 0
    if backend == "onednn":
        use_onednn_linears(model)
        # Not lm_head: screening and a tied embedding read its weight.
        lm_head: torch.nn.Module = model.lm_head  # type: ignore[assignment]
        packed = pack_onednn_linears(model, exclude=(lm_head,))
    try:
        head = screened_head_for(model, config.greedy_screening, device)
    except ValueError as exc:
        raise InvalidConfigError(str(exc), "greedy_screening") from exc
    return SpeedUps(backend, packed, head)


def linear_backend(
    config: EngineConfig, device: torch.device, dtype: torch.dtype
) -> str:
    """ "onednn" or "torch": who computes the float32 and bfloat16 linear layers."""
    try:
        return resolve_linear_backend(
            config.linear_backend, device, dtype, config.speculative is not None
        )
    except ValueError as exc:
        raise InvalidConfigError(str(exc), "linear_backend") from exc


def _gguf_for(path: Path, config: EngineConfig) -> Path:
    """The GGUF file whose Q4 weights ``quantization="gguf"`` runs; its tensor
    types are checked before the model is built."""
    from llmprod.quant.gguf import GGUFTypeError, check_gguf_types, gguf_file_of

    gguf_path = gguf_file_of(path)
    if gguf_path is None:
        raise InvalidConfigError(
            f"quantization='gguf' runs a GGUF file's own weights, and {str(path)!r} "
            f"did not come from a GGUF file that is still on disk; use "
            f"quantization='int4' to quantize it at load",
            "quantization",
        )
    try:
        check_gguf_types(gguf_path)
    except GGUFTypeError as exc:
        raise InvalidConfigError(str(exc), "quantization") from exc
    return gguf_path


def _build_int4(
    config: EngineConfig,
    hf_config: Any,
    path: Path,
    dtype: torch.dtype,
    device: torch.device,
    gguf_path: Path | None,
) -> tuple[torch.nn.Module, str]:
    """Build the model with int4 layers: the GGUF file's own Q4 codes (and Q8_0
    embedding), or quantized now. On the native path each layer is swapped as
    soon as its float32 weight is loaded, so the float32 model is never resident
    whole (peak RSS: docs/quantization.md)."""
    from llmprod.exec.memory import trim_heap
    from llmprod.quant.gguf import GGUFSwapper, GGUFTypeError
    from llmprod.quant.int4 import Int4Quantizer

    if device.type != "cpu":
        raise InvalidConfigError(
            f"quantization={config.quantization!r} runs on CPU; on CUDA use "
            f"quantization='int8'",
            "quantization",
        )
    t0 = time.perf_counter()
    swapper: GGUFSwapper | Int4Quantizer
    try:
        if gguf_path is not None:
            swapper = GGUFSwapper(gguf_path, hf_config, config.quantization_skip)
        else:
            swapper = Int4Quantizer(
                config.quantization_group_size, config.quantization_skip
            )
        calls = 0

        def on_loaded(model: torch.nn.Module, name: str) -> None:
            nonlocal calls
            swapper(model, name)
            calls += 1
            if calls % 4 == 0:  # the freed temporaries of the last swaps
                trim_heap()

        model = build_model(hf_config, path, dtype, device, config.model_impl,
                            on_loaded=on_loaded)  # fmt: skip
        n = swapper.finish(model)
        q8 = swapper.q8_modules if isinstance(swapper, GGUFSwapper) else []
    except (GGUFTypeError, ValueError) as exc:
        if isinstance(exc, InvalidConfigError):
            raise
        raise InvalidConfigError(str(exc), "quantization") from exc
    from llmprod.exec.memory import release_freed_memory

    release_freed_memory()  # the float32 weights the int4 layers replaced
    logger.info(
        "%s: %d linear layers in int4%s (%.2f s)",
        config.quantization,
        n,
        f", {' and '.join(q8)} in Q8_0" if q8 else "",
        time.perf_counter() - t0,
    )
    return model, str(config.quantization)


def quantize_once(
    model: torch.nn.Module, method: str, path: Path, skip: tuple[str, ...]
) -> str:
    """Quantize ``model`` in place, or reload the int8 weights an earlier load
    saved for the same weights, dtype, model path and skip list. Returns the
    method that runs."""
    from llmprod import quant
    from llmprod.models.fingerprint import model_fingerprint
    from llmprod.models.registry import cache_dir

    device = next(model.parameters()).device
    try:
        resolved = quant.resolve_method(method, device)
    except quant.Int8UnavailableError as exc:
        raise InvalidConfigError(str(exc), "quantization") from exc
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    source = model_fingerprint(path, dtype, None)
    # The two model paths hold the same weights under different module names.
    impl = "" if getattr(model, "impl", "native") == "native" else "-generic"
    if skip != quant.DEFAULT_SKIP:  # another set of int8 layers
        impl += "-skip" + hashlib.sha256(repr(sorted(skip)).encode()).hexdigest()[:8]
    saved = (
        cache_dir()
        / "quantized"
        / f"{path.name}-{dtype}{impl}-{source[:16]}.safetensors"
    )
    if saved.exists():
        try:
            ran = quant.load_quantized(model, saved, method=resolved, source=source)
            logger.info("int8 weights loaded from %s (%s)", saved, ran)
            return str(ran)
        except quant.QuantizedCheckpointError as exc:
            logger.warning("ignoring the saved int8 weights %s: %s", saved, exc)
    ran = quant.quantize_model(model, method=resolved, skip=skip)
    saved.parent.mkdir(parents=True, exist_ok=True)
    quant.save_quantized(model, saved, source=source)
    logger.info("int8 (%s) quantized; saved to %s", ran, saved)
    return str(ran)


@dataclass(slots=True)
class DraftModel:
    """A loaded draft model for speculative decoding, sped up like the target."""

    loaded: LoadedModel
    fast: SpeedUps
    dtype: torch.dtype


def load_draft(
    model: str | Path, config: EngineConfig, device: torch.device
) -> DraftModel | None:
    """Load ``speculative.draft_model`` (None without ``method="draft"``), after
    checking, from the tokenizers alone, that it shares the target's vocabulary."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    from llmprod.sched.speculative import SpeculativeConfig

    spec = SpeculativeConfig.parse(config.speculative)
    if spec is None or spec.method != "draft":
        return None
    assert spec.draft_model is not None
    name = f"speculative.draft_model={spec.draft_model!r}"
    try:
        draft_path = resolve_model(spec.draft_model)
    except InvalidConfigError as exc:
        raise InvalidConfigError(f"{name}: {exc}", "speculative.draft_model") from exc
    mine = AutoTokenizer.from_pretrained(resolve_model(model)).get_vocab()
    theirs = AutoTokenizer.from_pretrained(draft_path).get_vocab()
    if mine != theirs:
        differ = len(set(mine.items()) ^ set(theirs.items()))
        raise InvalidConfigError(
            f"{name} has another tokenizer ({len(theirs)} tokens against the "
            f"target's {len(mine)}, {differ} entries differ); a draft model must "
            "share the target's vocabulary",
            "speculative.draft_model",
        )
    draft_config = replace(
        config,
        dtype=spec.draft_dtype or config.dtype,
        quantization=spec.draft_quantization,
        speculative=None,
        tensor_parallel_size=1,
    )
    fields = {"quantization": "draft_quantization", "dtype": "draft_dtype"}
    try:
        loaded = load_model(draft_path, draft_config, device)
        dtype = pick_dtype(draft_config.dtype, device)
        fast = speed_up(loaded.model, draft_config, device, dtype)
    except InvalidConfigError as exc:
        field = fields.get(exc.field or "", "draft_model")
        raise InvalidConfigError(f"{name}: {exc}", f"speculative.{field}") from exc
    return DraftModel(loaded, fast, dtype)
