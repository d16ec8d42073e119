"""Fetch a landmark data set zip and install it as ``<dest>/train`` + ``<dest>/test``.

Downloads beside the destination, extracts into a temporary folder and renames only when the
layout is complete, so an interrupted or failed run never leaves half a data set.
  python -m train.download --dest data/landmark_images [--url https://... | file:///path/set.zip]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from landmark.cli import positive_float
from landmark.progress import progress_bar

UDACITY_URL = "https://udacity-dlnfd.s3-us-west-1.amazonaws.com/datasets/landmark_images.zip"


def fetch(url: str, target: Path, timeout: float) -> None:
    """Stream ``url`` to ``target`` with a progress bar."""
    with urllib.request.urlopen(url, timeout=timeout) as response, open(target, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with progress_bar(total=total, unit="B", unit_scale=True, desc=f"download {Path(url).name}") as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))


def find_root(folder: Path) -> Path:
    """The folder inside the extracted tree that holds both train/ and test/."""
    for candidate in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    raise ValueError("the archive has no folder with both train/ and test/ inside")


def install(url: str, dest: Path, timeout: float = 60.0) -> Path:
    if (dest / "train").is_dir() and (dest / "test").is_dir():
        print(f"{dest} already holds train/ and test/; nothing to do")
        return dest
    if dest.exists():
        raise ValueError(f"{dest} exists but is not a data set (no train/ and test/): move it away first")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}-") as tmp:
        archive = Path(tmp) / "download.zip"
        fetch(url, archive, timeout)
        try:
            with zipfile.ZipFile(archive) as zf:
                for member in progress_bar(zf.infolist(), desc="extract", unit="file"):
                    zf.extract(member, Path(tmp) / "x")  # zipfile strips absolute and '..' components
        except zipfile.BadZipFile as e:
            raise ValueError(f"{url} is not a valid zip archive: {e}") from e
        shutil.move(str(find_root(Path(tmp) / "x")), dest)
    return dest


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=UDACITY_URL, help="http(s):// or file:// URL of the zip")
    p.add_argument("--dest", type=Path, default=Path("data/landmark_images"))
    p.add_argument("--timeout", type=positive_float, default=60.0, help="seconds to wait for the server")
    return p


def main(args: argparse.Namespace) -> int:
    try:
        dest = install(args.url, args.dest, args.timeout)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        print(f"error: cannot download {args.url}: {reason}. Offline? Pass --url file:///path/to/landmark_images.zip "
              "(make data DATA_URL=...) or point DATA_DIR at an existing train/ + test/ folder.", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"data set ready at {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
