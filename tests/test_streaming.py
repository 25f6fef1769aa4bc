"""Streaming features: memory-mapped arrays read batch by batch give exactly the batches, training and
predictions of the former in-memory pipeline (Dataset.from_tensor_slices of the whole array), with
resident memory that does not grow with the file."""

import numpy as np
import pytest
import tensorflow as tf

from transferlab import features, precision, train

HEAD = {"units": 16, "dropout": 0.5, "dropout_position": "after_dense", "pooling": "avg"}
CFG = {"seed": 0, "epochs": 3, "batch_size": 8, "optimizer": "adam", "learning_rate": 1e-2, "momentum": 0.9}


def in_memory_dataset(x, y, batch_size, shuffle_seed=None, oversample="none"):
    """The former train.feature_dataset, kept here as the reference the streamed one must reproduce."""
    assert oversample == "none"  # it predates oversampling (tests/test_controls.py tests that)
    ds = tf.data.Dataset.from_tensor_slices((np.asarray(x, np.float32), np.asarray(y, np.int32)))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(y), seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


@pytest.fixture
def stored(tmp_path):
    """Features of 3 classes saved as .npy and opened as a read-only memory map, as load_split does."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(61, 7)).astype("float32")  # 61: the last batch is partial
    y = (x[:, 0] > 0).astype("int64") + (x[:, 1] > 0)
    np.save(tmp_path / "pooled.npy", x)
    return np.load(tmp_path / "pooled.npy", mmap_mode="r"), y


def batches(ds, epochs=2):
    return [(a.numpy(), b.numpy()) for _ in range(epochs) for a, b in ds]


@pytest.mark.parametrize("seed", [None, 0, 7])
def test_streamed_batches_are_the_in_memory_ones(stored, seed):
    x, y = stored
    assert isinstance(x, np.memmap)
    train.seed_everything(0)
    old = batches(in_memory_dataset(x, y, 8, seed))
    train.seed_everything(0)
    new = batches(train.feature_dataset(x, y, 8, seed))
    assert len(old) == len(new) == 16
    for (xa, ya), (xb, yb) in zip(old, new):
        assert xa.dtype == xb.dtype == np.float32 and np.array_equal(xa, xb) and np.array_equal(ya, yb)
    if seed is not None:  # shuffled, and reshuffled in the second epoch
        first, second = (np.concatenate([b for _, b in new[i : i + 8]]) for i in (0, 8))
        assert not np.array_equal(first, y.astype("int32")) and not np.array_equal(first, second)


def test_float16_storage_is_read_as_float32(tmp_path):
    x = np.random.default_rng(1).normal(size=(10, 3)).astype("float16")
    np.save(tmp_path / "cut.npy", x)
    got = batches(train.feature_dataset(np.load(tmp_path / "cut.npy", mmap_mode="r"), np.zeros(10), 4), 1)
    assert np.array_equal(np.concatenate([a for a, _ in got]), x.astype("float32"))


@pytest.mark.parametrize("name", ["float32", "mixed_bfloat16"])
def test_train_head_on_a_memory_map_is_bit_identical(stored, monkeypatch, name):
    x, y = stored
    results = []
    for dataset in (in_memory_dataset, train.feature_dataset):
        monkeypatch.setattr(train, "feature_dataset", dataset)
        with precision.policy(name):
            head, history, _, _ = train.train_head(x[:45], y[:45], x[45:], y[45:], 3, CFG, HEAD)
        results.append(([w.copy() for w in head.get_weights()], history))
    (weights_old, history_old), (weights_new, history_new) = results
    assert all(np.array_equal(a, b) for a, b in zip(weights_old, weights_new))
    assert history_old.equals(history_new)
    # evaluate's bottleneck predictions: streamed through the graph, the same logits as Keras' predict
    monkeypatch.undo()
    keras_predict = head.predict(np.asarray(x), batch_size=32, verbose=0)
    assert np.array_equal(keras_predict, train.predict_logits(head, train.feature_dataset(x, y, 32)))


def resident_bytes() -> int:
    """This process's resident set now (file-backed pages of memory maps included)."""
    pages = int(open("/proc/self/statm").read().split()[1])
    return pages * 4096


def test_memory_stays_flat_while_streaming(tmp_path):
    """64 MiB of features: iterating them must not leave them resident (the old path copied them whole,
    and a memory map kept open would keep every page read mapped)."""
    n, width = 4096, 4096
    array = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(n, width))
    array[:] = 1.0
    array.flush()
    del array
    x = np.load(tmp_path / "big.npy", mmap_mode="r")
    ds = train.feature_dataset(x, np.zeros(n), 64, shuffle_seed=0)
    next(iter(ds))  # tf.data's threads and buffers exist before the baseline
    before = resident_bytes()
    total = sum(float(tf.reduce_sum(batch)) for batch, _ in ds)
    assert total == n * width
    grown = resident_bytes() - before
    assert grown < 24 * 2**20, f"resident memory grew by {grown / 2**20:.0f} MiB reading a 64 MiB array"


@pytest.mark.parametrize("shape", [(0, 3), (7, 5), (5, 2, 2, 3)])
def test_row_writer_writes_the_bytes_of_np_save_and_of_a_memory_map(tmp_path, shape):
    """Extraction's files (and so their sha256 in meta.json, and DVC's cache) are what they were."""
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    writer = features.RowWriter(tmp_path / "rows.npy", x.shape)
    for start in range(0, len(x), 3):
        writer.write(x[start : start + 3])
    writer.close()
    np.save(tmp_path / "saved.npy", x)
    mapped = np.lib.format.open_memmap(tmp_path / "mapped.npy", mode="w+", dtype=np.float32, shape=x.shape)
    mapped[:] = x
    mapped.flush()
    del mapped
    rows = (tmp_path / "rows.npy").read_bytes()
    assert rows == (tmp_path / "saved.npy").read_bytes() == (tmp_path / "mapped.npy").read_bytes()


def test_row_writer_refuses_a_short_file(tmp_path):
    writer = features.RowWriter(tmp_path / "rows.npy", (4, 2))
    writer.write(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="3 rows written, 4 expected"):
        writer.close()
