"""SHA-256 checksums of an export's weight files, and their verification on load.

An export lists the checksum of each weight file (`*.safetensors`) in `checksums.sha256`, in
the format of GNU `sha256sum` (one `<64 hex digits>  <file name>` line per file), so that users
can also check an export with `sha256sum -c checksums.sha256` from inside its directory.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from tbquant.errors import ExportError

CHECKSUMS_NAME = "checksums.sha256"
WEIGHT_SUFFIX = ".safetensors"

_CHUNK_BYTES = 1 << 20
# sha256sum writes "<digest>  <name>" in text mode and "<digest> *<name>" in binary mode.
_CHECKSUM_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


def sha256_file(path: Path) -> str:
    """Return the hexadecimal SHA-256 digest of the file at `path`, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def weight_files(directory: Path) -> list[Path]:
    """Return the weight files of an export directory, sorted by name."""
    return sorted(path for path in directory.iterdir() if path.is_file() and path.name.endswith(WEIGHT_SUFFIX))


def write_checksums(directory: Path) -> Path:
    """Hash every weight file in `directory` and write `checksums.sha256` next to them."""
    lines = [f"{sha256_file(path)}  {path.name}\n" for path in weight_files(directory)]
    checksums = directory / CHECKSUMS_NAME
    checksums.write_text("".join(lines), encoding="utf-8")
    return checksums


def read_checksums(directory: Path) -> dict[str, str]:
    """Return the expected digest of each file listed in the `checksums.sha256` of `directory`.

    Raises:
        ExportError: if the file is missing or a line is not in `sha256sum` format.
    """
    checksums = directory / CHECKSUMS_NAME
    if not checksums.is_file():
        raise ExportError(
            f"{checksums} not found, so the weights of {directory} cannot be verified: "
            "export the model again, or skip the check with --no-verify (verify=False in tbquant.load_quantized)"
        )
    expected: dict[str, str] = {}
    for number, line in enumerate(checksums.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        match = _CHECKSUM_LINE.match(line)
        if match is None:
            raise ExportError(f"{checksums}, line {number}: invalid checksum line: the export is corrupt, export it again")
        name = match.group(2)
        if Path(name).name != name:
            raise ExportError(f"{checksums}, line {number}: {name!r} is not a file name in the export directory: the export is corrupt")
        expected[name] = match.group(1).lower()
    return expected


def verify_export(path: str | Path) -> None:
    """Check every weight file of the export at `path` against `checksums.sha256`.

    Every `*.safetensors` file in the directory must be listed, and every listed file must exist
    and have the listed SHA-256 digest.

    Raises:
        ExportError: naming the first file that is missing, unlisted or corrupt.
    """
    directory = Path(path)
    expected = read_checksums(directory)
    checksums = directory / CHECKSUMS_NAME

    for weights in weight_files(directory):
        if weights.name not in expected:
            raise ExportError(f"{weights} is not listed in {checksums}: the export is corrupt, export it again")

    for name, digest in expected.items():
        weights = directory / name
        if not weights.is_file():
            raise ExportError(f"{weights} not found: the export is incomplete, export it again")
        if sha256_file(weights) != digest:
            raise ExportError(f"{weights} is corrupt (its SHA-256 checksum does not match {checksums}): export it again")
