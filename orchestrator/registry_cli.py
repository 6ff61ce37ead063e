"""`palp-sweep models list | show NAME | pull NAME[@alias|/version] DIR`: browse and fetch registered adapters.

MLflow is imported once the command line is good (about two seconds): `--help` and usage errors skip it.
"""

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from palp_trainer.config import key_tags

from .cli_args import OneLineParser, UsageError, output_folder
from .labels import md_plain

_SQLITE_MAGIC = b"SQLite format 3\x00"
_NAME_THE_STORE = ("run a sweep here first, or name the store the sweep used: --tracking-uri URI, or "
                   "MLFLOW_TRACKING_URI=http://host:5000 for an MLflow server")


def _sqlite_file(uri: str) -> Path:
    return Path(unquote(uri.removeprefix("sqlite:///").partition("?")[0]))


def _uri(arg: str | None) -> tuple[str, str]:
    """The tracking URI and where it came from, which errors name. With none given: the first of the stores a
    sweep writes by default that exists (tracking.default_stores), named on stderr unless it is ./mlflow.db alone."""
    from .tracking import default_stores

    if arg:
        return arg, "--tracking-uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI"
    stores = default_stores()
    found = [uri for uri in stores if _sqlite_file(uri).is_file()]
    if not found:
        raise UsageError(f"no MLflow store at {stores[0]} nor at {stores[1]}; {_NAME_THE_STORE}")
    if len(found) > 1:
        print(f"palp-sweep: reading {found[0]}; also found {found[1]} (--tracking-uri to read it)", file=sys.stderr)
    elif found[0] != stores[0]:
        print(f"palp-sweep: reading {found[0]}", file=sys.stderr)
    return found[0], "tracking URI"


def _check_store(uri: str) -> None:
    """Every `models` command only reads the store: a local one must exist already, since MLflow would
    create an empty one (and a folder for it) wherever the URI points."""
    if uri.startswith("sqlite:///"):
        path = _sqlite_file(uri)
        if not path.is_file():
            raise UsageError(f"no MLflow store at {uri}: {path} does not exist; {_NAME_THE_STORE}")
        with path.open("rb") as f:
            if f.read(len(_SQLITE_MAGIC)) != _SQLITE_MAGIC:
                raise UsageError(f"{path}: not an MLflow store (not an SQLite database)")
    elif uri.startswith("file:") or "://" not in uri:  # a local folder store
        path = Path(unquote(urlparse(uri).path)) if uri.startswith("file:") else Path(uri)
        if not path.is_dir():
            raise UsageError(f"no MLflow store at {uri}: no folder {path}; {_NAME_THE_STORE}")


def open_store(flag: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else a sweep's default store; checked before MLflow reads it: a local
    store must exist, a server must answer (MLflow itself retries a closed port for minutes)."""
    from .tracking import TrackingError, preflight

    uri, source = _uri(flag)
    _check_store(uri)
    try:
        preflight(uri, nodes=1)
    except TrackingError as e:  # its line names the recipe field; here the URI came from `source`
        raise TrackingError(f"{source}: {str(e).removeprefix('mlflow.tracking_uri: ')}") from None
    return uri


def _scores(tags: dict) -> str:
    return " ".join(f"{k.removeprefix('metric.')}={float(v):.4f}" for k, v in sorted(tags.items())
                    if k.startswith("metric."))


def _versions(client, name: str) -> list:
    return sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def _aliases(model) -> dict[str, str]:
    """version -> alias(es), e.g. {"3": "@champion"}; MLflow gives the versions as int or str."""
    out = {}
    for alias, version in sorted((model.aliases or {}).items()):
        out[str(version)] = f"{out[str(version)]} @{alias}" if str(version) in out else f"@{alias}"
    return out


def list_models(client) -> None:
    models = client.search_registered_models()
    if not models:
        print("no registered models")
    for model in models:
        aliases = _aliases(model)
        print(model.name)
        for v in _versions(client, model.name):
            alias = f" {aliases[str(v.version)]}" if str(v.version) in aliases else ""
            print(f"  v{v.version}{alias}  {_scores(v.tags)}  run {v.run_id}")


# what a person compares versions by, in this order; then the description, then every other tag
KEY_TAGS = ("best_method", *key_tags())  # model_card.version_tags


def show_model(client, name: str) -> None:
    """The model, `champion -> v3` per alias, and per version: scores, key tags, description, the other tags."""
    model = client.get_registered_model(name)
    pointers = [f"{alias} -> v{version}" for alias, version in sorted((model.aliases or {}).items())]
    print(f"{model.name}\naliases: {', '.join(pointers) or 'none'}")
    for line in md_plain(model.description or "").strip().splitlines():
        print(f"  {line}")
    aliases = _aliases(model)
    for v in _versions(client, name):
        alias = f" {aliases[str(v.version)]}" if str(v.version) in aliases else ""
        print(f"\nv{v.version}{alias}  source run {v.run_id}")
        tags = dict(v.tags)
        key = [(k, tags[k]) for k in KEY_TAGS if k in tags]
        rest = [(k, val) for k, val in sorted(tags.items())
                if k not in (*KEY_TAGS, "source_run") and not k.startswith("metric.")]  # source_run: in the v line
        width = max([len("scores")] + [len(k) for k, _ in key + rest])
        print(f"  {'scores':<{width}}  {_scores(tags) or '-'}")
        for k, val in key:
            print(f"  {k:<{width}}  {val}")
        description = md_plain(v.description or "").strip().splitlines()
        for section in (description, [f"{k:<{width}}  {val}" for k, val in rest]):
            if section:
                print("\n" + "\n".join(f"  {line}" for line in section))


def _version(client, ref: str):
    """NAME@alias, NAME/version or NAME (= @champion) -> the registry's model version."""
    if "@" in ref:
        name, _, alias = ref.partition("@")
        return client.get_model_version_by_alias(name, alias)
    if "/" in ref:
        name, _, version = ref.rpartition("/")
        return client.get_model_version(name, version)
    return client.get_model_version_by_alias(ref, "champion")


def pull(client, ref: str, directory: str) -> Path:
    """Write the version's adapter folder (manifest, LoRA, learned embeddings, and whatever else the sweep put in
    it) to `directory`; nothing else of the logged pyfunc model (its code, environment, MLmodel) is downloaded."""
    import mlflow

    version = _version(client, ref)
    # the pyfunc's MLmodel names where its "adapter" artifact sits in the model (registry.py logs it so)
    info = mlflow.models.get_model_info(f"models:/{version.name}/{version.version}")
    adapter = info.flavors.get("python_function", {}).get("artifacts", {}).get("adapter")
    if adapter is None:
        raise UsageError(f"{ref}: model version {version.version} holds no adapter artifact; "
                         "is it a palp-sweep model?")
    root = client.get_model_version_download_uri(version.name, version.version).rstrip("/")
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/{adapter['path']}", dst_path=tmp)
        shutil.copytree(local, directory, dirs_exist_ok=True)
    return Path(directory)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="palp-sweep models", description=__doc__.splitlines()[0])
    store = "default: $MLFLOW_TRACKING_URI, else mlflow.db here, else ~/palp-sweep/runs/mlflow.db (a submitted job's)"
    parser.add_argument("--tracking-uri", help=store)
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="registered models, versions, aliases and scores")
    show = sub.add_parser("show", help="one model's aliases and versions: scores, key tags, prompts, other tags")
    show.add_argument("name")
    get = sub.add_parser("pull", help="write a version's adapter files to DIR")
    for command in (listing, show, get):  # before or after the command: `models show NAME --tracking-uri URI`
        command.add_argument("--tracking-uri", default=argparse.SUPPRESS, help=store)
    get.add_argument("ref", help="NAME, NAME@alias or NAME/version (NAME alone: NAME@champion)")
    get.add_argument("directory", help="new or empty folder")
    get.add_argument("--force", action="store_true", help="write into a non-empty folder, over files of the same names")
    try:
        args = parser.parse_args(argv)
        if args.command == "pull":
            output_folder(args.directory, "pull", args.force)
        return _run(args)
    except UsageError as e:
        print(f"palp-sweep: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from .tracking import TrackingError
    try:
        uri = open_store(args.tracking_uri)
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        if args.command == "list":
            list_models(client)
        elif args.command == "show":
            show_model(client, args.name)
        else:
            print(pull(client, args.ref, args.directory))
    except (TrackingError, MlflowException) as e:
        raise UsageError(str(e)) from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
