import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgolf.bpb import bits_per_byte, build_byte_tables, check_tokenizer, load_tokenizer, tokenizer_problems
from pgolf.errors import InvalidInput
from tests.shared_data import SP1024, SP8192, fineweb_docs, need

MODELS = {"sp1024": SP1024, "sp8192": SP8192}


@pytest.fixture(scope="module", params=sorted(MODELS))
def tokenizer(request):
    sp = load_tokenizer(need(MODELS[request.param]))
    return sp, build_byte_tables(sp)


def table_bytes(tables, ids) -> int:
    return tables.count_bytes(np.array([1, *ids], dtype=np.int64))


def test_every_real_document_counts_its_decoded_utf8_bytes(tokenizer):
    sp, tables = tokenizer
    docs = fineweb_docs()
    assert len(docs) == 200
    for text in docs:
        ids = sp.encode(text)
        assert table_bytes(tables, ids) == len(sp.decode(ids).encode("utf-8"))


def test_a_stream_of_documents_counts_each_documents_bytes(tokenizer):
    # BOS between documents is a boundary: the next document's leading space (if any) is not counted.
    sp, tables = tokenizer
    docs = fineweb_docs()[:20]
    stream = [t for text in docs for t in [1, *sp.encode(text)]]
    expected = sum(len(sp.decode(sp.encode(text)).encode("utf-8")) for text in docs)
    assert tables.count_bytes(np.array(stream)) == expected


@settings(max_examples=300, deadline=None)
@given(text=st.text(min_size=0, max_size=200))
def test_arbitrary_unicode_counts_its_decoded_utf8_bytes(text):
    for path in MODELS.values():
        sp = _cached(path)
        ids = sp.encode(text)
        assert table_bytes(_tables(path), ids) == len(sp.decode(ids).encode("utf-8"))


_cache: dict = {}


def _cached(path):
    if path not in _cache:
        sp = load_tokenizer(need(path))
        _cache[path] = (sp, build_byte_tables(sp))
    return _cache[path][0]


def _tables(path):
    return _cache[path][1]


def test_table_rules_match_reference(tokenizer):
    sp, tables = tokenizer
    for token_id in range(sp.GetPieceSize()):
        piece = sp.IdToPiece(token_id)
        if sp.IsControl(token_id) or sp.IsUnknown(token_id) or sp.IsUnused(token_id):
            assert tables.is_boundary[token_id] and tables.base_bytes[token_id] == 0
        elif sp.IsByte(token_id):
            assert tables.base_bytes[token_id] == 1 and not tables.has_leading_space[token_id]
        else:
            assert tables.has_leading_space[token_id] == piece.startswith("\u2581")
            assert tables.base_bytes[token_id] == len(piece.removeprefix("\u2581").encode())
    space = sp.PieceToId("\u2581")
    # The space byte is added only after a non-boundary token.
    assert tables.token_bytes([1], [space])[0] == 0
    assert tables.token_bytes([space], [space])[0] == 1


def test_ids_beyond_the_model_are_zero_byte_boundaries():
    sp = load_tokenizer(need(SP1024))
    tables = build_byte_tables(sp, table_size=1100)
    assert tables.size == 1100 and tables.is_boundary[1024:].all() and not tables.base_bytes[1024:].any()


def test_real_tokenizers_pass_the_self_test():
    for path in MODELS.values():
        assert tokenizer_problems(load_tokenizer(need(path))) == []


def _train_tokenizer(tmp_path, **overrides):
    import sentencepiece as spm

    settings_ = dict(
        model_type="bpe", vocab_size=300, byte_fallback=True, character_coverage=0.999, split_digits=True,
        normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        hard_vocab_limit=False,
    )
    settings_.update(overrides)
    prefix = tmp_path / "tok"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(fineweb_docs()[:50]), model_prefix=str(prefix),
                                   minloglevel=2, **settings_)
    return prefix.with_suffix(".model")


def test_self_test_refuses_a_tokenizer_without_byte_fallback(tmp_path):
    path = _train_tokenizer(tmp_path, byte_fallback=False)
    sp = load_tokenizer(path)
    with pytest.raises(InvalidInput, match="no byte fallback") as err:
        check_tokenizer(sp, path)
    assert str(path) in str(err.value) and "--force" in str(err.value)
    assert check_tokenizer(sp, path, force=True)  # forced: problems returned, no error


def test_self_test_refuses_a_tokenizer_without_a_standalone_space_piece(tmp_path):
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2", reason="needs protobuf (dev extra)")
    proto = pb.ModelProto()
    proto.ParseFromString(need(SP1024).read_bytes())
    (space,) = [p for p in proto.pieces if p.piece == "\u2581"]
    space.piece = "\u2581\u2581"  # the bare space piece is gone; spaces now cost byte tokens
    path = tmp_path / "nospace.model"
    path.write_bytes(proto.SerializeToString())
    problems = tokenizer_problems(load_tokenizer(path))
    assert any("standalone" in p for p in problems), problems
    with pytest.raises(InvalidInput, match="standalone"):
        check_tokenizer(load_tokenizer(path), path)


def test_missing_or_garbage_model_is_invalid_input(tmp_path):
    with pytest.raises(InvalidInput, match="not found"):
        load_tokenizer(tmp_path / "missing.model")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(InvalidInput, match="not a SentencePiece model"):
        load_tokenizer(garbage)


def test_bits_per_byte():
    assert bits_per_byte(math.log(2) * 10, 10) == pytest.approx(1.0)
