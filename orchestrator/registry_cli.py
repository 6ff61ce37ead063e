"""`palp-sweep models list | show NAME | pull NAME[@alias|/version] DIR`: browse and fetch registered adapters."""

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from .cli import OneLineParser, UsageError, output_folder
from .tracking import TrackingError, preflight

_SQLITE_MAGIC = b"SQLite format 3\x00"
_NAME_THE_STORE = ("run a sweep here first, or name the store the sweep used: --tracking-uri URI, or "
                   "MLFLOW_TRACKING_URI=http://host:5000 for an MLflow server")


def _uri(arg: str | None) -> tuple[str, str]:
    """The tracking URI and where it came from, which errors name."""
    if arg:
        return arg, "--tracking-uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI"
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}", "tracking URI"


def _check_store(uri: str) -> None:
    """Every `models` command only reads the store: a local one must exist already, since MLflow would
    create an empty one (and a folder for it) wherever the URI points."""
    if uri.startswith("sqlite:///"):
        path = Path(unquote(uri.removeprefix("sqlite:///").partition("?")[0]))
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
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite mlflow.db here; checked before MLflow reads it: a local
    store must exist, a server must answer (MLflow itself retries a closed port for minutes)."""
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


def list_models(client: MlflowClient) -> None:
    models = client.search_registered_models()
    if not models:
        print("no registered models")
    for model in models:
        aliases = {v: a for a, v in (model.aliases or {}).items()}
        print(model.name)
        for v in sorted(client.search_model_versions(f"name = '{model.name}'"), key=lambda v: int(v.version)):
            alias = f" @{aliases[v.version]}" if v.version in aliases else ""
            print(f"  v{v.version}{alias}  {_scores(v.tags)}  run {v.run_id}")


def show_model(client: MlflowClient, name: str) -> None:
    model = client.get_registered_model(name)
    print(f"{model.name}  aliases: {dict(model.aliases or {})}")
    for v in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version)):
        print(f"\nversion {v.version}  source run {v.run_id}")
        for line in (v.description or "").splitlines():
            print(f"  {line}")
        for key, value in sorted(v.tags.items()):
            print(f"  {key}: {value}")


def model_uri(ref: str) -> str:
    """NAME@alias, NAME/version or NAME (= @champion) -> models:/ URI."""
    if "@" in ref or "/" in ref:
        return f"models:/{ref}"
    return f"models:/{ref}@champion"


def pull(ref: str, directory: str) -> Path:
    """Write the adapter's diffusers-loadable files (LoRA, embeddings, manifest) to `directory`."""
    from palp_trainer.export import MANIFEST_FILE  # imports diffusers and torch: seconds that list and show skip

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri(ref), dst_path=tmp))
        manifests = list(local.rglob(MANIFEST_FILE))
        if not manifests:
            raise MlflowException(f"{ref} holds no adapter ({MANIFEST_FILE} missing)")
        shutil.copytree(manifests[0].parent, directory, dirs_exist_ok=True)
    return Path(directory)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="palp-sweep models", description=__doc__)
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered models, versions, aliases and scores")
    show = sub.add_parser("show", help="one model's versions, tags and prompts")
    show.add_argument("name")
    get = sub.add_parser("pull", help="write a version's adapter files to DIR")
    get.add_argument("ref", help="NAME, NAME@alias or NAME/version")
    get.add_argument("directory")
    try:
        args = parser.parse_args(argv)
        if args.command == "pull":
            output_folder(args.directory, "pull")
        uri = open_store(args.tracking_uri)
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        if args.command == "list":
            list_models(client)
        elif args.command == "show":
            show_model(client, args.name)
        else:
            print(pull(args.ref, args.directory))
    except (TrackingError, MlflowException, UsageError) as e:
        print(f"palp-sweep: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
