import glob
import hashlib
import os
import subprocess
import threading
import sys

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import REPO

BOS = 50256


def make_docs(rng, num_docs, min_len=2, max_len=60):
    """Concatenated documents, each starting with BOS, tokens drawn below BOS."""
    docs = [np.concatenate([[BOS], rng.integers(0, 1000, size=rng.integers(min_len, max_len) - 1)])
            for _ in range(num_docs)]
    return np.concatenate(docs).astype(np.uint16)


def write_train_shards(tmp_path, rng, num_shards=2, docs_per_shard=200, **kw):
    for i in range(1, num_shards + 1):
        tg.write_shard(str(tmp_path / f"t_train_{i:06d}.bin"), make_docs(rng, docs_per_shard, **kw))
    return str(tmp_path / "t_train_*.bin")


def sequences_of(mb):
    cu = mb.cu_seqlens.tolist()
    return [mb.inputs[a:b] for a, b in zip(cu[:-1], cu[1:]) if b > a]


# --- shard format ---------------------------------------------------------------

def test_shard_round_trip(tmp_path):
    tokens = np.array([BOS, 1, 2, 65535, 0, 7], dtype=np.uint16)
    path = str(tmp_path / "x.bin")
    tg.write_shard(path, tokens)
    assert os.path.getsize(path) == 1024 + 2 * len(tokens)
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [20240520, 1, len(tokens)]
    np.testing.assert_array_equal(tg.load_shard(path), tokens)


def _write_raw(path, magic=20240520, version=1, count=4, payload_tokens=4):
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, count
    with open(path, "wb") as f:
        f.write(header.tobytes() + np.zeros(payload_tokens, dtype="<u2").tobytes())


@pytest.mark.parametrize("kwargs, message", [
    (dict(magic=123), "bad magic number 123"),
    (dict(version=2), "unsupported shard version 2"),
    (dict(count=10), "header says 10 tokens"),
    (dict(payload_tokens=9), "header says 4 tokens"),
])
def test_malformed_shard_errors_name_file_and_fault(tmp_path, kwargs, message):
    path = str(tmp_path / "bad.bin")
    _write_raw(path, **kwargs)
    with pytest.raises(tg.DataError) as err:
        tg.load_shard(path)
    text = str(err.value)
    assert path in text and message in text and "\n" not in text


def test_short_and_unreadable_shards(tmp_path):
    short = tmp_path / "short.bin"
    short.write_bytes(b"\x00" * 100)
    with pytest.raises(tg.DataError, match="shorter than its 1024-byte header"):
        tg.read_shard_header(str(short))
    with pytest.raises(tg.DataError, match="cannot read shard"):
        tg.read_shard_header(str(tmp_path / "missing.bin"))
    os.mkdir(tmp_path / "dir.bin")
    with pytest.raises(tg.DataError, match="dir.bin"):
        tg.read_shard_header(str(tmp_path / "dir.bin"))


def test_empty_glob_and_bad_shard_fail_before_training(tmp_path):
    with pytest.raises(tg.DataError, match="no train files match"):
        tg.TrainLoader(str(tmp_path / "*.bin"), 0, 1, slices=1, max_seq_len=16, bos_id=BOS)
    rng = np.random.default_rng(0)
    pattern = write_train_shards(tmp_path, rng)
    _write_raw(str(tmp_path / "t_train_000003.bin"), magic=7)
    with pytest.raises(tg.DataError, match="t_train_000003.bin: bad magic"):
        tg.TrainLoader(pattern, 0, 1, slices=1, max_seq_len=16, bos_id=BOS)


# --- tokeniser ----------------------------------------------------------------

def test_tokenize_text_matches_tiktoken_with_bos(tmp_path):
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("Hello world.\n\nSecond paragraph here.\n", encoding="utf-8")
    b.write_text("Ünïcödé text — with dashes.", encoding="utf-8")
    out = tmp_path / "out"
    subprocess.run([sys.executable, os.path.join(REPO, "data", "tokenize_text.py"), "--out", str(out),
                    "--name", "demo", "--val-tokens", "3", str(a), str(b)], check=True, capture_output=True)
    expected = [BOS] + enc.encode_ordinary(a.read_text()) + [BOS] + enc.encode_ordinary(b.read_text())
    val = tg.load_shard(str(out / "demo_val_000000.bin")).tolist()
    train = tg.load_shard(str(out / "demo_train_000001.bin")).tolist()
    assert val == expected[:3] and train == expected[3:]
    assert not (out / "demo_train_000002.bin").exists()


def test_tokenize_text_split_paragraphs(tmp_path):
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    a = tmp_path / "a.txt"
    a.write_text("First para.\n\n\nSecond para.\n", encoding="utf-8")
    out = tmp_path / "out"
    subprocess.run([sys.executable, os.path.join(REPO, "data", "tokenize_text.py"), "--out", str(out),
                    "--name", "p", "--val-tokens", "1", "--split-paragraphs", str(a)], check=True,
                   capture_output=True)
    tokens = tg.load_shard(str(out / "p_val_000000.bin")).tolist() + tg.load_shard(str(out / "p_train_000001.bin")).tolist()
    assert tokens == [BOS] + enc.encode_ordinary("First para.") + [BOS] + enc.encode_ordinary("Second para.")


def test_shipped_sample_is_valid():
    for path in [os.path.join(REPO, "data", "sample", "tinyshakespeare_val_000000.bin"),
                 os.path.join(REPO, "data", "sample", "tinyshakespeare_train_000001.bin")]:
        tokens = np.asarray(tg.load_shard(path))
        assert len(tokens) > 30_000 and (tokens == BOS).sum() > 500


# --- training loader --------------------------------------------------------------

def test_sequences_bos_aligned_bounded_and_exact(tmp_path):
    rng = np.random.default_rng(1)
    pattern = write_train_shards(tmp_path, rng, max_len=80)
    loader = tg.TrainLoader(pattern, 0, 1, slices=4, max_seq_len=32, bos_id=BOS)
    for batch_tokens in (256, 512, 128):  # the batch size may change between steps
        micro = loader.next_step(batch_tokens)
        assert len(micro) == 4
        for mb in micro:
            assert mb.inputs.shape == mb.targets.shape == (batch_tokens // 4,)
            torch.testing.assert_close(mb.inputs[1:], mb.targets[:-1])
            seqs = sequences_of(mb)
            assert all(s[0] == BOS for s in seqs)
            assert max(len(s) for s in seqs) <= 32 and mb.max_seqlen == max(len(s) for s in seqs)
            assert mb.cu_seqlens.dtype == torch.int32 and mb.cu_seqlens[-1] == batch_tokens // 4


def test_ranks_disjoint_and_cover_single_rank_data(tmp_path):
    rng = np.random.default_rng(2)
    pattern = write_train_shards(tmp_path, rng)
    single = tg.TrainLoader(pattern, 0, 1, slices=4, max_seq_len=48, bos_id=BOS)
    ranks = [tg.TrainLoader(pattern, r, 2, slices=4, max_seq_len=48, bos_id=BOS) for r in range(2)]
    for batch_tokens in (512, 1024):
        one = single.next_step(batch_tokens)
        two = [loader.next_step(batch_tokens) for loader in ranks]
        assert all(len(m) == 2 for m in two)  # 2 accumulation micro-steps per rank
        # slice i belongs to rank i % 2; together the ranks hold exactly the single rank's slices
        for i, mb in enumerate(one):
            other = two[i % 2][i // 2]
            torch.testing.assert_close(mb.inputs, other.inputs)
            torch.testing.assert_close(mb.cu_seqlens, other.cu_seqlens)
        # disjoint: no document start is shared between the two ranks' slices
        assert not torch.equal(two[0][0].inputs, two[1][0].inputs)


def test_slices_follow_the_token_stream_and_roll_over_shards(tmp_path):
    rng = np.random.default_rng(3)
    pattern = write_train_shards(tmp_path, rng, num_shards=3, docs_per_shard=10, max_len=20)
    stream = np.concatenate([tg.load_shard(str(p)) for p in sorted(tmp_path.glob("t_train_*.bin"))])
    doc_starts = np.flatnonzero(stream == BOS)
    loader = tg.TrainLoader(pattern, 0, 1, slices=1, max_seq_len=12, bos_id=BOS)
    next_doc = 0
    for _ in range(4):
        mb = loader.next_step(40)[0]
        buf = torch.cat([mb.inputs, mb.targets[-1:]]).numpy()
        cu = mb.cu_seqlens.tolist()
        cu[-1] += 1  # the last sequence also holds the final target token
        for a, b in zip(cu[:-1], cu[1:]):
            if b == a:
                continue
            start = doc_starts[next_doc]  # each sequence is the next document, cut at 12 tokens
            np.testing.assert_array_equal(buf[a:b], stream[start:start + (b - a)])
            next_doc += 1
    assert loader.stream.shard_index >= 1  # 164 tokens of ~10-token documents run past the first shard


def test_exhaustion_is_clear_and_repeat_cycles(tmp_path):
    rng = np.random.default_rng(4)
    pattern = write_train_shards(tmp_path, rng, num_shards=1, docs_per_shard=5, max_len=10)
    loader = tg.TrainLoader(pattern, 0, 1, slices=1, max_seq_len=64, bos_id=BOS)
    with pytest.raises(tg.DataError, match="training data exhausted"):
        for _ in range(100):
            loader.next_step(16)
    looping = tg.TrainLoader(pattern, 0, 1, slices=1, max_seq_len=64, bos_id=BOS, repeat=True)
    for _ in range(20):
        looping.next_step(16)
    assert looping.stream.epoch >= 1


def test_no_bos_anywhere_is_an_error_not_a_hang(tmp_path):
    tg.write_shard(str(tmp_path / "n_train_000001.bin"), np.ones(100, dtype=np.uint16))
    loader = tg.TrainLoader(str(tmp_path / "n_train_*.bin"), 0, 1, slices=1, max_seq_len=64, bos_id=BOS, repeat=True)
    with pytest.raises(tg.DataError, match="no document start"):
        loader.next_step(16)


def test_loader_state_resumes_exactly(tmp_path):
    rng = np.random.default_rng(5)
    pattern = write_train_shards(tmp_path, rng, num_shards=2, docs_per_shard=30)
    a = tg.TrainLoader(pattern, 0, 1, slices=2, max_seq_len=40, bos_id=BOS)
    a.next_step(128)
    state = a.state_dict()
    expected = [mb.inputs for mb in a.next_step(256)]
    b = tg.TrainLoader(pattern, 0, 1, slices=2, max_seq_len=40, bos_id=BOS)
    b.load_state_dict(state)
    for x, y in zip(expected, [mb.inputs for mb in b.next_step(256)]):
        torch.testing.assert_close(x, y)


def test_synthetic_loader_shapes_and_world_size_invariance():
    one = tg.SyntheticLoader(0, 1, slices=4, max_seq_len=512, bos_id=BOS, vocab_size=50257, seed=3)
    two = [tg.SyntheticLoader(r, 2, slices=4, max_seq_len=512, bos_id=BOS, vocab_size=50257, seed=3) for r in range(2)]
    full = one.next_step(4096)
    halves = [loader.next_step(4096) for loader in two]
    for i, mb in enumerate(full):
        torch.testing.assert_close(mb.inputs, halves[i % 2][i // 2].inputs)
        assert all(s[0] == BOS for s in sequences_of(mb)) and mb.max_seqlen <= 512


# --- validation -------------------------------------------------------------------

def test_validation_reads_sequentially_split_by_rank(tmp_path):
    tokens = make_docs(np.random.default_rng(7), 100)
    tg.write_shard(str(tmp_path / "v_val_000000.bin"), tokens)
    pattern = str(tmp_path / "v_val_*.bin")
    kw = dict(val_tokens=256, chunk_tokens=64, bos_id=BOS)
    per_rank = [list(tg.validation_batches(pattern, r, 2, **kw)) for r in range(2)]
    assert all(len(batches) == 2 for batches in per_rank)
    read = [per_rank[r][step].inputs for step in range(2) for r in range(2)]
    np.testing.assert_array_equal(torch.cat(read).numpy(), tokens[:256])
    for batches in per_rank:
        for mb in batches:
            cu = mb.cu_seqlens.tolist()
            starts = [i for i in range(1, 64) if mb.inputs[i] == BOS]
            assert cu[1:-1] == starts and cu[-1] == 64


def test_validation_needs_enough_tokens(tmp_path):
    tg.write_shard(str(tmp_path / "v_val_000000.bin"), make_docs(np.random.default_rng(8), 3))
    with pytest.raises(tg.DataError, match="need val_tokens"):
        list(tg.validation_batches(str(tmp_path / "v_val_*.bin"), 0, 1, val_tokens=4096, chunk_tokens=1024, bos_id=BOS))


def test_missing_shards_error_names_the_real_flag(tmp_path):
    for what, make in (("train", lambda p: tg.TrainLoader(p, 0, 1, slices=1, max_seq_len=16, bos_id=BOS)),
                       ("val", lambda p: list(tg.validation_batches(p, 0, 1, val_tokens=16, chunk_tokens=16,
                                                                     bos_id=BOS)))):
        with pytest.raises(tg.DataError) as err:
            make(str(tmp_path / "none_*.bin"))
        assert f"point --{what}-files at your shards" in str(err.value) and "{" not in str(err.value)


# --- long documents: truncate (records) and continue ---------------------------------

def test_truncate_stream_is_bit_identical_to_the_record_loader(tmp_path):
    """Pinned against the loader before long_documents/prefetch existed (same shards, same calls)."""
    rng = np.random.default_rng(1234)
    for i in (1, 2):
        tg.write_shard(str(tmp_path / f"t_train_{i:06d}.bin"), make_docs(rng, 80, max_len=120))
    pattern = str(tmp_path / "t_train_*.bin")
    for prefetch in (False, True):
        digest = hashlib.sha256()
        for rank, world_size in ((0, 1), (1, 2)):
            loader = tg.TrainLoader(pattern, rank, world_size, slices=4, max_seq_len=48, bos_id=BOS, repeat=True,
                                    index_ahead=prefetch)
            if prefetch:
                loader = tg.PrefetchingLoader(loader, "cpu")
            for batch_tokens in (256, 256, 512, 1024, 1024, 512) * 4:
                for mb in loader.next_step(batch_tokens):
                    for t in (mb.inputs, mb.targets, mb.cu_seqlens):
                        digest.update(t.numpy().tobytes())
                    digest.update(str(mb.max_seqlen).encode())
            loader.close()
        assert digest.hexdigest() == "c29974d1545f06350368e4513eee04afcde3839b0c7e00ab4cbecefdde838255"


def unique_token_shards(tmp_path, doc_lengths_per_shard):
    """Shards whose every token is distinct (its global position, skipping the BOS id), so each can be traced."""
    values = iter(v for v in range(60_000) if v != BOS)
    for i, lengths in enumerate(doc_lengths_per_shard, start=1):
        tokens = []
        for length in lengths:
            tokens += [BOS] + [next(values) for _ in range(length - 1)]
        tg.write_shard(str(tmp_path / f"u_train_{i:06d}.bin"), tokens)
    return str(tmp_path / "u_train_*.bin")


def slice_tokens(mb):
    """All tokens of a micro-batch's slice: its inputs plus the final target."""
    return torch.cat([mb.inputs, mb.targets[-1:]]).tolist()


@pytest.mark.parametrize("world_size", [1, 2])
def test_continue_uses_every_token_exactly_once_per_epoch(tmp_path, world_size):
    rng = np.random.default_rng(10)
    shards = [rng.integers(2, 400, size=12).tolist(), rng.integers(2, 400, size=9).tolist()]
    pattern = unique_token_shards(tmp_path, shards)
    stream = np.concatenate([np.asarray(tg.load_shard(p)) for p in sorted(glob.glob(pattern))])
    loaders = [tg.TrainLoader(pattern, r, world_size, slices=4, max_seq_len=64, bos_id=BOS,
                              long_documents="continue") for r in range(world_size)]
    seen = []
    while True:
        try:
            per_rank = [loader.next_step(256) for loader in loaders]
        except tg.DataError as err:
            assert "exhausted" in str(err)
            break
        for i in range(4):  # slice i belongs to rank i % world_size
            mb = per_rank[i % world_size][i // world_size]
            seqs = sequences_of(mb)
            assert max(len(s) for s in seqs) <= 64
            # inside a slice a sequence not starting at BOS continues a document cut at max_seq_len
            cu, buf = mb.cu_seqlens.tolist(), slice_tokens(mb)
            for prev, a in zip(cu[:-2], cu[1:-1]):
                assert buf[a] == BOS or a - prev == 64
            seen += buf
    # every token of the epoch exactly once, in stream order, until the data ran out mid-step
    assert len(seen) > 0.8 * len(stream)
    np.testing.assert_array_equal(np.array(seen), stream[:len(seen)])


def test_truncate_drops_the_rest_of_long_documents(tmp_path):
    pattern = unique_token_shards(tmp_path, [[200, 30, 200, 30] * 3])
    loader = tg.TrainLoader(pattern, 0, 1, slices=1, max_seq_len=64, bos_id=BOS)
    seqs = sequences_of(loader.next_step(128)[0])
    assert [int(s[0]) for s in seqs].count(BOS) == len(seqs)  # every sequence is a document start
    assert [len(s) for s in seqs][:2] == [64, 30]


def test_continue_state_resumes_mid_document(tmp_path):
    pattern = unique_token_shards(tmp_path, [[300, 300, 300]])
    a = tg.TrainLoader(pattern, 0, 1, slices=1, max_seq_len=64, bos_id=BOS, long_documents="continue")
    a.next_step(100)
    state = a.state_dict()
    assert state["doc_offset"] > 0
    expected = a.next_step(100)[0]
    b = tg.TrainLoader(pattern, 0, 1, slices=1, max_seq_len=64, bos_id=BOS, long_documents="continue")
    b.load_state_dict(state)
    torch.testing.assert_close(b.next_step(100)[0].inputs, expected.inputs)


def test_presets_and_own_files_pick_their_long_document_mode():
    assert tg.config_from_args([]).data.long_documents == "truncate"
    for preset, mode in (("short", "truncate"), ("medium", "truncate"), ("cpu", "continue"), ("test", "continue")):
        assert tg.config_from_args(["--preset", preset]).data.long_documents == mode
        # a named preset keeps its mode with other files (e.g. FineWeb stored elsewhere)
        assert tg.config_from_args(["--preset", preset, "--train-files", "x/*.bin"]).data.long_documents == mode
    assert tg.config_from_args(["--train-files", "mine/*.bin"]).data.long_documents == "continue"
    assert tg.config_from_args(["--train-files", "m/*.bin", "--long-documents", "truncate"]).data.long_documents == "truncate"
    assert tg.config_from_args(["--preset", "medium"]).data.data_stream == "contiguous"
    assert tg.config_from_args([]).data.data_stream == "bos_aligned"


# --- start-of-run description of the training data --------------------------------------

def describe(pattern, **kw):
    loader = tg.TrainLoader(pattern, 0, 1, slices=1, bos_id=BOS, **kw)
    return loader.describe()


def test_description_counts_and_warns_when_truncation_hides_much(tmp_path):
    lengths = [1000, 40, 40, 40]  # 1000-token document: 936 of 1120 tokens lie past 64
    pattern = unique_token_shards(tmp_path, [lengths])
    lines = describe(pattern, max_seq_len=64)
    assert len(lines) == 2
    assert "1 shard(s), 1,120 tokens" in lines[0] and "4 documents" in lines[0] and "max 1,000" in lines[0]
    assert f"{100 * 936 / 1120:.1f}% of its tokens lie past max_seq_len=64" in lines[0]
    assert lines[1].startswith("warning: 84% of the training tokens are never seen") and "--long-documents continue" in lines[1]
    # the fix silences the warning; so does a limit the documents fit in
    assert len(describe(pattern, max_seq_len=64, long_documents="continue")) == 1
    assert len(describe(pattern, max_seq_len=1024)) == 1


def test_no_warning_at_a_small_truncated_share(tmp_path):
    pattern = unique_token_shards(tmp_path, [[100] + [40] * 20])  # 36 of 900 tokens past 64: 4%
    lines = describe(pattern, max_seq_len=64)
    assert len(lines) == 1 and "4.0% of its tokens" in lines[0]


def test_run_log_has_the_data_line_and_warning(tmp_path):
    train = unique_token_shards(tmp_path, [[900, 900, 40, 40] * 2])
    tg.write_shard(str(tmp_path / "v_val_000000.bin"), make_docs(np.random.default_rng(0), 100))
    base = ["--preset", "test", "--log-dir", str(tmp_path), "--train-files", train, "--val-files",
            str(tmp_path / "v_val_*.bin"), "--num-iterations", "1", "--extension-iterations", "0", "--val-every", "0"]
    tg.train(tg.config_from_args(base + ["--run-id", "trunc", "--long-documents", "truncate"]), [])
    text = (tmp_path / "trunc.txt").read_text()
    assert "train data: 1 shard(s), 3,760 tokens" in text and "\nwarning: " in text


# --- contiguous stream (medium record) ---------------------------------------------------

def contiguous(pattern, rank, world_size, slices=4, max_seq_len=1024, **kw):
    return tg.ContiguousLoader(pattern, rank, world_size, slices=slices, max_seq_len=max_seq_len, bos_id=BOS, **kw)


@pytest.mark.parametrize("world_size", [1, 2])
def test_contiguous_slices_tile_the_stream_per_step(tmp_path, world_size):
    rng = np.random.default_rng(11)
    pattern = unique_token_shards(tmp_path, [rng.integers(2, 300, size=30).tolist(), rng.integers(2, 300, size=25).tolist()])
    shards = [np.asarray(tg.load_shard(p)) for p in sorted(glob.glob(pattern))]
    loaders = [contiguous(pattern, r, world_size) for r in range(world_size)]
    shard, pos = 0, 0
    for batch_tokens in (512, 512, 1024, 256, 1024, 1024, 512, 1024):
        if pos + batch_tokens + 1 >= len(shards[shard]):  # the record moves on, skipping the shard's tail
            shard, pos = shard + 1, 0
        per_rank = [loader.next_step(batch_tokens) for loader in loaders]
        assert all(len(m) == 4 // world_size for m in per_rank)
        length = batch_tokens // 4
        for i in range(4):
            mb = per_rank[i % world_size][i // world_size]
            # slice i is the next `length` tokens of the window, plus the following token as the last target
            expected = shards[shard][pos + i * length:pos + (i + 1) * length + 1]
            np.testing.assert_array_equal(slice_tokens(mb), expected)
            # cu_seqlens: 0, every BOS inside the inputs after position 0, the end
            starts = [a for a in range(1, length) if expected[a] == BOS]
            assert mb.cu_seqlens.tolist() == [0, *starts, length]
            assert mb.max_seqlen == max(np.diff([0, *starts, length]))
        pos += batch_tokens
    assert shard == 1  # the walk crossed into the second shard


def test_contiguous_one_and_two_ranks_cover_the_same_tokens_and_resume(tmp_path):
    pattern = unique_token_shards(tmp_path, [[50] * 80])
    one = contiguous(pattern, 0, 1)
    two = [contiguous(pattern, r, 2) for r in range(2)]
    for _ in range(3):
        full = one.next_step(512)
        halves = [loader.next_step(512) for loader in two]
        for i, mb in enumerate(full):
            other = halves[i % 2][i // 2]
            torch.testing.assert_close(mb.inputs, other.inputs)
            torch.testing.assert_close(mb.cu_seqlens, other.cu_seqlens)
    state = one.state_dict()
    expected = one.next_step(512)
    again = contiguous(pattern, 0, 1)
    again.load_state_dict(state)
    for a, b in zip(expected, again.next_step(512)):
        torch.testing.assert_close(a.inputs, b.inputs)


def test_contiguous_exhaustion_repeat_and_too_small_shards(tmp_path):
    pattern = unique_token_shards(tmp_path, [[100] * 6])  # 600 tokens: one 512-token window per epoch
    loader = contiguous(pattern, 0, 1)
    loader.next_step(512)
    with pytest.raises(tg.DataError, match="training data exhausted"):
        loader.next_step(512)
    looping = contiguous(pattern, 0, 1, repeat=True)
    first = looping.next_step(512)[0].inputs
    torch.testing.assert_close(looping.next_step(512)[0].inputs, first)
    assert looping.epoch == 1
    with pytest.raises(tg.DataError, match="no train shard holds more than batch_tokens"):
        contiguous(pattern, 0, 1, repeat=True).next_step(1024)


# --- prefetching ---------------------------------------------------------------------------

def all_tensors(micro):
    return [(mb.inputs, mb.targets, mb.cu_seqlens, mb.max_seqlen) for mb in micro]


@pytest.mark.parametrize("stream", ["bos_aligned", "contiguous"])
def test_prefetched_stream_equals_the_synchronous_one(tmp_path, stream):
    rng = np.random.default_rng(12)
    pattern = unique_token_shards(tmp_path, [rng.integers(2, 200, size=25).tolist() for _ in range(3)])

    def make(prefetch):
        if stream == "contiguous":
            loader = contiguous(pattern, 1, 2, repeat=True, index_ahead=prefetch)
        else:
            loader = tg.TrainLoader(pattern, 1, 2, slices=4, max_seq_len=64, bos_id=BOS, repeat=True,
                                    long_documents="continue", index_ahead=prefetch)
        return tg.PrefetchingLoader(loader, "cpu") if prefetch else loader

    sync, ahead = make(False), make(True)
    # batch-size and sequence-limit changes make the prefetcher's guess wrong; a restore mid-way is what
    # warm-up and resume do
    schedule = [(256, 16), (256, 16), (512, 16), (512, None), (512, None), (1024, 32), (256, None), (256, None)] * 4
    saved = None
    for step, (batch_tokens, limit) in enumerate(schedule):
        if step == 10:
            saved = (sync.state_dict(), ahead.state_dict())
            assert saved[0] == saved[1]  # the prefetcher reports the position of the batches handed out
        if step == 20:
            sync.load_state_dict(saved[0])
            ahead.load_state_dict(saved[1])
        synchronous = sync.next_step(batch_tokens, limit)
        if stream == "bos_aligned":
            assert max(mb.max_seqlen for mb in synchronous) <= (limit or 64)
        for a, b in zip(all_tensors(synchronous), all_tensors(ahead.next_step(batch_tokens, limit))):
            for x, y in zip(a, b):
                assert torch.equal(x, y) if torch.is_tensor(x) else x == y
        assert ahead._pending is not None  # the next step is being built in the background
    before = threading.active_count()
    ahead.close()
    sync.close()
    assert threading.active_count() < before and not [t for t in threading.enumerate()
                                                      if t.name.startswith(("batch-prefetch", "shard-index"))]


def test_prefetch_errors_surface_where_the_synchronous_loader_raises(tmp_path):
    pattern = unique_token_shards(tmp_path, [[40] * 10])  # 400 tokens, no repeat
    loader = tg.PrefetchingLoader(tg.TrainLoader(pattern, 0, 1, slices=1, max_seq_len=64, bos_id=BOS), "cpu")
    loader.next_step(128)
    loader.next_step(128)  # the prefetch of a third 128-token step has run out of data in the background
    with pytest.raises(tg.DataError, match="training data exhausted"):
        loader.next_step(128)
    loader.close()


def test_shard_index_ahead_gives_the_same_index(tmp_path):
    pattern = unique_token_shards(tmp_path, [[30] * 5, [20] * 4, [10] * 3])
    files = sorted(glob.glob(pattern))
    plain = tg.ShardIndex(files, BOS)
    ahead = tg.ShardIndex(files, BOS, ahead=True, wrap=True)
    for i in (0, 1, 2, 0, 2, 1):
        for x, y in zip(plain.get(i), ahead.get(i)):
            np.testing.assert_array_equal(x, y)
    assert set(ahead._entries) == {1, 2}  # the shard in use and the one after it
    ahead.close()


def test_tokenize_text_reports_lengths_and_suggests_splitting(tmp_path):
    script = os.path.join(REPO, "data", "tokenize_text.py")
    chapters = []
    for i in range(3):
        path = tmp_path / f"chapter{i}.txt"
        path.write_text("\n\n".join(f"Paragraph {j} of chapter {i} says a few plain words." for j in range(40)),
                        encoding="utf-8")
        chapters.append(str(path))

    def run(*extra):
        result = subprocess.run([sys.executable, script, "--out", str(tmp_path / "out"), "--name", "c",
                                 "--val-tokens", "10", *extra, *chapters], capture_output=True, text=True, check=True)
        return result.stdout

    whole = run()  # three chapters of ~560 tokens: all longer than the cpu preset's 256
    train = np.concatenate([tg.load_shard(str(tmp_path / "out" / f"c_{n}.bin")) for n in ("val_000000", "train_000001")])
    lengths = np.diff(np.append(np.flatnonzero(train == BOS), len(train)))
    assert (f"count 3, median {int(np.median(lengths)):,}, max {int(lengths.max()):,}; 3 longer than 256" in whole)
    assert "hint: most documents are longer than 256 tokens; --split-paragraphs" in whole
    split = run("--split-paragraphs")
    assert "count 120," in split and "0 longer than 256" in split and "hint:" not in split


def test_contiguous_sequences_never_exceed_max_seq_len(tmp_path):
    pattern = unique_token_shards(tmp_path, [[300, 20, 200, 500, 10]])  # one slice of 1024 inputs
    stream = np.asarray(tg.load_shard(glob.glob(pattern)[0]))
    for max_len, expected in ((1024, [300, 20, 200, 500, 4]), (128, [128, 128, 44, 20, 128, 72, 128, 128, 128, 116, 4])):
        mb = contiguous(pattern, 0, 1, slices=1, max_seq_len=max_len).next_step(1024)[0]
        assert np.diff(mb.cu_seqlens.numpy()).tolist() == expected
        np.testing.assert_array_equal(slice_tokens(mb), stream[:1025])
    # the record's case: a slice as long as max_seq_len inside one document stays one sequence
    # (its extra final token is only a target)
    (tmp_path / "one").mkdir()
    pattern = unique_token_shards(tmp_path / "one", [[3000]])
    mb = contiguous(pattern, 0, 1, slices=1, max_seq_len=1024).next_step(1024)[0]
    assert mb.cu_seqlens.tolist() == [0, 1024] and mb.max_seqlen == 1024
