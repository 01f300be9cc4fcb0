"""The container images: one pinned file, a Dockerfile and a hash-pinned lock per dependency set that resolves."""

from __future__ import annotations

import re

import pytest

from nemoforge_components.images import IMAGES_DIR, check_lock, load_images, lock_path, read_lock

SETS = sorted(load_images()["sets"])


def test_the_issue_sets_exist_and_every_reference_is_pinned():
    assert {"train", "rl", "serve"} <= set(SETS)
    for name, spec in load_images()["sets"].items():
        for ref in (spec["image"], spec["base"]):
            repo, _, tag = ref.rpartition(":")
            assert repo and "/" in repo, f"{name}: {ref} names no registry/repository"
            assert re.fullmatch(r"[\w][\w.-]*(@sha256:[0-9a-f]{64})?", tag) and tag != "latest", f"{name}: {ref}"
            assert not re.fullmatch(r"\d+(\.\d+)?(-[a-z]+)*", tag), f"{name}: {ref}: pin a patch version"


@pytest.mark.parametrize("name", SETS)
def test_dockerfile_installs_its_lock_as_a_non_root_user(name: str):
    dockerfile = (IMAGES_DIR / f"{name}.Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE$", dockerfile, re.MULTILINE) and re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile, re.MULTILINE)
    assert f"COPY components/images/locks/{name}.txt /tmp/lock.txt" in dockerfile
    assert "pip install --no-deps --require-hashes -r /tmp/lock.txt" in dockerfile
    users = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("0", "root"), users


@pytest.mark.parametrize("name", SETS)
def test_lock_pins_the_sets_requirements_with_hashes(name: str):
    lines = [line for line in lock_path(name).read_text().splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[a-z0-9-]+==\S+ --hash=sha256:[0-9a-f]{64}", line) for line in lines), name
    pins = read_lock(name)
    for requirement in load_images()["sets"][name]["requirements"]:
        package, version = requirement.split("==")
        assert pins.get(package) == version, f"{name}: lock has {package}=={pins.get(package)}, images.yaml {version}"
    assert "nemoforge" not in pins
    for package in ("kfp", "pydantic", "mlflow", "transformers"):  # nemoforge's own dependencies are in every set
        assert package in pins, f"{name}: {package} missing"
    assert ("torch" in pins) == (name != "cli")


@pytest.mark.slow
@pytest.mark.parametrize("name", SETS)
def test_lock_resolves_to_itself(name: str):
    """pip (PyPI, CPython 3.11, x86_64 Linux, as the images) resolves lock + nemoforge to exactly the lock."""
    assert check_lock(name) == {}
