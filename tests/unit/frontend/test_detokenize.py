from __future__ import annotations

import random
from typing import Any

import pytest

from tandem.frontend.detokenize import (
    REPLACEMENT,
    IncrementalDetokenizer,
    StopStrings,
    TextStream,
    byte_table,
)

MULTIBYTE = "héllo 日本語 ok 🙂! ça va — naïve"


@pytest.fixture(params=["table", "stream", "python"])
def make_detok(request: pytest.FixtureRequest, hf_tokenizer: Any) -> Any:
    """The byte table (the tiny model's tokenizer is byte-level BPE), `DecodeStream`, and Python."""
    kind = request.param
    return lambda: IncrementalDetokenizer(
        hf_tokenizer, force_python=kind == "python", force_stream=kind == "stream"
    )


def _feed(detok: IncrementalDetokenizer, ids: list[int], sizes: list[int]) -> list[str]:
    deltas, i = [], 0
    for n in sizes:
        deltas.append(detok.step(ids[i : i + n]))
        i += n
    deltas.append(detok.flush())
    return deltas


def test_multibyte_split_across_tokens_is_held_back(make_detok: Any, hf_tokenizer: Any) -> None:
    ids = hf_tokenizer(MULTIBYTE, add_special_tokens=False)["input_ids"]
    # The tiny byte-level BPE splits every non-ASCII character over several byte tokens.
    assert any(REPLACEMENT in hf_tokenizer.decode([i]) for i in ids)
    deltas = _feed(make_detok(), ids, [1] * len(ids))
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) == MULTIBYTE
    assert "" in deltas  # some steps completed no character


def test_deltas_concatenate_to_full_decode_for_any_ids(make_detok: Any, hf_tokenizer: Any) -> None:
    rng = random.Random(1)
    vocab = len(hf_tokenizer)
    for _ in range(20):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        sizes = []
        left = len(ids)
        while left:
            sizes.append(min(left, rng.randrange(1, 4)))
            left -= sizes[-1]
        deltas = _feed(make_detok(), ids, sizes)
        assert "".join(deltas) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_byte_table_decodes_every_id_as_the_tokenizer_does(hf_tokenizer: Any) -> None:
    table = byte_table(hf_tokenizer)
    assert table is not None and table is byte_table(hf_tokenizer)  # built once
    assert len(table) == len(hf_tokenizer)
    for i in range(len(table)):
        assert table[i].decode("utf-8", "replace") == hf_tokenizer.decode([i], skip_special_tokens=True)
    # Long runs of raw byte tokens: invalid and cut-off UTF-8 is replaced as `tokenizers` does.
    byte_ids = [i for i in range(len(table)) if len(table[i]) == 1 and table[i][0] >= 0x80]
    rng = random.Random(2)
    for _ in range(200):
        ids = [rng.choice(byte_ids) for _ in range(rng.randrange(1, 12))]
        detok = IncrementalDetokenizer(hf_tokenizer)
        text = "".join(detok.step([i]) for i in ids) + detok.flush()
        assert text == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_byte_table_takes_added_plain_text_tokens_as_utf8(tiny_dir: Any) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir), local_files_only=True)
    tokenizer.add_tokens(["ça va", "Ġplain"])  # not special: decoded as text
    table = byte_table(tokenizer)
    assert table is not None
    for i in range(len(tokenizer) - 2, len(tokenizer)):
        assert table[i].decode() == tokenizer.decode([i], skip_special_tokens=True)


def test_no_byte_table_for_other_decoders() -> None:
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "##lo": 2}, unk_token="[UNK]"))
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert byte_table(tokenizer) is None
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.step([1]) + detok.step([2]) + detok.flush() == tokenizer.decode([1, 2])


def test_no_delta_ends_inside_a_character(make_detok: Any, hf_tokenizer: Any) -> None:
    ids = hf_tokenizer("日本" * 5, add_special_tokens=False)["input_ids"]
    detok = make_detok()
    for i in ids:
        assert not detok.step([i]).endswith(REPLACEMENT)


def test_special_tokens_are_skipped(make_detok: Any, hf_tokenizer: Any) -> None:
    ids = [1, *hf_tokenizer("hi", add_special_tokens=False)["input_ids"], 2]
    assert "".join(_feed(make_detok(), ids, [1] * len(ids))) == "hi"


def test_trailing_incomplete_character_is_flushed_at_the_end(make_detok: Any, hf_tokenizer: Any) -> None:
    ids = hf_tokenizer("a日", add_special_tokens=False)["input_ids"][:-1]
    detok = make_detok()
    text = "".join(detok.step([i]) for i in ids)
    assert text == "a"
    assert detok.flush() == hf_tokenizer.decode(ids)[1:]


def _run_stops(stops: list[str], chunks: list[str]) -> tuple[str, bool]:
    s = StopStrings(stops)
    out = []
    for c in chunks:
        text, stopped = s.feed(c)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + s.flush(), False


@pytest.mark.parametrize(
    ("stops", "chunks", "expected", "stopped"),
    [
        (["END"], ["abc", "E", "N", "D", "xyz"], "abc", True),
        (["END"], ["abcEN", "Dxyz"], "abc", True),
        (["END"], ["abcEN", "x"], "abcENx", False),
        (["END"], ["abcE"], "abcE", False),
        (["aab"], ["a", "a", "a", "b"], "a", True),
        (["\n\n", "STOP"], ["one\n", "two ST", "OP"], "one\ntwo ", True),
        (["\n\n", "STOP"], ["one\n", "\ntwo"], "one", True),
        (["xy", "y"], ["ay"], "a", True),
    ],
)
def test_stop_strings_across_chunks(
    stops: list[str], chunks: list[str], expected: str, stopped: bool
) -> None:
    assert _run_stops(stops, chunks) == (expected, stopped)


def test_stop_strings_release_text_that_cannot_start_a_stop() -> None:
    s = StopStrings(["STOP"])
    assert s.feed("hello S") == ("hello ", False)
    assert s.feed("x") == ("Sx", False)


def test_text_stream_stop_string_split_over_tokens(hf_tokenizer: Any) -> None:
    ids = hf_tokenizer("The capital of France is Paris.", add_special_tokens=False)["input_ids"]
    ts = TextStream(hf_tokenizer, stop=["France"])
    out = []
    for i in ids:
        text, stopped = ts.push([i])
        out.append(text)
        if stopped:
            break
    assert stopped and "".join(out) == "The capital of "


def test_text_stream_min_tokens_delays_stop_strings(hf_tokenizer: Any) -> None:
    ids = hf_tokenizer("a b a b", add_special_tokens=False)["input_ids"]
    ts = TextStream(hf_tokenizer, stop=["a"], min_tokens=2)
    texts = [ts.push([i]) for i in ids]
    assert texts[0] == ("a", False)
    assert any(stopped for _, stopped in texts[2:])
