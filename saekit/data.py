"""Text → token windows, with a held-out split that training never sees.

Documents are tokenized without special tokens and joined into one stream with the BOS token between
them; the stream is cut into windows of `ctx_len`, each starting with BOS when `prepend_bos` is set
(what a Llama/GPT-style model saw in training). Counts are in tokens of complete windows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from saekit.config import DataConfig
from saekit.fileutil import HashMemo, file_sha256
from saekit.errors import DataError

_TOKENIZE_BATCH_DOCS = 256

log = logging.getLogger(__name__)


@dataclass
class TokenWindows:
    """Token windows of both splits."""

    train: torch.Tensor  # (n_train_windows, ctx_len) int64
    eval: torch.Tensor  # (n_eval_windows, ctx_len) int64




def _check_file(field_name: str, path_str: str) -> Path:
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise DataError(f"{field_name}: file {path_str} not found; point it at an existing text file")
    return path


def read_text_documents(path: Path, separator: str) -> list[str]:
    """Documents of one local file: a JSON list of strings (or of {"text": ...}), or text split at `separator`."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json":
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"data.paths: {path} is not valid JSON ({exc.msg}); give a JSON list of strings or a .txt") from exc
        if not isinstance(items, list):
            raise DataError(f"data.paths: {path} must hold a JSON list of strings")
        if not all(isinstance(item, str) or (isinstance(item, dict) and isinstance(item.get("text"), str)) for item in items):
            raise DataError(f"data.paths: {path} must hold a JSON list of strings (or of objects with a \"text\" string)")
        docs = [item["text"] if isinstance(item, dict) else item for item in items]
    else:
        docs = raw.split(separator) if separator else [raw]
    return [doc.strip() for doc in docs if doc.strip()]


def _hf_documents(cfg: DataConfig, split: str) -> Iterator[str]:
    """Documents from a HuggingFace dataset split (streamed when `cfg.streaming`)."""
    import datasets

    try:
        dataset = datasets.load_dataset(
            cfg.hf_path, cfg.hf_config, data_files=cfg.hf_data_files, split=split, streaming=cfg.streaming
        )
    except Exception as exc:  # datasets raises many types (connection, missing split, missing files)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(f"data.hf_path={cfg.hf_path} (split {split}): could not load it ({first})") from exc
    for row in dataset:
        if cfg.text_column not in row:
            raise DataError(f"data.text_column={cfg.text_column} is not a column of {cfg.hf_path}; columns: {', '.join(row)}")
        text = row[cfg.text_column]
        if text is not None and not isinstance(text, str):
            raise DataError(f"data.text_column={cfg.text_column} holds {type(text).__name__} values, not text; name a text column")
        if text and text.strip():
            yield text.strip()


def _token_stream(docs: Iterable[str], tokenizer, bos_id: Optional[int], prepend_bos: bool,
                  batch_docs: int = _TOKENIZE_BATCH_DOCS) -> Iterator[list[int]]:
    """Token ids of each document (tokenized `batch_docs` at a time), with BOS between documents."""
    batch: list[str] = []
    first = True

    def flush(texts: list[str]) -> Iterator[list[int]]:
        nonlocal first
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            if prepend_bos and bos_id is not None and not first:
                yield [bos_id] + list(ids)
            else:
                yield list(ids)
            first = False

    for doc in docs:
        batch.append(doc)
        if len(batch) >= batch_docs:
            yield from flush(batch)
            batch = []
    if batch:
        yield from flush(batch)


def make_windows(
    docs: Iterable[str],
    tokenizer,
    bos_id: Optional[int],
    ctx_len: int,
    prepend_bos: bool,
    max_windows: Optional[int] = None,
    batch_docs: int = _TOKENIZE_BATCH_DOCS,
) -> torch.Tensor:
    """Cut the joined token stream into (n_windows, ctx_len) windows; stops early at `max_windows`.

    Documents are pulled from `docs` only as needed (`batch_docs` at a time), so a shared iterator can go on
    to feed the next split.
    """
    if prepend_bos and bos_id is None:
        raise DataError("data.prepend_bos=true but the tokenizer has no BOS token; set data.prepend_bos=false")
    body = ctx_len - 1 if prepend_bos else ctx_len
    windows: list[list[int]] = []
    pending: list[int] = []
    for ids in _token_stream(docs, tokenizer, bos_id, prepend_bos, batch_docs):
        pending.extend(ids)
        while len(pending) >= body:
            chunk, pending = pending[:body], pending[body:]
            windows.append(([bos_id] if prepend_bos else []) + chunk)
            if max_windows is not None and len(windows) >= max_windows:
                return torch.tensor(windows, dtype=torch.long)
    if not windows:
        return torch.empty((0, ctx_len), dtype=torch.long)
    return torch.tensor(windows, dtype=torch.long)


def _windows_for(n_tokens: Optional[int], ctx_len: int) -> Optional[int]:
    return None if n_tokens is None else -(-n_tokens // ctx_len)


def _require_tokens(windows: torch.Tensor, wanted: Optional[int], setting: str, where: str) -> torch.Tensor:
    have = windows.numel()
    if wanted is not None and have < wanted:
        raise DataError(f"{setting}={wanted} but {where} holds only {have} tokens in complete windows; lower {setting} or add text")
    if have == 0:
        raise DataError(f"{where} holds no complete window of tokens; add text or lower data.ctx_len")
    return windows


def _text_file_splits(cfg: DataConfig) -> tuple[list[str], list[str]]:
    train_paths = [_check_file("data.paths", p) for p in cfg.paths]
    eval_paths = [_check_file("data.eval_paths", p) for p in cfg.eval_paths]
    train_docs = [doc for p in train_paths for doc in read_text_documents(p, cfg.doc_separator)]
    if eval_paths:
        eval_docs = [doc for p in eval_paths for doc in read_text_documents(p, cfg.doc_separator)]
    else:
        # Hold out the last documents, so the split never depends on the token budget.
        n_held = max(1, int(round(len(train_docs) * cfg.eval_fraction)))
        if len(train_docs) < 2:
            raise DataError(f"data.paths holds {len(train_docs)} document(s); need at least 2 to hold some out, or set data.eval_paths")
        train_docs, eval_docs = train_docs[:-n_held], train_docs[-n_held:]
    return train_docs, eval_docs


def train_tokens_asked(cfg: DataConfig, n_tokens: int) -> Optional[int]:
    """Training tokens to cache: the explicit setting, else all of a local text, else `n_tokens` of a dataset."""
    if cfg.n_train_tokens is not None:
        return cfg.n_train_tokens
    return None if cfg.source == "text_files" else n_tokens


def data_fingerprint(cfg: DataConfig, n_tokens: int, memo: Optional[HashMemo] = None) -> dict:
    """Everything that decides the token windows, without tokenizing: file hashes and settings.

    With a `memo`, files whose stat signature is unchanged are not hashed again.
    """
    if cfg.source == "text_files":
        # Content, not location: the same files elsewhere give the same key.
        source: dict = {
            "train_files": [file_sha256(_check_file("data.paths", p), memo) for p in cfg.paths],
            "eval_files": [file_sha256(_check_file("data.eval_paths", p), memo) for p in cfg.eval_paths],
        }
    else:
        source = {"hf_path": cfg.hf_path, "hf_config": cfg.hf_config, "hf_data_files": cfg.hf_data_files,
                  "split": cfg.split, "eval_split": cfg.eval_split}
        for data_file in cfg.hf_data_files or []:
            if Path(data_file).is_file():
                source.setdefault("file_sha256", {})[data_file] = file_sha256(Path(data_file), memo)
    return {
        "source": source,
        "ctx_len": cfg.ctx_len,
        "prepend_bos": cfg.prepend_bos,
        "doc_separator": cfg.doc_separator,
        "eval_fraction": cfg.eval_fraction,
        "text_column": cfg.text_column,
        "n_train_tokens": train_tokens_asked(cfg, n_tokens),
        "n_eval_tokens": cfg.n_eval_tokens,
    }


def whole_corpus(cfg: DataConfig) -> DataConfig:
    """`cfg` with all of its text as the evaluation split: a corpus the SAE never trained on has nothing to hold
    out, so its first 90% need not be thrown away (held-out files or an eval split named explicitly are kept)."""
    if cfg.source == "text_files":
        return dataclasses.replace(cfg, eval_paths=list(cfg.eval_paths or cfg.paths))
    return dataclasses.replace(cfg, eval_split=cfg.eval_split or cfg.split)


def evaluates_whole_corpus(cfg: DataConfig) -> bool:
    """Whether the evaluation split is all of the training text (what `whole_corpus` makes)."""
    if cfg.source == "text_files":
        return bool(cfg.eval_paths) and list(cfg.eval_paths) == list(cfg.paths)
    return cfg.eval_split is not None and cfg.eval_split == cfg.split


def same_corpus(data: DataConfig, trained: DataConfig) -> bool:
    """Whether `data` is the text an SAE was trained with `trained` on (by content, so moved files still match)."""
    mine = data_fingerprint(data, 0)["source"]
    try:
        theirs = data_fingerprint(trained, 0)["source"]
    except DataError:  # the training files are gone or moved: only their names are left to compare
        same = data.source == trained.source and [Path(p).name for p in data.paths] == [Path(p).name for p in trained.paths]
        log.warning("the training text of this SAE is not where it was; %s", "matched by file name" if same else
                    "evaluating on all of the given text")
        return same
    return mine == theirs


def load_windows(cfg: DataConfig, tokenizer, bos_id: Optional[int], n_tokens: int) -> TokenWindows:
    """Token windows for the train and eval splits as `cfg` describes (`n_tokens`: the training budget)."""
    n_train = train_tokens_asked(cfg, n_tokens)
    train_max = _windows_for(n_train, cfg.ctx_len)
    eval_max = _windows_for(cfg.n_eval_tokens, cfg.ctx_len)
    if cfg.source == "text_files":
        train_docs, eval_docs = _text_file_splits(cfg)
        where_train, where_eval = "the training text (data.paths)", "the held-out text"
        if evaluates_whole_corpus(cfg):
            where_eval = "the evaluation text (data.paths)"
    else:
        where_train, where_eval = f"{cfg.hf_path}:{cfg.split}", f"{cfg.hf_path}:{cfg.eval_split or cfg.split}"
        if cfg.eval_split:
            train_docs, eval_docs = _hf_documents(cfg, cfg.split), _hf_documents(cfg, cfg.eval_split)
        else:
            # One pass: the first documents are held out, the rest train. One document at a time for the
            # held-out part, so no document read past the held-out windows is lost to training.
            stream = _hf_documents(cfg, cfg.split)
            eval_windows = make_windows(stream, tokenizer, bos_id, cfg.ctx_len, cfg.prepend_bos, eval_max, batch_docs=1)
            train_windows = make_windows(stream, tokenizer, bos_id, cfg.ctx_len, cfg.prepend_bos, train_max)
            return _finish(cfg, train_windows, eval_windows, where_train, where_eval)
    eval_windows = make_windows(eval_docs, tokenizer, bos_id, cfg.ctx_len, cfg.prepend_bos, eval_max)
    train_windows = make_windows(train_docs, tokenizer, bos_id, cfg.ctx_len, cfg.prepend_bos, train_max)
    return _finish(cfg, train_windows, eval_windows, where_train, where_eval)


def _finish(cfg: DataConfig, train_windows, eval_windows, where_train: str, where_eval: str) -> TokenWindows:
    # Only an explicit data.n_train_tokens is an error when short; by default all the text is used.
    _require_tokens(train_windows, cfg.n_train_tokens, "data.n_train_tokens", where_train)
    if evaluates_whole_corpus(cfg):
        # Evaluating on a whole corpus: data.n_eval_tokens is a cap (a default larger than the text is no mistake).
        _require_tokens(eval_windows, None, "data.n_eval_tokens", where_eval)
        if eval_windows.numel() < cfg.n_eval_tokens:
            log.info("%s holds %d tokens in complete windows (data.n_eval_tokens=%d): evaluating on all of them",
                     where_eval, eval_windows.numel(), cfg.n_eval_tokens)
    else:
        _require_tokens(eval_windows, cfg.n_eval_tokens, "data.n_eval_tokens", where_eval)
    return TokenWindows(train=train_windows, eval=eval_windows)
