"""The MLflow model registry: versions of a model, their aliases, and where their weights are.

A version's source (and its tag ``nemoforge.model_uri``) is the model's store URI, relative to the artifact root when
that root is a local directory (:func:`~nemoforge.artifacts.uris.relative_uri`): reading it resolves it against the
root in use (:func:`~nemoforge.artifacts.uris.resolve_uri`), so a copied workdir serves its own files. Versions
registered before with absolute paths read as they were.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from nemoforge.artifacts.uris import relative_uri, resolve_uri
from nemoforge.config import Recipe
from nemoforge.errors import InputNotFoundError
from nemoforge.lineage.client import TAG_MODEL_URI, TAG_SHA256, find_logged_model, open_client


class Registry:
    """The model registry at one tracking URI, through one client.

    Args:
        tracking_uri: MLflow tracking (and registry) URI; SQLite or a server.
        artifact_root: the artifact root in use (``storage.artifact_root``, default ``<workdir>/artifacts``):
            model URIs under a local root are registered relative to it and resolved against it when read.
            None: URIs are registered and read as they are.
    """

    def __init__(self, tracking_uri: str | None, artifact_root: str | None = None):
        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root
        self.client = open_client(tracking_uri)

    @classmethod
    def for_recipe(cls, recipe: Recipe) -> Registry:
        """The registry that ``recipe.tracking`` names, with the recipe's artifact root."""
        return cls(recipe.tracking.mlflow_uri, recipe.storage.artifact_root)

    def register_model(
        self,
        name: str,
        model_uri: str,
        *,
        aliases: Sequence[str] = (),
        tags: Mapping[str, str] | None = None,
    ) -> int:
        """Register the model at ``model_uri`` as a new version of ``name`` and point ``aliases`` at it.

        Nothing is copied: the version's source is ``model_uri`` itself (a local directory or an
        ``s3://`` prefix in the artifact store, servable from there), relative to a local ``artifact_root``.
        When a stage logged that URI as its output model, the version is linked to that stage run and
        LoggedModel (tag ``nemoforge.model_id``) and carries its digest (tag ``nemoforge.sha256``). Works with
        a SQLite or server-backed registry.

        Args:
            name: registered model name (created when missing).
            model_uri: the exported checkpoint's store URI.
            aliases: aliases to move to the new version (``challenger``, ``champion``).
            tags: extra model-version tags.

        Returns:
            The new version number.

        Raises:
            InputNotFoundError: a local ``model_uri`` does not exist.
        """
        if "://" not in model_uri:
            path = Path(model_uri).expanduser()
            if not path.exists():
                raise InputNotFoundError(f"model {model_uri} does not exist: nothing to register as {name}")
            model_uri = str(path.resolve())
        model_uri = relative_uri(model_uri, self.artifact_root)
        client = self.client
        try:
            client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
        logged = find_logged_model(client, experiment_ids, model_uri)
        version_tags = {TAG_MODEL_URI: model_uri, **(tags or {})}
        if logged is not None:
            version_tags["nemoforge.model_id"] = logged.model_id
            if TAG_SHA256 in logged.tags:
                version_tags[TAG_SHA256] = logged.tags[TAG_SHA256]
        version = client.create_model_version(
            name,
            source=model_uri,
            run_id=logged.source_run_id if logged else None,
            tags=version_tags,
            model_id=logged.model_id if logged else None,
            await_creation_for=0,
        )
        for alias in aliases:
            client.set_registered_model_alias(name, alias, version.version)
        return int(version.version)

    def aliased_version(self, name: str, alias: str) -> tuple[int, dict[str, str]] | None:
        """The version that ``alias`` of registered model ``name`` points at and its tags; None when there is none."""
        found = self.aliased_source(name, alias)
        return None if found is None else (found[0], found[2])

    def aliased_source(self, name: str, alias: str) -> tuple[int, str, dict[str, str]] | None:
        """``(version, source, tags)`` of the version that ``alias`` of ``name`` points at; None when there is none.

        ``source`` is the model URI the version was registered from (:meth:`register_model`), resolved against
        ``artifact_root``.
        """
        try:
            version = self.client.get_model_version_by_alias(name, alias)
        except MlflowException as err:
            if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                return None
            raise
        return int(version.version), self._source(version), dict(version.tags)

    def champions(self) -> list[tuple[str, int, dict[str, str]]]:
        """``(name, version, tags)`` of every registered model's ``champion`` version, by name."""
        found = []
        for model in sorted(self.client.search_registered_models(), key=lambda m: m.name):
            version = (model.aliases or {}).get("champion")
            if version is not None:
                found.append((model.name, int(version), dict(self.client.get_model_version(model.name, version).tags)))
        return found

    def registered_model_source(self, uri: str) -> str:
        """The store URI behind ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (the version's source, resolved
        against ``artifact_root``).

        Raises:
            InputNotFoundError: the name, alias or version is not in the registry.
        """
        spec = uri.removeprefix("models:/")
        name, sep, alias = spec.partition("@")
        client = self.client
        try:
            if sep:
                version = client.get_model_version_by_alias(name, alias)
            else:
                name, _, number = spec.rpartition("/")
                version = client.get_model_version(name, number)
        except MlflowException as err:
            raise InputNotFoundError(
                f"{uri} is not in the model registry at {self.tracking_uri}: {err.message}"
            ) from None
        return self._source(version)

    def _source(self, version: ModelVersion) -> str:
        """Where a version's weights are: its ``nemoforge.model_uri`` tag (else its source), resolved."""
        return resolve_uri(version.tags.get(TAG_MODEL_URI) or version.source, self.artifact_root)
