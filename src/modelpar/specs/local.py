"""The profiled local machine as a cluster spec: `--cluster local`.

`modelpar profile` measures this machine (`modelpar.profiling.measure`) and caches the result as an
ordinary ClusterSpec JSON file, loadable like any other (`--cluster PATH`; `specs.io.load_local_cluster`):

    $MODELPAR_CACHE/local_cluster.json        when MODELPAR_CACHE is set (a directory)
    $XDG_CACHE_HOME/modelpar/local_cluster.json, else ~/.cache/modelpar/local_cluster.json

Pure Python (no torch): the planner imports it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from modelpar.specs.cluster import ClusterSpec
from modelpar.specs.errors import SpecError

CACHE_ENV = "MODELPAR_CACHE"
PROFILE_FILE = "local_cluster.json"


def cache_dir() -> Path:
    """Where modelpar caches measurements (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "modelpar"


def local_profile_path() -> Path:
    """The cached profile of this machine (it may not exist yet)."""
    return cache_dir() / PROFILE_FILE


def cluster_to_json(cluster: ClusterSpec) -> str:
    """The cluster as the JSON object `load_cluster` reads back (keys = dataclass fields)."""
    return json.dumps(asdict(cluster), indent=1) + "\n"


def save_local_cluster(cluster: ClusterSpec, path: str | os.PathLike | None = None) -> Path:
    """Write `cluster` (atomically: a half-written profile never replaces a good one); returns the path."""
    target = Path(path) if path is not None else local_profile_path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(target.name + ".tmp")
        temporary.write_text(cluster_to_json(cluster))
        temporary.replace(target)
    except OSError as error:
        raise SpecError(f"cannot write the profile to {target}: {error.strerror or error}; "
                        f"set {CACHE_ENV} to a writable directory or pass --output") from None
    return target
