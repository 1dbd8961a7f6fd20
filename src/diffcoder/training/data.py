"""Training data: a corpus of source files -> tokenized, packed, memory-mapped token shards (CPT), and chat
pairs -> prompt/response token ids (SFT).

On disk (`diffcoder data build`): `index.json` (tokenizer fingerprint, shards, summary) and per split
(`train`, `val`) shards `train-00000.bin` of uint16/uint32 tokens; every document is followed by EOS so packed
rows see document boundaries. A document goes to `val` when its content hash says so (stable across rebuilds),
and exact duplicates are dropped.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import random
import sys
import sysconfig
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffcoder.errors import ConfigError, DiffcoderError

if TYPE_CHECKING:
    from diffcoder.fim import FimTokens

DEFAULT_EXTENSIONS = (".py", ".pyi", ".c", ".h", ".cpp", ".hpp", ".cc", ".js", ".ts", ".java", ".go", ".rs", ".rb",
                      ".sh", ".md", ".rst", ".txt", ".toml", ".yaml", ".yml", ".json", ".html", ".css", ".sql")
MAX_FILE_BYTES = 1 << 20  # larger files are almost always generated data, not code worth learning
# A held-out split below this many tokens (8 rows of 512) gives eval numbers too noisy to compare: warn.
MIN_VAL_TOKENS = 4096
INDEX = "index.json"
SFT_FILE = {"train": "sft-train.jsonl", "val": "sft-val.jsonl"}


# ----------------------------------------------------------------------------------------------- sources


@dataclass
class Document:
    name: str  # path or "file.jsonl:line" — for the language summary and error messages
    text: str


def python_env_roots() -> list[Path]:
    """The running interpreter's standard library and site-packages (the embedded default corpus)."""
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    for key in ("purelib", "platlib"):
        p = Path(sysconfig.get_paths()[key])
        if p not in roots:
            roots.append(p)
    return [r for r in roots if r.is_dir()]


def _walk_files(root: Path, extensions: tuple[str, ...]) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for f in sorted(filenames):
            if f.endswith(extensions):
                yield Path(dirpath) / f


def _read_text(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, record) for each non-blank line; a bad line is an error naming it."""
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DiffcoderError(f"{path}:{i} is not valid JSON ({exc}); fix or drop that line") from exc


def _iter_jsonl(path: Path, field: str) -> Iterator[Document]:
    for i, rec in _read_jsonl(path):
        if field not in rec:
            raise DiffcoderError(
                f"{path}:{i} has no {field!r} field (keys: {sorted(rec)[:8]}); pass --text-field NAME"
            )
        yield Document(f"{path}:{i}", str(rec[field]))


def _iter_parquet(path: Path, field: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DiffcoderError("reading Parquet needs pyarrow: pip install pyarrow") from exc
    table = pq.read_table(path)
    if field not in table.column_names:
        raise DiffcoderError(f"{path} has no column {field!r} (columns: {table.column_names}); pass --text-field")
    for i, text in enumerate(table.column(field).to_pylist()):
        if text:
            yield Document(f"{path}:{i}", str(text))


def resolve_source(spec: str, extensions: tuple[str, ...] = DEFAULT_EXTENSIONS) -> list[Path | tuple[str, Path]]:
    """Expand one source spec into files (or ('jsonl'|'parquet', path) record sources)."""
    if spec == "python-env":
        return [f for r in python_env_roots() for f in _walk_files(r, (".py",))]
    p = Path(spec)
    if p.is_dir():
        return list(_walk_files(p, extensions))
    if any(ch in spec for ch in "*?["):
        return [Path(f) for f in sorted(glob.glob(spec, recursive=True)) if Path(f).is_file()]
    if p.is_file():
        if p.suffix == ".jsonl":
            return [("jsonl", p)]
        if p.suffix == ".parquet":
            return [("parquet", p)]
        return [p]
    raise DiffcoderError(f"corpus source {spec!r} does not exist; give a directory, a glob, a .jsonl/.parquet "
                         "file or the built-in source 'python-env'")


def iter_documents(sources: list[str], text_field: str = "text", max_files: int | None = None,
                   extensions: tuple[str, ...] = DEFAULT_EXTENSIONS) -> Iterator[Document]:
    items = [it for s in sources for it in resolve_source(s, extensions)]
    # A fixed pseudo-random order (by path hash): a --max-tokens/--max-files prefix then samples the whole
    # corpus rather than its alphabetically first directory.
    items.sort(key=lambda it: hashlib.sha1(str(it).encode()).hexdigest())
    if max_files is not None:
        items = items[:max_files]
    for it in tqdm(items, desc="reading corpus", unit="file", disable=len(items) < 50, file=sys.stderr):
        if isinstance(it, tuple):
            kind, path = it
            yield from (_iter_jsonl(path, text_field) if kind == "jsonl" else _iter_parquet(path, text_field))
        else:
            text = _read_text(it)
            if text is not None:
                yield Document(str(it), text)


def language_of(name: str) -> str:
    if ":" in name and not Path(name).exists():  # a record of a JSONL/Parquet file
        return "record"
    return Path(name).suffix.lstrip(".") or "none"


# ----------------------------------------------------------------------------------------------- tokenizer


def tokenizer_fingerprint(tokenizer, vocab_size: int | None = None) -> str:
    """Hash of (token, id) pairs with id < vocab_size: equal for the same tokenizer with tokens appended
    (adding a mask token keeps it), different for another tokenizer."""
    vocab = tokenizer.get_vocab()
    n = vocab_size if vocab_size is not None else len(vocab)
    items = sorted((i, t) for t, i in vocab.items() if i < n)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def load_tokenizer(spec: str):
    """The tokenizer of what `spec` names (`diffcoder.loading.resolve_model`: a built-in name, a checkpoint, adapter
    or run directory, a .gguf file); an error when it has none."""
    from diffcoder.checkpoint import load_tokenizer as load_checkpoint_tokenizer
    from diffcoder.loading import resolve_model

    return load_checkpoint_tokenizer(resolve_model(spec), required=True)


def is_held_out(digest: str, val_fraction: float) -> bool:
    return int(digest[:8], 16) / 0xFFFFFFFF < val_fraction


# ----------------------------------------------------------------------------------------------- CPT build


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of document text. Text that spells a special token (`<|endoftext|>` in a tokenizer's own source,
    `<|fim_prefix|>` in a FIM test) is tokenized as text: only the data builder inserts control tokens."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def document_ids(text: str, digest: str, tokenizer, eos: int, fim=None, fim_rate: float = 0.0,
                 fim_seed: int = 0) -> tuple[list[int], bool]:
    """(ids + EOS, whether FIM-transformed). With FIM tokens, a `fim_rate` share of documents (a draw seeded by
    the document's hash, so rebuilds agree) is cut at two uniform character positions and laid out in PSM order:
    <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle EOS (docs/design.md §2.8)."""
    from diffcoder.fim import fim_ids, fim_split

    rng = random.Random(f"fim-{fim_seed}-{digest}")
    if fim is None or rng.random() >= fim_rate:
        return encode_text(tokenizer, text) + [eos], False
    prefix, middle, suffix = fim_split(text, rng)
    ids = fim_ids(encode_text(tokenizer, prefix), encode_text(tokenizer, middle), encode_text(tokenizer, suffix),
                  fim)
    return ids + [eos], True


class _ShardWriter:
    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.buf: list[np.ndarray] = []
        self.n = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, ids: list[int]) -> None:
        self.buf.append(np.asarray(ids, dtype=self.dtype))
        self.n += len(ids)
        if self.n >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.n:
            return
        name = f"{self.split}-{len(self.shards):05d}.bin"
        arr = np.concatenate(self.buf)
        tmp = self.out / (name + ".tmp")
        arr.tofile(tmp)
        os.replace(tmp, self.out / name)
        self.shards.append({"file": name, "tokens": int(arr.size)})
        self.buf, self.n = [], 0


def build_corpus(
    sources: list[str],
    tokenizer,
    out_dir: str | Path,
    val_fraction: float = 0.01,
    max_tokens: int | None = None,
    max_files: int | None = None,
    text_field: str = "text",
    shard_tokens: int = 1 << 24,
    tokenizer_spec: str = "",
    fim_rate: float = 0.0,
    fim_seed: int = 0,
) -> dict[str, Any]:
    """Tokenize and pack a corpus into memory-mapped shards; returns the summary (also in index.json).

    fim_rate > 0: that share of documents is FIM-transformed (`document_ids`); a tokenizer without FIM tokens gets
    ours added (`fim.ensure_fim_tokens`), and the index records their names and ids so the trainer gives the model
    the same ones."""
    _check_corpus_fractions(val_fraction, fim_rate)
    fim = _fim_tokens(tokenizer) if fim_rate > 0 else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eos = _eos_token_id(tokenizer)
    vocab = len(tokenizer)  # after the FIM tokens were added
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in ("train", "val")}
    documents = iter_documents(sources, text_field, max_files)
    stats = _pack_documents(documents, tokenizer, eos, writers, val_fraction, max_tokens, fim, fim_rate, fim_seed)
    for w in writers.values():
        w.flush()
    if not stats.documents:
        raise DiffcoderError(f"the corpus {sources} has no readable non-empty documents; check the paths "
                             "(files over 1 MiB and non-UTF-8 files are skipped)")
    summary = _corpus_summary(stats, writers, with_fim=fim is not None, val_fraction=val_fraction)
    index = {
        "format": "diffcoder-packed-v1", "dtype": dtype.name, "vocab_size": vocab, "eos_token_id": eos,
        "tokenizer": tokenizer_spec, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "val_fraction": val_fraction, "sources": sources, "shards": {s: w.shards for s, w in writers.items()},
        "summary": summary,
    }
    if fim is not None:  # the FIM tokens the data uses (the trainer adds them to the model under these ids)
        index["fim"] = {"rate": fim_rate, "seed": fim_seed, "tokens": fim.to_dict()}
    _write_json_atomically(out / INDEX, index)
    return index


def _check_corpus_fractions(val_fraction: float, fim_rate: float) -> None:
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 0 <= fim_rate <= 1:
        raise ConfigError(f"fim_rate must be in [0, 1], got {fim_rate}")


def _fim_tokens(tokenizer) -> FimTokens:
    """The tokenizer's FIM tokens, ours added to it when it has none."""
    from diffcoder.fim import ensure_fim_tokens

    fim, _ = ensure_fim_tokens(tokenizer)
    return fim


def _eos_token_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DiffcoderError("the tokenizer has no EOS token to separate packed documents; use another tokenizer")
    return eos


def _content_digest(text: str) -> str:
    # surrogatepass: a lone surrogate (from a JSON record) still hashes instead of failing the build
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class _CorpusStats:
    """What packing counted, for the summary (Counters keep the order keys first appeared in)."""
    documents: Counter = field(default_factory=Counter)  # per split
    fim_documents: Counter = field(default_factory=Counter)  # per split
    language_documents: Counter = field(default_factory=Counter)
    language_tokens: Counter = field(default_factory=Counter)
    duplicates: int = 0
    tokens: int = 0

    def add(self, split: str, language: str, n_tokens: int, is_fim: bool) -> None:
        self.documents[split] += 1
        self.fim_documents[split] += is_fim
        self.language_documents[language] += 1
        self.language_tokens[language] += n_tokens
        self.tokens += n_tokens


def _pack_documents(documents: Iterator[Document], tokenizer, eos: int, writers: dict[str, _ShardWriter],
                    val_fraction: float, max_tokens: int | None, fim, fim_rate: float,
                    fim_seed: int) -> _CorpusStats:
    """Tokenize each distinct non-empty document into its split's shards, with a progress bar, until
    `max_tokens`."""
    stats = _CorpusStats()
    seen: set[str] = set()
    pbar = tqdm(desc="tokenizing", unit="tok", unit_scale=True, total=max_tokens, file=sys.stderr)
    for doc in documents:
        if not doc.text.strip():
            continue
        digest = _content_digest(doc.text)
        if digest in seen:
            stats.duplicates += 1
            continue
        seen.add(digest)
        ids, is_fim = document_ids(doc.text, digest, tokenizer, eos, fim, fim_rate, fim_seed)
        split = "val" if is_held_out(digest, val_fraction) else "train"
        writers[split].add(ids)
        stats.add(split, language_of(doc.name), len(ids), is_fim)
        pbar.update(len(ids))
        if max_tokens is not None and stats.tokens >= max_tokens:
            break
    pbar.close()
    return stats


def _corpus_summary(stats: _CorpusStats, writers: dict[str, _ShardWriter], with_fim: bool,
                    val_fraction: float) -> dict[str, Any]:
    """The index's summary; prints (and records) the warning when the held-out split is too small."""
    tokens = {s: sum(sh["tokens"] for sh in w.shards) for s, w in writers.items()}
    langs = stats.language_tokens.most_common()
    summary: dict[str, Any] = {
        "documents": dict(stats.documents),
        "duplicates_removed": stats.duplicates,
        "tokens": tokens,
        "languages": {k: {"documents": stats.language_documents[k], "tokens": stats.language_tokens[k]}
                      for k, _ in langs},
    }
    if with_fim:
        summary["fim_documents"] = dict(stats.fim_documents)
    warning = val_split_warning(stats.documents, tokens, val_fraction)
    if warning:
        summary["warnings"] = [warning]
        _warn(warning)
    return summary


def _write_json_atomically(path: Path, obj: Any) -> None:
    # through a .tmp and a rename, so an interrupted build never leaves a half-written file
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def val_split_warning(docs: Counter, tokens: dict[str, int], val_fraction: float) -> str | None:
    """A warning, with the numbers, when the held-out split is empty or too small to measure anything."""
    n_val, n_docs = docs["val"], docs["val"] + docs["train"]
    t_val, t_all = tokens["val"], tokens["val"] + tokens["train"]
    if val_fraction == 0 or t_val >= MIN_VAL_TOKENS:
        return None
    size = "empty" if n_val == 0 else "tiny"
    head = (f"the held-out (val) split is {size}: {n_val} of {n_docs} documents ({t_val:,} of {t_all:,} tokens) "
            f"were held out at --val-fraction {val_fraction}")
    consequence = ("so training logs no held-out loss and `eval likelihood` has nothing to score" if n_val == 0 else
                   f"fewer than the {MIN_VAL_TOKENS:,} tokens a stable held-out loss needs")
    want = MIN_VAL_TOKENS / max(t_all, 1)
    if want > 0.5:
        fix = f"the corpus ({t_all:,} tokens) is too small for a useful split: add documents"
    else:
        fix = f"raise --val-fraction (to about {_round_up(want)}) or add documents"
    return f"{head}, {consequence}; {fix}"


def _round_up(x: float) -> float:
    """x rounded up to two significant digits (a readable fraction to suggest)."""
    import math

    digits = 1 - math.floor(math.log10(x))
    return math.ceil(x * 10**digits) / 10**digits


def _warn(message: str) -> None:
    tqdm.write(f"warning: {message}", file=sys.stderr)


def read_index(data_dir: str | Path) -> dict[str, Any]:
    f = Path(data_dir) / INDEX
    if not f.is_file():
        raise DiffcoderError(f"{data_dir} is not a built dataset (no {INDEX}); run `diffcoder data build` first")
    return json.loads(f.read_text())


class PackedRows:
    """Fixed-length rows cut from the packed token stream of one split (memory-mapped; rows never cross shards).

    Row order: a fresh seeded permutation per epoch, so the row of global draw k is a pure function of
    (seed, k) and a resumed run reads exactly the rows the uninterrupted one would have.
    """

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, seed: int = 0):
        self.dir = Path(data_dir)
        index = read_index(self.dir)
        self.index, self.seq_len, self.seed = index, seq_len, seed
        self.arrays = [np.memmap(self.dir / sh["file"], dtype=index["dtype"], mode="r")
                       for sh in index["shards"].get(split, [])]
        counts = [a.size // seq_len for a in self.arrays]
        self.starts = np.cumsum([0] + counts)
        self.num_rows = int(self.starts[-1])
        self._perm_epoch, self._perm = -1, None
        if self.num_rows == 0:
            n_tok = sum(a.size for a in self.arrays)
            docs = index.get("summary", {}).get("documents", {}).get(split, 0)
            # More held-out data needs a *higher* val fraction; more training data a lower one.
            more = (f"rebuild with a higher --val-fraction (it was {index.get('val_fraction')})" if split == "val"
                    else f"rebuild with a lower --val-fraction (it was {index.get('val_fraction')})")
            raise DiffcoderError(
                f"split {split!r} of {data_dir} has {n_tok:,} tokens ({docs} documents), fewer than one row of "
                f"seq_len {seq_len}; {more} or a larger corpus, or use a shorter seq_len"
            )

    def row(self, i: int) -> np.ndarray:
        s = int(np.searchsorted(self.starts, i, side="right") - 1)
        off = (i - int(self.starts[s])) * self.seq_len
        return np.asarray(self.arrays[s][off: off + self.seq_len], dtype=np.int64)

    def draw(self, k: int) -> int:
        epoch, j = divmod(k, self.num_rows)
        if epoch != self._perm_epoch:
            g = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = g.permutation(self.num_rows), epoch
        return int(self._perm[j])

    def batch(self, first: int, size: int) -> torch.Tensor:
        """Rows of global draws first .. first+size-1 as int64 [size, seq_len]."""
        return torch.from_numpy(np.stack([self.row(self.draw(k)) for k in range(first, first + size)]))

    def sequential(self, size: int, max_rows: int | None = None) -> Iterator[torch.Tensor]:
        """Fixed evaluation batches in storage order."""
        n = self.num_rows if max_rows is None else min(self.num_rows, max_rows)
        for a in range(0, n, size):
            yield torch.from_numpy(np.stack([self.row(i) for i in range(a, min(n, a + size))]))


# ----------------------------------------------------------------------------------------------- SFT


def mine_instruction_pairs(docs: Iterator[Document], max_pairs: int | None = None,
                           max_answer_chars: int = 1500) -> Iterator[dict[str, Any]]:
    """Instruction pairs from Python source: a function's signature and docstring as the request, the function
    (without its docstring) as the answer — so SFT runs offline on the embedded corpus."""
    n = 0
    for doc in docs:
        if not doc.name.endswith(".py"):
            continue
        try:
            tree = ast.parse(doc.text)
        except (SyntaxError, ValueError):
            continue
        lines = doc.text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.name.startswith("_"):
                continue
            docstring = ast.get_docstring(node)
            body = node.body
            if not docstring or len(body) < 2 or node.end_lineno is None:
                continue
            start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
            sig_end = body[0].lineno - 1  # docstring starts here
            head = lines[start:sig_end]
            rest = lines[body[0].end_lineno: node.end_lineno]
            while rest and not rest[0].strip():  # the blank line the docstring leaves behind
                rest = rest[1:]
            indent = min(len(x) - len(x.lstrip()) for x in head if x.strip())
            code = "\n".join(x[indent:] for x in head + rest).rstrip()
            if len(code) > max_answer_chars or len(rest) < 1:
                continue
            sig = "\n".join(x[indent:] for x in head).strip()
            request = (f"Write a Python function with this signature:\n\n```python\n{sig}\n```\n\n"
                       f"It should do the following:\n{docstring.strip()}")
            answer = f"```python\n{code}\n```"
            yield {"messages": [{"role": "user", "content": request}, {"role": "assistant", "content": answer}]}
            n += 1
            if max_pairs is not None and n >= max_pairs:
                return


def tokenize_chat(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) with the model's chat template: the prompt is every turn before the last
    assistant turn plus the generation prompt; the response is that turn's content through its EOS."""
    if not messages or messages[-1].get("role") != "assistant":
        raise DiffcoderError("an SFT sample's `messages` must end with an assistant turn")
    from diffcoder.chat import chat_prompt_ids, has_chat_template

    if not has_chat_template(tokenizer):
        raise DiffcoderError("the tokenizer has no chat template; SFT needs one (use the model's own tokenizer)")
    prompt = chat_prompt_ids(tokenizer, messages[:-1])
    full = chat_prompt_ids(tokenizer, messages, add_generation_prompt=False)
    if full[: len(prompt)] != prompt:
        raise DiffcoderError("the chat template does not render the prompt as a prefix of the conversation; "
                             "the prompt/response boundary cannot be kept with this template")
    response = full[len(prompt):]
    eos = tokenizer.eos_token_id
    if eos in response:  # drop what the template adds after the turn's EOS (e.g. ChatML's newline)
        response = response[: len(response) - response[::-1].index(eos)]
    else:
        response = response + [eos]
    return prompt, response


def build_sft(
    sources: list[str],
    tokenizer,
    out_dir: str | Path,
    val_fraction: float = 0.02,
    mine: bool = False,
    max_pairs: int | None = None,
    max_files: int | None = None,
    tokenizer_spec: str = "",
    max_prompt_tokens: int | None = None,
) -> dict[str, Any]:
    """Chat JSONL (`messages`) -> sft-{train,val}.jsonl of prompt/response token ids. With mine=True the
    sources are code corpora and pairs are mined from their functions. `max_prompt_tokens` keeps only the last
    that many tokens of a longer prompt (the request and the generation prompt sit at its end)."""
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ConfigError(f"--max-prompt-tokens must be >= 1, got {max_prompt_tokens}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if mine:
        samples = mine_instruction_pairs(iter_documents(sources, max_files=max_files), max_pairs)
    else:
        samples = _chat_records(sources)
    counts = _write_sft_splits(samples, tokenizer, out, val_fraction, max_pairs, max_prompt_tokens)
    _check_sft_splits(counts, sources, val_fraction)
    for s in SFT_FILE:
        os.replace(out / (SFT_FILE[s] + ".tmp"), out / SFT_FILE[s])
    index = {"format": "diffcoder-sft-v1", "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
             "tokenizer": tokenizer_spec, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
             "summary": dict(counts)}
    (out / INDEX).write_text(json.dumps(index, indent=2))
    return index


def _chat_records(sources: list[str]) -> Iterator[dict[str, Any]]:
    for s in sources:
        p = Path(s)
        if not p.is_file():
            raise DiffcoderError(f"SFT source {s} is not a file; give chat JSONL files (or --mine)")
        yield from _iter_jsonl_records(p)


def _write_sft_splits(samples: Iterator[dict[str, Any]], tokenizer, out: Path, val_fraction: float,
                      max_pairs: int | None, max_prompt_tokens: int | None) -> Counter:
    """Tokenize each distinct sample into its split's `.tmp` file, with a progress bar; returns the counts
    (the caller renames the files once the counts pass)."""
    counts: Counter = Counter()
    seen: set[str] = set()
    fhs = {s: open(out / (SFT_FILE[s] + ".tmp"), "w") for s in SFT_FILE}
    try:
        for i, rec in enumerate(tqdm(samples, desc="SFT pairs", unit="pair", file=sys.stderr)):
            if max_pairs is not None and i >= max_pairs:
                break
            digest = _content_digest(json.dumps(rec["messages"], sort_keys=True))
            if digest in seen:
                counts["duplicates_removed"] += 1
                continue
            seen.add(digest)
            prompt, response = tokenize_chat(tokenizer, rec["messages"])
            counts["longest_prompt_tokens"] = max(counts["longest_prompt_tokens"], len(prompt))
            if max_prompt_tokens is not None and len(prompt) > max_prompt_tokens:
                prompt = prompt[-max_prompt_tokens:]
                counts["prompts_truncated"] += 1
            split = "val" if is_held_out(digest, val_fraction) else "train"
            fhs[split].write(json.dumps({"prompt": prompt, "response": response}) + "\n")
            counts[split] += 1
    finally:
        for fh in fhs.values():
            fh.close()
    return counts


def _check_sft_splits(counts: Counter, sources: list[str], val_fraction: float) -> None:
    """An error when nothing was found to train on; a warning when nothing was held out."""
    if not counts["train"]:
        raise DiffcoderError(f"no SFT pairs found in {sources}; check the files (chat JSONL with `messages`)")
    if val_fraction > 0 and not counts["val"]:
        want = min(0.5, _round_up(5 / counts["train"]))
        _warn(f"the held-out (val) split is empty: 0 of {counts['train']} pairs were held out at --val-fraction "
              f"{val_fraction}, so training logs no held-out loss; raise --val-fraction (to about {want}) or add "
              "pairs")


def _iter_jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    for i, rec in _read_jsonl(path):
        if not isinstance(rec.get("messages"), list):
            raise DiffcoderError(f"{path}:{i} has no `messages` list; SFT lines look like "
                                 '{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}')
        yield rec


class SFTRows:
    """SFT samples as rows: prompt (clean, unscored) + response + 1..max_eos trailing EOS (scored), truncated to
    seq_len and right-padded to it with pad tokens that are neither attended-to-as-content nor scored."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, seed: int = 0,
                 min_eos: int = 1, max_eos: int = 4, pad_id: int = 0, warn: Callable[[str], None] | None = None):
        f = Path(data_dir) / SFT_FILE[split]
        if not f.is_file():
            raise DiffcoderError(f"{data_dir} has no {SFT_FILE[split]}; run `diffcoder data sft` first")
        self.samples = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if not self.samples:
            fix = "a higher --val-fraction" if split == "val" else "a lower --val-fraction"
            raise DiffcoderError(f"{f} is empty; rebuild with more SFT pairs or {fix}")
        self.index = read_index(data_dir)
        self.seq_len, self.seed, self.min_eos, self.max_eos, self.pad_id = seq_len, seed, min_eos, max_eos, pad_id
        self.eos = self.index["eos_token_id"]
        self.num_rows = len(self.samples)
        message = self.unscored_warning(split)
        if message:
            (warn or _warn)(message)

    def unscored_warning(self, split: str) -> str | None:
        """Samples whose prompt fills the whole row are cut before their response: they train on nothing."""
        prompts = [len(s["prompt"]) for s in self.samples]
        n = sum(p >= self.seq_len for p in prompts)
        if not n:
            return None
        return (f"{n} of {len(prompts)} SFT samples of the {split} split have prompts of {self.seq_len} tokens "
                f"(data.seq_len) or more, so they are cut before the response and train on nothing (longest "
                f"prompt: {max(prompts)} tokens); rebuild the data with `diffcoder data sft ... "
                f"--max-prompt-tokens {max(1, self.seq_len // 2)}` (keeps the last tokens of each prompt) or raise "
                f"data.seq_len above {max(prompts)}")

    def row(self, i: int, draw: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.samples[i]
        n_eos = random.Random(f"{self.seed}-{draw}").randint(self.min_eos, self.max_eos)
        ids = s["prompt"] + s["response"] + [self.eos] * n_eos
        elig = [False] * len(s["prompt"]) + [True] * (len(ids) - len(s["prompt"]))
        ids, elig = ids[: self.seq_len], elig[: self.seq_len]
        pad = self.seq_len - len(ids)
        return (np.array(ids + [self.pad_id] * pad, dtype=np.int64), np.array(elig + [False] * pad))

    def draw(self, k: int) -> int:
        epoch, j = divmod(k, self.num_rows)
        return int(np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)[j])

    def batch(self, first: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.row(self.draw(k), k) for k in range(first, first + size)]
        return torch.from_numpy(np.stack([r[0] for r in rows])), torch.from_numpy(np.stack([r[1] for r in rows]))

    def sequential(self, size: int, max_rows: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.num_rows if max_rows is None else min(self.num_rows, max_rows)
        for a in range(0, n, size):
            rows = [self.row(i, i) for i in range(a, min(n, a + size))]
            yield torch.from_numpy(np.stack([r[0] for r in rows])), torch.from_numpy(np.stack([r[1] for r in rows]))
