"""Characters of the Python standard library's own source: a language task with no download.

The corpus is read at run time from the running interpreter's standard library directory
(``sysconfig.get_paths()["stdlib"]``): its top-level ``*.py`` files in sorted name order. Each
file goes to one split by a hash of its name (CRC-32 mod 10: 0 validation, 1 test, others
train), so the three splits are different modules, not neighbouring lines of one file. Each
file contributes at most its first :data:`PER_FILE` characters, so each split spans many
modules, and each split keeps its first ``n_*`` characters. The text therefore depends on the
Python version; the report records it.

Characters map to :data:`VOCAB_SIZE` ids: tab, newline and printable ASCII (32..126) get their
own id, everything else one shared id. A split holds non-overlapping windows: inputs
``x[i] = ids[i T : (i + 1) T]`` and next-character targets ``y[i] = ids[i T + 1 : (i + 1) T + 1]``.
"""
from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from grng.demo.data import Split

#: tab, newline, then the 95 printable ASCII characters; id VOCAB_SIZE - 1 is "any other"
ALPHABET = "\t\n" + "".join(chr(c) for c in range(32, 127))
VOCAB_SIZE = len(ALPHABET) + 1
SEQ_LEN = 32
SIZES = (153_600, 16_384, 16_384)  # train / validation / test characters (300 steps of 16 x 32)
PER_FILE = 4096
_LOOKUP = {ch: i for i, ch in enumerate(ALPHABET)}


@dataclass(frozen=True)
class TextData:
    """Windows of the train / validation / test text and where they came from."""

    train: Split
    val: Split
    test: Split
    files: dict[str, list[str]]  # split name -> file names used, in order
    source: str

    def to(self, device: torch.device | str) -> TextData:
        return TextData(self.train.to(device), self.val.to(device), self.test.to(device),
                        self.files, self.source)


def encode(text: str) -> torch.Tensor:
    """Character ids (int64) of ``text``; characters outside the alphabet share the last id."""
    other = VOCAB_SIZE - 1
    return torch.tensor([_LOOKUP.get(ch, other) for ch in text], dtype=torch.int64)


def split_of(name: str) -> str:
    """Which split a file of this name belongs to (CRC-32 of the name mod 10)."""
    bucket = zlib.crc32(name.encode()) % 10
    return "val" if bucket == 0 else "test" if bucket == 1 else "train"


def windows(ids: torch.Tensor, seq_len: int = SEQ_LEN) -> Split:
    """Non-overlapping (input, next-character target) windows of ``seq_len`` characters."""
    n = (ids.numel() - 1) // seq_len
    if n < 1:
        raise ValueError(f"need more than {seq_len} characters, got {ids.numel()}")
    x = ids[:n * seq_len].view(n, seq_len)
    y = ids[1:n * seq_len + 1].view(n, seq_len)
    return Split(x.contiguous(), y.contiguous(), torch.arange(n))


def load_text_splits(root: str | Path | None = None, sizes: tuple[int, int, int] = SIZES,
                     seq_len: int = SEQ_LEN) -> TextData:
    """The three splits of the standard library's top-level sources under ``root`` (default:
    this interpreter's standard library). Raises ValueError when a split gets too little text."""
    root = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    wanted = dict(zip(("train", "val", "test"), sizes))
    parts: dict[str, list[str]] = {k: [] for k in wanted}
    have = dict.fromkeys(wanted, 0)
    files: dict[str, list[str]] = {k: [] for k in wanted}
    for path in sorted(root.glob("*.py")):
        split = split_of(path.name)
        room = wanted[split] + 1 - have[split]  # +1: the last window's target
        if room <= 0:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")[:min(room, PER_FILE)]
        parts[split].append(text)
        files[split].append(path.name)
        have[split] += len(text)
    short = {k: have[k] for k in wanted if have[k] < wanted[k] + 1}
    if short:
        raise ValueError(f"{root}: not enough source text for {short} (wanted {wanted})")
    made = {k: windows(encode("".join(parts[k])), seq_len) for k in wanted}
    return TextData(made["train"], made["val"], made["test"], files, str(root))
