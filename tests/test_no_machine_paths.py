"""No tracked file records a path of the machine it was made on (a home or work directory): results, configs,
scripts and docs must work from any clone. Example commands may use /tmp; they name no user's files."""

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.tier("unit")

REPO = Path(__file__).resolve().parent.parent
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:" + "|".join(["work", "home", "root", "Users"]) + r")/[\w.-]")


def tracked_files() -> list[Path]:
    if (REPO / ".git").exists():
        names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        return [REPO / name for name in names.decode().split("\0") if name]
    return [path for path in REPO.rglob("*") if path.is_file() and ".venv" not in path.parts]


def machine_paths(text: str) -> list[str]:
    return [match.group(0) for match in MACHINE_PATH.finditer(text)]


def test_no_tracked_file_holds_a_machine_path():
    files = tracked_files()
    assert len(files) > 100
    found = {}
    for path in files:
        if not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        if hits := machine_paths(text):
            found[str(path.relative_to(REPO))] = hits[:3]
    assert not found, found


def test_machine_path_pattern_control():
    """Control: home/work directories are found; relative paths, URLs and /tmp examples are not."""
    text = ('"config": "/wo' 'rk/main/configs/d4.yaml" cd /ho' 'me/alice/x; see docs/work/x.md '
            "https://example.org/home/x /tmp/site ~/work/x")
    assert machine_paths(text) == ["/wo" "rk/m", "/ho" "me/a"]
