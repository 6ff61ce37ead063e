"""`palp-sweep models list | show NAME | pull NAME[@alias|/version] DIR`: browse and fetch registered adapters."""

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from palp_trainer.export import MANIFEST_FILE

from .tracking import TrackingError, preflight


def _uri(arg: str | None) -> str:
    return arg or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


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
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri(ref), dst_path=tmp))
        manifests = list(local.rglob(MANIFEST_FILE))
        if not manifests:
            raise MlflowException(f"{ref} holds no adapter ({MANIFEST_FILE} missing)")
        shutil.copytree(manifests[0].parent, directory, dirs_exist_ok=True)
    return Path(directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="palp-sweep models", description=__doc__)
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered models, versions, aliases and scores")
    show = sub.add_parser("show", help="one model's versions, tags and prompts")
    show.add_argument("name")
    get = sub.add_parser("pull", help="write a version's adapter files to DIR")
    get.add_argument("ref", help="NAME, NAME@alias or NAME/version")
    get.add_argument("directory")
    args = parser.parse_args(argv)
    uri = _uri(args.tracking_uri)
    try:
        preflight(uri, nodes=1)
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        if args.command == "list":
            list_models(client)
        elif args.command == "show":
            show_model(client, args.name)
        else:
            print(pull(args.ref, args.directory))
    except (TrackingError, MlflowException) as e:
        print(f"palp-sweep: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
