"""Remote code of a checkpoint, verified before any load trusts it (issue 16 §2).

A nemotron-nas export carries ``configuration_decilm.py`` and ``modeling_decilm.py`` (wired through
``auto_map``); transformers and vLLM execute them on a load with ``trust_remote_code=True``. Anyone who
can write the model's prefix in the artifact store could replace them, so every such load first calls
:func:`verify_remote_code`: each Python file of the checkpoint must be byte-identical (sha256) to the file
of the same name that this installed nemoforge ships in ``nemoforge/models/hf/``, and ``auto_map`` may
only name those modules (no ``repo--module`` reference, which would download code from the Hub).

Also a command, for a pod's init container before vLLM starts (stdlib only, no torch import)::

    python -m nemoforge.models.remote_code /mnt/models
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from nemoforge.errors import NemoforgeError

SHIPPED_DIR = Path(__file__).resolve().parent / "hf"
SHIPPED_MODULES = ("configuration_decilm.py", "modeling_decilm.py")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify_remote_code(model_dir: str | Path) -> None:
    """Refuse a checkpoint whose Python files are not the ones this nemoforge ships.

    A checkpoint without Python files and without ``auto_map`` (a plain Llama) passes.

    Args:
        model_dir: a local checkpoint directory (``config.json`` and, for nemotron-nas, the two modules).

    Raises:
        NemoforgeError: one line naming the file and both sha256 digests (the checkpoint's, the shipped one),
            or the ``auto_map`` entry that points at code nemoforge does not ship.
    """
    model_dir = Path(model_dir)
    for file in sorted(model_dir.rglob("*.py")):
        name = file.relative_to(model_dir).as_posix()
        if name not in SHIPPED_MODULES:
            raise NemoforgeError(
                f"refusing to trust remote code in {model_dir}: {name} (sha256 {_sha256(file)}) is not a module "
                f"nemoforge ships ({', '.join(SHIPPED_MODULES)}); remove it or re-export the model"
            )
        got, shipped = _sha256(file), _sha256(SHIPPED_DIR / name)
        if got != shipped:
            raise NemoforgeError(
                f"refusing to trust remote code: {file} has sha256 {got}, the {name} of the installed nemoforge "
                f"({SHIPPED_DIR}) has {shipped}; re-export the model with this nemoforge version"
            )
    config = model_dir / "config.json"
    auto_map = json.loads(config.read_text()).get("auto_map", {}) if config.is_file() else {}
    for key, refs in auto_map.items():
        for ref in refs if isinstance(refs, list) else [refs]:  # a tokenizer maps to [slow, fast]
            if ref is not None and ("--" in ref or f"{ref.rsplit('.', 1)[0]}.py" not in SHIPPED_MODULES):
                raise NemoforgeError(
                    f"refusing to trust remote code: {config} maps {key} to {ref!r}, which is not in a module "
                    f"nemoforge ships ({', '.join(SHIPPED_MODULES)})"
                )


def main(argv: list[str]) -> int:
    """``python -m nemoforge.models.remote_code MODEL_DIR``: exit 0 when verified, else 1 with one line."""
    if len(argv) != 1:
        print("usage: python -m nemoforge.models.remote_code MODEL_DIR", file=sys.stderr)
        return 2
    try:
        verify_remote_code(argv[0])
    except NemoforgeError as err:
        print(f"nemoforge: error: {err}", file=sys.stderr)
        return 1
    print(f"remote code in {argv[0]} matches nemoforge's {', '.join(SHIPPED_MODULES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
