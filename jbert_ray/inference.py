"""The one inference core: fill-mask and pseudo-log-likelihood (PLL) scoring with a loaded model directory.

PLL follows Salazar et al. 2020, "Masked Language Model Scoring" (mask each token in turn, sum log p(token));
the "pll-word-l2r" variant also masks the rest of the token's MeCab word to its right (Kauf & Ivanova 2023,
"A Better Way to Do Masked Language Model Scoring"); "pll-strided" masks every k-th token at once and reads
them all, so a text costs k forward passes instead of one per token (bench/score_methods.py measures how close
it stays). Masked copies of many texts are bucketed by length and packed into large batches, and the output
layer runs only at the positions read. Serve replicas and the offline scorer
both use `MaskedLM`, so this module alone decides what the model predicts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from typing_extensions import TypedDict  # pydantic reads it on Python < 3.12 (the Serve schema)

from jbert_ray.errors import UserError
from jbert_ray.text import TextConfig, clean_text
from jbert_ray.tokenizer import Encoding, JapaneseTokenizer

PLL_METHODS = ("pll", "pll-word-l2r", "pll-strided")
LONG_TEXT_POLICIES = ("window", "error")


class Candidate(TypedDict):
    token: str  # the piece without the "##" continuation prefix
    token_id: int
    score: float  # softmax probability over the whole vocabulary (as transformers' fill-mask pipeline)


class TextScore(TypedDict):
    pll: float  # sum of token_pll (natural log); 0.0 for a text without tokens
    pll_per_token: float | None  # pll / n_tokens: comparable across lengths (None without tokens)
    n_tokens: int  # tokens scored ([CLS]/[SEP] excluded)
    unk_rate: float  # share of [UNK] tokens: high means the vocabulary does not fit the text
    token_pll: list[float]  # log p(token | rest) per token, in text order
    tokens: list[str]  # the WordPiece pieces scored, as in the vocabulary ("##" kept)


@dataclass(frozen=True)
class InferenceConfig:
    max_batch_tokens: int = 0  # padded tokens (B × T) per forward; 0 = 8192 on CPU, 65536 on GPU
    max_batch_size: int = 512  # sequences per forward, whatever their length
    long_text: str = (
        "window"  # longer than max_length: "window" (sliding windows) or "error" (TextTooLongError)
    )
    window_stride: int = 0  # tokens between window starts; 0 = half a window (every token keeps ≥ ¼ context)
    max_length: int = 0  # tokens incl. [CLS]/[SEP]; 0 = min(model max positions, tokenizer model_max_length)
    mask_stride: int = 8  # "pll-strided": passes per window, each masking every k-th token (bench/score_methods.py)

    def __post_init__(self):
        if self.long_text not in LONG_TEXT_POLICIES:
            raise UserError(f"long_text={self.long_text!r}; use one of {LONG_TEXT_POLICIES}")
        if min(self.max_batch_tokens, self.max_batch_size - 1, self.window_stride, self.max_length) < 0:
            raise UserError("max_batch_tokens, window_stride and max_length must be ≥ 0, max_batch_size ≥ 1")
        if self.mask_stride < 1:
            raise UserError(f"mask_stride must be ≥ 1 (1 masks all tokens in one pass), not {self.mask_stride}")


class TextTooLongError(UserError):
    """A text has more tokens than the model takes, and the long-text policy is "error"."""


@dataclass(frozen=True)
class _Copy:
    seq: int  # index into the list of distinct input sequences
    mask_at: tuple[int, ...]  # positions set to [MASK] in this copy
    read_at: tuple[int, ...]  # positions whose output distribution is computed


class MaskedLM:
    """A masked LM (BERT or ModernBERT) and its tokenizer, loaded once; batched fill-mask and PLL scoring."""

    def __init__(
        self,
        model,
        tokenizer: JapaneseTokenizer,
        config: InferenceConfig = InferenceConfig(),
        model_dir: str | None = None,
    ):
        import torch

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.model_dir = model_dir
        self.device = next(model.parameters()).device
        self.vocab_size = tokenizer.vocab_size
        positions = model.config.max_position_embeddings
        self.max_length = min(config.max_length or positions, positions, tokenizer.model_max_length)
        if self.max_length < 3:
            raise UserError(
                f"max_length {self.max_length} leaves no room for a token between [CLS] and [SEP]"
            )
        on_gpu = self.device.type != "cpu"
        self.max_batch_tokens = max(config.max_batch_tokens or (65536 if on_gpu else 8192), self.max_length)
        self._torch = torch

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike,
        device: str = "auto",
        dtype=None,
        config: InferenceConfig = InferenceConfig(),
    ) -> MaskedLM:
        """Load a model directory (ours or a Tohoku-style HF Japanese BERT) on "cpu", "cuda" or "auto".

        model_dir: a local path, or a URI (s3://…) fetched once per node into a local cache (`storage.local_copy`).

        dtype: None/"float32" (default), "bfloat16" or "float16" weights; "auto" = bfloat16 on CUDA and on
        CPUs with native bf16 (AVX512-BF16, AMX), else float32 (emulated bf16 is slower), as pretraining decides.
        Log-softmax runs in float32 anyway.
        """
        from jbert_ray.checkpoint import load_model_dir, resolve_device
        from jbert_ray.storage import is_uri, local_copy

        if dtype == "auto":
            dtype = auto_dtype(resolve_device(device))
        model, tokenizer = load_model_dir(local_copy(model_dir), device=device, dtype=dtype)
        location = str(model_dir) if is_uri(model_dir) else os.path.abspath(model_dir)
        return cls(model, tokenizer, config, model_dir=location)

    @staticmethod
    def clean(text: str) -> tuple[str, str]:
        """(the text as scored, "") or ("", why it cannot be): control characters, NFKC, empty, binary, surrogates.

        Serve and the offline scorer both clean through here, so a text gets the same record either way."""
        return clean_text(text, TextConfig(require_japanese=False))

    def encode(self, texts: Sequence[str]) -> list[Encoding]:
        """Token ids and word starts with [CLS]/[SEP] (NFKC and MeCab as the tokenizer directory says)."""
        return self.tokenizer.encode_batch(texts)

    # ---- fill-mask ----

    def fill_mask(
        self, texts: Sequence[str], top_k: int = 5, targets: Sequence[str] | None = None
    ) -> list[list[list[Candidate]]]:
        """For every [MASK] of every text, the top_k tokens by probability (a text without [MASK] gives []).

        targets: rank only these candidates (as the fill-mask pipeline's `targets`; at most top_k of them)."""
        if not 1 <= top_k <= self.vocab_size:
            raise UserError(f"top_k must be between 1 and the vocabulary size {self.vocab_size}, not {top_k}")
        texts = _as_texts(texts)
        target_ids = None if targets is None else self.target_ids(targets)
        encodings = self.encode(texts)
        sequences, copies, owners = [], [], []  # owners[c] = (text index, mask index of the first read)
        for text_index, encoding in enumerate(encodings):
            content = encoding.ids[1:-1]
            masks = [i for i, token_id in enumerate(content) if token_id == self.tokenizer.mask_token_id]
            for start, read in self._fill_mask_windows(text_index, content, masks):
                sequences.append(self._with_specials(content[start : start + self.max_length - 2]))
                copies.append(_Copy(len(sequences) - 1, (), tuple(p - start + 1 for p in read)))
                owners.append((text_index, masks.index(read[0])))
        mask_id = self.tokenizer.mask_token_id
        results: list[list[list[Candidate]]] = [[[] for i in e.ids if i == mask_id] for e in encodings]
        for copy_indices, logits, offsets in self._logits_at(sequences, copies):
            probs = self._torch.softmax(logits, dim=-1)  # over the whole vocabulary, targets or not
            if target_ids is None:
                probs, ids = probs.topk(top_k, dim=-1)  # (M, k)
            else:
                chosen = self._torch.tensor(target_ids, device=probs.device)
                probs, at = probs[:, chosen].topk(min(top_k, len(target_ids)), dim=-1)
                ids = chosen[at]
            probs, ids = probs.tolist(), ids.tolist()
            for copy_index, offset in zip(copy_indices, offsets):
                text_index, first_mask = owners[copy_index]
                for j in range(len(copies[copy_index].read_at)):
                    results[text_index][first_mask + j] = [
                        Candidate(token=self._piece(i), token_id=i, score=p)
                        for i, p in zip(ids[offset + j], probs[offset + j])
                    ]
        return results

    def target_ids(self, targets: Sequence[str]) -> list[int]:
        """Vocabulary ids of fill-mask targets: a piece as spelled ("##" optional), else the first token of its
        tokenization (as the pipeline does); one that maps to [UNK] is a UserError."""
        if isinstance(targets, str) or not targets:
            raise UserError("targets must be a non-empty list of strings")
        ids: dict[int, None] = {}  # in order, without repeats
        for target in targets:
            vocab = self.tokenizer.token_to_id
            found = vocab.get(target, vocab.get(f"##{target}"))
            if found is None:
                content = self.tokenizer.encode(target, add_special_tokens=False).ids
                found = content[0] if content else self.tokenizer.unk_token_id
            if found == self.tokenizer.unk_token_id or found in self.tokenizer.special_ids:
                raise UserError(f"target {target!r} is not in the vocabulary")
            ids[found] = None
        return list(ids)

    def _fill_mask_windows(self, text_index: int, content: list[int], masks: list[int]):
        """(window start, mask positions read in that window) for one text's content tokens."""
        width = self.max_length - 2
        if not masks:
            return []
        if len(content) <= width:
            return [(0, masks)]
        self._check_long(text_index, len(content))
        windows: dict[int, list[int]] = {}
        for p in masks:  # each [MASK] is read in a window centred on it; the other [MASK]s stay masked
            windows.setdefault(min(max(p - width // 2, 0), len(content) - width), []).append(p)
        return sorted(windows.items())

    # ---- pseudo-log-likelihood ----

    def score(self, texts: Sequence[str], method: str = "pll") -> list[TextScore]:
        """PLL of each text: mask each token in turn ("pll"; "pll-word-l2r" also masks the rest of its word),
        or every mask_stride-th token at once ("pll-strided": mask_stride passes per window, all read)."""
        if method not in PLL_METHODS:
            raise UserError(f"unknown scoring method {method!r}; use one of {PLL_METHODS}")
        texts = _as_texts(texts)
        encodings = self.encode(texts)
        width, stride = self.max_length - 2, self.config.mask_stride
        sequences, copies, targets, owners = [], [], [], []  # per read: target id, (text index, token index)
        first_read = []  # first_read[c] = index of copy c's first read in targets/owners
        for text_index, encoding in enumerate(encodings):
            content, starts = encoding.ids[1:-1], encoding.word_start[1:-1]
            word_end = _word_ends(starts) if method == "pll-word-l2r" else range(1, len(content) + 1)
            for start, tokens in self._score_windows(text_index, len(content)):
                sequences.append(self._with_specials(content[start : start + width]))
                shift = 1 - start  # content position → position in the window's sequence (after [CLS])
                for masked, read in _masked_copies(method, tokens, word_end, start + width, stride):
                    at = tuple(p + shift for p in masked), tuple(p + shift for p in read)
                    copies.append(_Copy(len(sequences) - 1, *at))
                    first_read.append(len(targets))
                    targets += [content[j] for j in read]
                    owners += [(text_index, j) for j in read]
        token_pll = [[0.0] * (len(e.ids) - 2) for e in encodings]
        target_ids = self._torch.tensor(targets, dtype=self._torch.long, device=self.device)
        for copy_indices, logits, _ in self._logits_at(sequences, copies):
            # logits rows follow the batch's copies, each copy's reads in order
            reads = [first_read[c] + i for c in copy_indices for i in range(len(copies[c].read_at))]
            log_probs = self._torch.log_softmax(logits, dim=-1)  # (M, V)
            index = self._torch.as_tensor(reads, device=self.device)
            picked = log_probs.gather(1, target_ids[index].unsqueeze(1)).squeeze(1).tolist()
            for read, value in zip(reads, picked):
                text_index, j = owners[read]
                token_pll[text_index][j] = value
        return [self._text_score(values, e.ids[1:-1]) for values, e in zip(token_pll, encodings)]

    def _text_score(self, token_pll: list[float], ids: list[int]) -> TextScore:
        pll, n_tokens = float(sum(token_pll)), len(token_pll)
        return TextScore(
            pll=pll,
            pll_per_token=pll / n_tokens if n_tokens else None,
            n_tokens=n_tokens,
            unk_rate=ids.count(self.tokenizer.unk_token_id) / n_tokens if n_tokens else 0.0,
            token_pll=token_pll,
            tokens=self.tokenizer.convert_ids_to_tokens(ids),
        )

    def _score_windows(self, text_index: int, length: int) -> list[tuple[int, list[int]]]:
        """(window start, content positions scored in it): each token once, in the window where it is most central."""
        width = self.max_length - 2
        if length <= width:
            return [(0, list(range(length)))] if length else []
        self._check_long(text_index, length)
        stride = min(self.config.window_stride or max(width // 2, 1), width)
        starts = list(range(0, length - width, stride)) + [length - width]
        owned: dict[int, list[int]] = {s: [] for s in starts}
        for j in range(length):
            owned[min(starts, key=lambda s: (abs(s + (width - 1) / 2 - j), s))].append(j)
        return [(s, tokens) for s, tokens in owned.items() if tokens]

    # ---- the batched forward ----

    def _logits_at(
        self, sequences: list[list[int]], copies: list[_Copy]
    ) -> Iterator[tuple[list[int], object, list[int]]]:
        """Yield (copy indices, float32 logits at their read positions (M, V), row offset of each copy).

        Copies are sorted by length and packed under max_batch_tokens (length bucketing), so padding stays small;
        the encoder runs on whole sequences, the MLM head only on the M rows read.
        """
        from jbert_ray.model import encoder_and_head

        torch = self._torch
        encoder, head = encoder_and_head(self.model)
        order = sorted(range(len(copies)), key=lambda c: (len(sequences[copies[c].seq]), copies[c].seq))
        with torch.inference_mode():
            for batch in self._buckets(order, [len(sequences[c.seq]) for c in copies]):
                width = len(sequences[copies[batch[-1]].seq])
                input_ids = np.full((len(batch), width), self.tokenizer.pad_token_id, dtype=np.int64)
                attention_mask = np.zeros((len(batch), width), dtype=np.int64)
                rows, cols, offsets = [], [], []
                for b, c in enumerate(batch):
                    copy = copies[c]
                    sequence = sequences[copy.seq]
                    input_ids[b, : len(sequence)] = sequence
                    attention_mask[b, : len(sequence)] = 1
                    input_ids[b, list(copy.mask_at)] = self.tokenizer.mask_token_id
                    offsets.append(len(rows))
                    rows.extend([b] * len(copy.read_at))
                    cols.extend(copy.read_at)
                hidden = encoder(
                    input_ids=torch.from_numpy(input_ids).to(self.device),
                    attention_mask=torch.from_numpy(attention_mask).to(self.device),
                ).last_hidden_state  # (B, T, H)
                picked = hidden[
                    torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)
                ]
                yield batch, head(picked).float(), offsets  # (M, V)

    def _buckets(self, order: list[int], lengths: list[int]) -> Iterator[list[int]]:
        batch: list[int] = []
        for c in order:  # ascending length: the copy being added is the longest so far
            if batch and (
                (len(batch) + 1) * lengths[c] > self.max_batch_tokens
                or len(batch) >= self.config.max_batch_size
            ):
                yield batch
                batch = []
            batch.append(c)
        if batch:
            yield batch

    # ---- helpers ----

    def _with_specials(self, content: list[int]) -> list[int]:
        return [self.tokenizer.cls_token_id, *content, self.tokenizer.sep_token_id]

    def _piece(self, token_id: int) -> str:
        token = self.tokenizer.vocab[token_id] if token_id < self.vocab_size else "[UNK]"
        return token[2:] if token.startswith("##") and len(token) > 2 else token

    def _check_long(self, text_index: int, length: int) -> None:
        if self.config.long_text == "error":
            raise TextTooLongError(
                f"text {text_index} has {length + 2} tokens; the model takes at most {self.max_length} "
                "(shorten it, or use long_text='window')"
            )


def check_model_location(location: str | os.PathLike) -> str:
    """The model dir as workers on any node load it: an absolute path, or a URI with AWS_ENDPOINT_URL passed on.

    Runs on the driver before Ray starts: a remote dir is fetched into this node's cache and checked there, so a
    missing bucket or dir, an unreachable endpoint or a dir that is no model is one UserError line."""
    from jbert_ray.checkpoint import check_model_dir
    from jbert_ray.storage import Store, endpoint_uri, is_uri, local_copy

    if not is_uri(location):
        return str(check_model_dir(location).resolve())
    uri = endpoint_uri(str(location))
    Store(uri).check_readable("model directory")
    cached = local_copy(uri)
    try:
        check_model_dir(cached)
    except UserError as error:  # name the URI the user gave, not this node's cache
        raise UserError(str(error).replace(str(cached), str(location))) from None
    return uri


def _as_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise UserError("pass a list of texts, not a single string")
    texts = list(texts)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise UserError(f"text {bad} is a {type(texts[bad]).__name__}, not a string")
    return texts


def auto_dtype(device: str) -> str | None:
    """"bfloat16" where the device computes bf16 natively (pretraining's test), else None (float32)."""
    import torch

    from jbert_ray.pretrain.step import has_native_bf16

    return "bfloat16" if has_native_bf16(torch.device(device)) else None


def _masked_copies(
    method: str, tokens: list[int], word_end: Sequence[int], window_end: int, stride: int
) -> list[tuple[Sequence[int], list[int]]]:
    """(content positions masked, positions read) per copy of a window; `tokens`: the positions it owns."""
    if method == "pll-strided":  # pass r masks tokens r, r+k, r+2k, …: each token is masked in one pass
        return [(tokens[r::stride], tokens[r::stride]) for r in range(min(stride, len(tokens)))]
    return [(range(j, min(word_end[j], window_end)), [j]) for j in tokens]


def _word_ends(word_start: list[bool]) -> list[int]:
    """For each token, the index one past the last piece of its word."""
    ends = [0] * len(word_start)
    end = len(word_start)
    for i in range(len(word_start) - 1, -1, -1):
        ends[i] = end
        if word_start[i]:
            end = i
    return ends
