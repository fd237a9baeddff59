"""``--model org/name``: a Hugging Face Hub id, fetched into the Hub cache with only the files the command reads.

Two steps, both ``huggingface_hub.snapshot_download`` (its progress bars, resumable ``.incomplete`` files,
the shared Hub cache, ``HF_TOKEN``, ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` as the library honours them):
first config.json, the safetensors index and the tokenizer/generation files, then exactly the shards the
index names (or ``model.safetensors``).  Pickled weights (``*.bin``, ``*.pth``) and other safetensors in
the repository (e.g. a second ``consolidated.safetensors`` copy) are never fetched.  Every failure a user
can cause (no such repository, a gated one, no network, an uncached id offline) is a ``CheckpointError``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from moeq_triton.checkpoint.io import EXTRA_FILES, INDEX, SINGLE, CheckpointError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
METADATA_FILES = ("config.json", INDEX, *EXTRA_FILES)


def is_hub_id(model: str) -> bool:
    """``org/name`` that is not an existing local path (a local directory always wins)."""
    return HUB_ID.fullmatch(model) is not None and not Path(model).exists()


def shard_files(directory: Path) -> list[str]:
    """The safetensors files the command reads from a checkpoint directory holding its metadata."""
    index = directory / INDEX
    if not index.is_file():
        return [SINGLE]
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{index}: unreadable index ({error})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no weight_map of tensor name -> shard file name")
    return sorted({str(v) for v in weight_map.values()})


def download(model: str, revision: str | None = None) -> str:
    """The local snapshot directory of a Hub id, after fetching what the command reads (cached files are reused)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import utils as hub

    def fetch(patterns: list[str], at: str | None) -> Path:
        return Path(snapshot_download(model, revision=at, allow_patterns=patterns))

    where = f"--model {model}" + (f" --revision {revision}" if revision else "")
    try:
        snapshot = fetch(list(METADATA_FILES), revision)
        if not (snapshot / "config.json").is_file():
            raise CheckpointError(f"{where}: the repository has no config.json (not a Hugging Face model)")
        # the second step is pinned to the commit the first one resolved (snapshots/<commit>)
        snapshot = fetch(shard_files(snapshot), snapshot.name)
    except hub.GatedRepoError:
        raise CheckpointError(
            f"{where}: the repository is gated; accept its terms on https://huggingface.co/{model} and set "
            "HF_TOKEN (or run `hf auth login`)"
        ) from None
    except hub.RepositoryNotFoundError:
        raise CheckpointError(
            f"{where}: no such repository on the Hugging Face Hub (a private one needs HF_TOKEN)"
        ) from None
    except hub.RevisionNotFoundError:
        raise CheckpointError(f"{where}: the repository has no revision {revision!r}") from None
    except hub.LocalEntryNotFoundError:
        from huggingface_hub import constants

        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise CheckpointError(
            f"{where}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {reason}; run once with "
            "network access, or pass a local directory"
        ) from None
    except hub.HfHubHTTPError as error:
        raise CheckpointError(f"{where}: the Hub answered {str(error).splitlines()[0]}") from None
    except ValueError as error:  # an invalid repository id or revision (HFValidationError)
        raise CheckpointError(f"{where}: {str(error).splitlines()[0]}") from None
    except OSError as error:  # a full disk, an unwritable cache, a dropped connection
        raise CheckpointError(f"{where}: download failed ({type(error).__name__}: {error})") from None
    missing = [f for f in ("config.json", *shard_files(snapshot)) if not (snapshot / f).is_file()]
    if missing:
        raise CheckpointError(f"{where}: the repository lacks {missing[0]}")
    return str(snapshot)
