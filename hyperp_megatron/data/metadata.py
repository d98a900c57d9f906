"""The JSON sidecar ``<prefix>.meta.json`` that ``hyperp-preprocess`` writes next to ``<prefix>.idx``: the
tokenizer's identity (vocabulary size, sha256 of ``tokenizer.json``, EOD/BOS ids), the BOS/EOS policy, counts
and the files' hashes. The trainer checks it against its tokenizer before building anything."""

from __future__ import annotations

import json
import os
from pathlib import Path

FORMAT = "hyperp-preprocess/1"


def metadata_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.meta.json")


def write_json_atomic(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def read_metadata(prefix: str | Path) -> dict | None:
    """The sidecar of ``prefix``, None when there is none (data from another tool); ValueError if unreadable."""
    path = metadata_path(prefix)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): preprocess again or remove it") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} sidecar: preprocess again or remove it")
    return data


def check_tokenizer_matches(prefix: str | Path, tokenizer) -> dict | None:
    """Refuse (one-line ValueError) a dataset tokenized with another tokenizer than ``tokenizer``; returns the
    sidecar (None for a prefix without one: nothing to check)."""
    data = read_metadata(prefix)
    if data is None:
        return None
    recorded, ours = data["tokenizer"], tokenizer.identity()
    differ = [key for key in ("vocab_size", "tokenizer_json_sha256", "eod") if recorded.get(key) != ours[key]]
    if differ:
        shown = ", ".join(f"{key} {recorded.get(key)!s:.16} vs {ours[key]!s:.16}" for key in differ)
        raise ValueError(f"{prefix} was tokenized with another tokenizer than {tokenizer.path} ({shown}): "
                         "set data.tokenizer to the one the data was preprocessed with, or preprocess again")
    return data
