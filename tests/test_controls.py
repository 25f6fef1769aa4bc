"""Training controls (README, "Training controls"): LR schedules, early stopping with the best weights,
class weighting, label smoothing, the EL-cell augmentation preset, the converged linear probe, and
defaults that keep the plain Keras fit. Tiny real Keras models, seconds each."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml
from helpers import ROOT

from transferlab import features, train
from transferlab.params import CONTROL_DEFAULTS, OVERSAMPLING, ParamsError, validate

HEAD = {"units": 16, "dropout": 0.0, "dropout_position": "after_dense", "pooling": "avg"}
CFG = {"seed": 0, "epochs": 4, "batch_size": 8, "optimizer": "adam", "learning_rate": 0.01, "momentum": 0.9}
CFG |= {**CONTROL_DEFAULTS, "probe_solver": "keras"}


def toy(n=64, d=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    return x, (x @ rng.normal(size=(d, classes))).argmax(1).astype("int32")


def params_yaml() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_params_yaml_defaults_are_the_plain_keras_fit_and_missing_keys_get_them():
    p = validate(params_yaml())
    for section in ("train", "finetune"):
        assert {k: p[section][k] for k in CONTROL_DEFAULTS} == CONTROL_DEFAULTS
    assert CONTROL_DEFAULTS == {
        "lr_schedule": "constant",
        "warmup_epochs": 0,
        "early_stopping_patience": 0,
        "early_stopping_monitor": "val_loss",
        "class_weight": "none",
        "label_smoothing": 0.0,
        "ema_momentum": 0.0,
        "oversample": "none",
    }
    assert p["train"]["probe_solver"] == "keras" and p["finetune"]["augmentation"] == "none"
    raw = params_yaml()
    for key in CONTROL_DEFAULTS:  # a params.yaml from before the controls still validates, to the same values
        del raw["train"][key], raw["finetune"][key]
    del raw["train"]["probe_solver"], raw["finetune"]["augmentation"]
    assert validate(raw) == p
    assert train.control_callbacks(CFG) == [] and train.class_weights([0, 1, 1], 2, "none") is None
    old_section = {k: v for k, v in CFG.items() if k not in CONTROL_DEFAULTS and k != "probe_solver"}
    assert train.with_controls(old_section) == CFG  # a section from before the controls: all off
    assert train.lr_schedule(CFG, 10) == CFG["learning_rate"]


def test_bad_control_values_are_refused_with_every_key_named():
    raw = params_yaml()
    raw["train"].update(lr_schedule="step", warmup_epochs=-1, probe_solver="lbfgs")
    raw["finetune"].update(warmup_epochs=2, label_smoothing=1.5, class_weight="auto", augmentation="el")
    raw["finetune"].update(ema_momentum=1.0, oversample="smote")
    with pytest.raises(ParamsError) as error:
        validate(raw)
    message = str(error.value)
    for bad in (
        "train.lr_schedule: must be one of constant, cosine, plateau, got 'step'",
        "train.warmup_epochs: must be an integer >= 0, got -1",
        "finetune.label_smoothing: must be a number in [0, 1), got 1.5",
        "finetune.class_weight: must be one of none, balanced, sqrt, got 'auto'",
        "finetune.augmentation: must be one of none, keras, el_cell, got 'el'",
        "finetune.ema_momentum: must be a number in [0, 1), got 1.0",
        "finetune.oversample: must be one of none, sqrt, balanced, got 'smote'",
    ):
        assert bad in message
    raw = params_yaml()
    raw["train"].update(probe_solver="lbfgs", ema_momentum=0.9, oversample="sqrt")  # head.units is 256
    raw["finetune"].update(warmup_epochs=2)  # constant schedule
    with pytest.raises(ParamsError) as error:
        validate(raw)
    assert "train.probe_solver: lbfgs trains the linear probe only (head.units 0), got units 256" in str(error.value)
    assert "train.ema_momentum: averages a Keras optimizer's weights, not lbfgs's, got 0.9" in str(error.value)
    assert "train.oversample: lbfgs fits every row once (class_weight weighs them), got 'sqrt'" in str(error.value)
    assert "finetune.warmup_epochs: warm-up needs lr_schedule cosine, got 'constant'" in str(error.value)
    raw = params_yaml()
    raw["finetune"].update(lr_schedule="cosine", warmup_epochs=raw["finetune"]["epochs"])
    with pytest.raises(ParamsError, match=r"finetune.warmup_epochs: must be below finetune.epochs \(4\), got 4"):
        validate(raw)


def test_an_lbfgs_probe_refuses_every_setting_it_would_ignore_while_recording_it():
    """Each of these is a run param (run.json, MLflow): accepting it would label the probe with a setting
    L-BFGS never applied, and frozen_end_to_end with a Keras fit it could not match."""
    raw = params_yaml()
    raw["head"].update(units=0, dropout=0.0)
    raw["train"].update(probe_solver="lbfgs", class_weight="balanced")
    raw["finetune"].update(methods=["finetune_top"])
    assert validate(raw)["train"]["probe_solver"] == "lbfgs"  # the probe as study/linear_probe.sh runs it
    raw["train"].update(label_smoothing=0.1, lr_schedule="cosine", warmup_epochs=1)
    raw["train"].update(early_stopping_patience=3, early_stopping_monitor="val_accuracy")
    raw["head"].update(dropout=0.5)
    raw["finetune"].update(methods=["frozen_end_to_end", "finetune_top"])
    with pytest.raises(ParamsError) as error:
        validate(raw)
    message = str(error.value)
    for bad in (
        "train.label_smoothing: lbfgs fits the plain log-loss, got 0.1",
        "train.lr_schedule: lbfgs takes no learning rate, got 'cosine'",
        "train.early_stopping_patience: lbfgs fits each L2 strength to convergence and keeps the best on "
        "validation, got 3",
        "train.early_stopping_monitor: lbfgs keeps the L2 strength with the best validation accuracy, "
        "got 'val_accuracy'",
        "head.dropout: lbfgs fits no dropout (set 0), got 0.5",
        "finetune.methods: frozen_end_to_end reproduces train_head with a Keras fit of the train section",
    ):
        assert f"\n  {bad}" in message
    assert message.startswith("6 bad value(s) in params.yaml:")


def test_default_controls_train_exactly_as_the_plain_keras_fit():
    """The code path with every control off gives the same numbers as compile + fit did before them."""
    x, y = toy()

    def run(controlled: bool):
        train.seed_everything(0)
        model = train.build_head((6,), 3, HEAD, 0)
        ds = train.feature_dataset(x[:48], y[:48], 8, 0), train.feature_dataset(x[48:], y[48:], 8)
        if controlled:
            train.compile_for(model, CFG, 48)
            history, _, chosen = train.fit_with(CFG, model, *ds, y[:48], 3)
            assert chosen == {"epochs_run": 4, "epoch_chosen": 4, "val_accuracy": history["val_accuracy"].iloc[-1]} | {
                "class_weights": None
            }
        else:
            train.compile_model(model, train.make_optimizer("adam", 0.01))
            history, _ = train.fit(model, *ds, 4)
        return history, model.get_weights()

    (h1, w1), (h2, w2) = run(True), run(False)
    assert h1.equals(h2)
    assert all(np.array_equal(a, b) for a, b in zip(w1, w2))


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero_per_step():
    cfg = {**CFG, "lr_schedule": "cosine", "warmup_epochs": 1, "epochs": 5, "learning_rate": 0.1}
    schedule = train.lr_schedule(cfg, steps_per_epoch=10)  # 10 warm-up steps, then 40 of cosine decay
    lr = lambda step: float(schedule(step))  # noqa: E731
    assert lr(0) == pytest.approx(0.0)
    assert lr(5) == pytest.approx(0.05)
    assert lr(10) == pytest.approx(0.1)
    assert lr(30) == pytest.approx(0.05, abs=1e-6)  # half-way through the decay: (1 + cos(pi/2)) / 2
    assert lr(50) == pytest.approx(0.0, abs=1e-7)
    no_warmup = train.lr_schedule({**cfg, "warmup_epochs": 0}, 10)
    assert float(no_warmup(0)) == pytest.approx(0.1) and float(no_warmup(25)) == pytest.approx(0.05, abs=1e-6)
    # the optimizer built from the section steps it with the batches of one epoch
    optimizer = train.optimizer_for(cfg, n_train=95, batch_size=10)
    assert float(optimizer.learning_rate) == pytest.approx(0.0)
    optimizer.iterations.assign(10)  # ceil(95 / 10) steps of warm-up
    assert float(optimizer.learning_rate) == pytest.approx(0.1)


def test_plateau_halves_the_rate_when_the_monitored_loss_stalls():
    (plateau,) = train.control_callbacks({**CFG, "lr_schedule": "plateau"})
    assert isinstance(plateau, keras.callbacks.ReduceLROnPlateau)
    assert (plateau.monitor, plateau.factor, plateau.patience) == ("val_loss", 0.5, 2)
    x, y = toy()
    train.seed_everything(0)
    model = train.build_head((6,), 3, HEAD, 0)
    train.compile_for(model, {**CFG, "lr_schedule": "plateau"}, 48)
    val = train.feature_dataset(x[48:], 1 - np.minimum(y[48:], 1), 8)  # labels it cannot learn: val loss rises
    history, _, _ = train.fit_with(
        {**CFG, "lr_schedule": "plateau", "epochs": 6}, model, train.feature_dataset(x[:48], y[:48], 8), val, y, 3
    )
    rates = history["learning_rate"].to_numpy()
    assert rates[0] == pytest.approx(0.01) and rates[-1] < 0.01


def test_early_stopping_restores_the_best_epochs_weights_and_records_it():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(64, 6)).astype("float32"), rng.integers(0, 3, 64).astype("int32")  # noise: it overfits
    cfg = {**CFG, "early_stopping_patience": 2, "epochs": 30, "learning_rate": 0.05}
    train.seed_everything(0)
    model = train.build_head((6,), 3, {**HEAD, "units": 64}, 0)
    train.compile_for(model, cfg, 48)
    val = train.feature_dataset(x[48:], y[48:], 8)
    history, _, chosen = train.fit_with(cfg, model, train.feature_dataset(x[:48], y[:48], 8, 0), val, y[:48], 3)
    best = int(history["val_loss"].idxmin())
    assert chosen["epoch_chosen"] == best + 1 < chosen["epochs_run"] == len(history) < 30  # stopped early
    assert chosen["epochs_run"] == chosen["epoch_chosen"] + 2  # patience 2
    assert chosen["val_accuracy"] == history["val_accuracy"].iloc[best]
    loss, _ = model.evaluate(val, verbose=0)  # the kept weights are that epoch's, not the last
    assert loss == pytest.approx(history["val_loss"].iloc[best], rel=1e-5)
    assert loss < history["val_loss"].iloc[-1]


def test_ema_weights_are_the_ones_validated_chosen_and_kept():
    """Keras' moving average (first step: the weights; then m * average + (1 - m) * weights), recomputed from
    an unaveraged run's per-step weights (the averaging does not change the steps): each epoch's validation
    loss is the average's, and early stopping keeps the average at its best epoch, not the raw weights."""
    x, y = toy()
    cfg = {**CFG, "epochs": 8, "learning_rate": 0.05, "early_stopping_monitor": "val_accuracy"}
    cfg |= {"early_stopping_patience": 2}
    val = train.feature_dataset(x[48:], y[48:], 8)

    def run(ema: float):
        steps = []

        class Steps(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                steps.append(self.model.get_weights())

        train.seed_everything(0)
        model = train.build_head((6,), 3, HEAD, 0)
        train.compile_for(model, {**cfg, "ema_momentum": ema}, 48)
        ds = train.feature_dataset(x[:48], y[:48], 8, 0)
        history, _, chosen = train.fit_with(
            {**cfg, "ema_momentum": ema}, model, ds, val, y[:48], 3, [] if ema else [Steps()]
        )
        return model, history, chosen, steps

    _, raw_history, _, steps = run(0.0)
    model, history, chosen = run(0.8)[:3]
    assert chosen["epoch_chosen"] < chosen["epochs_run"] < 8  # stopped early, kept an earlier epoch
    average, by_epoch = steps[0], []
    for step, weights in enumerate(steps[1 : 6 * chosen["epochs_run"]], start=2):
        average = [0.8 * a + 0.2 * w for a, w in zip(average, weights)]
        if step % 6 == 0:  # 48 examples in batches of 8: an epoch's end
            by_epoch.append(average)
    scorer = train.build_head((6,), 3, HEAD, 0)
    train.compile_for(scorer, CFG, 48)
    for epoch, weights in enumerate(by_epoch):
        scorer.set_weights(weights)
        assert history["val_loss"].iloc[epoch] == pytest.approx(scorer.evaluate(val, verbose=0)[0], rel=1e-5)
    assert not np.allclose(history["val_loss"], raw_history["val_loss"].iloc[: len(history)])
    kept = by_epoch[chosen["epoch_chosen"] - 1]
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(model.get_weights(), kept))
    assert isinstance(train.control_callbacks({**CFG, "ema_momentum": 0.8})[0], keras.callbacks.SwapEMAWeights)


def test_balanced_class_weights_follow_scikit_learns_definition_and_reach_the_loss():
    y = np.array([0] * 6 + [1] * 2 + [2] * 4)
    assert train.class_weights(y, 3, "balanced") == pytest.approx({0: 12 / 18, 1: 12 / 6, 2: 12 / 12})
    assert train.class_weights(y, 3, "sqrt") == pytest.approx({0: (12 / 18) ** 0.5, 1: 2**0.5, 2: 1.0})
    x = np.random.default_rng(0).normal(size=(12, 6)).astype("float32")
    cfg = {**CFG, "class_weight": "balanced", "epochs": 1, "learning_rate": 1e-12, "batch_size": 12}
    train.seed_everything(0)
    model = train.build_head((6,), 3, HEAD, 0)
    per_example = keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True).numpy()
    train.compile_for(model, cfg, 12)
    ds = train.feature_dataset(x, y, 12)
    history, _, chosen = train.fit_with(cfg, model, ds, ds, y, 3)  # one batch, weights unchanged (lr 1e-12)
    weights = np.array([chosen["class_weights"][c] for c in y])
    assert history["loss"].iloc[0] == pytest.approx(float(np.mean(weights * per_example)), rel=1e-5)
    assert history["val_loss"].iloc[0] == pytest.approx(float(np.mean(per_example)), rel=1e-5)  # validation unweighted


def test_label_smoothing_is_keras_categorical_smoothing_on_integer_labels():
    logits = tf.constant([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    y = np.array([0, 2])
    smoothed = train.SparseSmoothedCrossentropy(3, 0.1)(y, logits).numpy()
    keras_loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)
    assert smoothed == pytest.approx(keras_loss(np.eye(3)[y], logits).numpy(), rel=1e-6)
    # Keras' documented smoothing: targets y * (1 - s) + s / classes
    targets = np.eye(3)[y] * 0.9 + 0.1 / 3
    by_hand = -(targets * tf.nn.log_softmax(logits).numpy()).sum(1).mean()
    assert smoothed == pytest.approx(by_hand, rel=1e-5)
    plain = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits).numpy()
    assert smoothed > plain
    model = train.build_head((6,), 3, HEAD, 0)
    train.compile_for(model, CFG, 8)
    assert isinstance(model.loss, keras.losses.SparseCategoricalCrossentropy)  # off: the same loss as before
    train.compile_for(model, {**CFG, "label_smoothing": 0.1}, 8)
    assert isinstance(model.loss, train.SparseSmoothedCrossentropy)


def test_augmentation_presets_go_to_the_train_split_only_and_the_ablation_changes_one_thing():
    assert train.augmentation("finetune_top", "none", "none") == (None, None)  # the default: none at all
    assert train.augmentation("finetune_top", "el_cell", "none") == ("el_cell", None)
    assert train.augmentation("frozen_end_to_end", "el_cell", "none") == (None, None)  # must match train_head
    assert train.augmentation("finetune_top", "none", "train") == ("keras", None)  # the pitfall study as before
    assert train.augmentation("frozen_end_to_end", "el_cell", "train_and_val") == ("keras", "keras")
    assert train.augmentation("finetune_top", "el_cell", "train_and_val") == ("el_cell", "el_cell")


def test_el_cell_preset_is_seeded_keeps_shape_and_dtype_and_rotates_by_quarter_turns():
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (16, 10, 10, 3)).astype("float32"))
    out = [features.augmenter(seed, "el_cell")(images, training=True).numpy() for seed in (3, 3, 4)]
    assert out[0].shape == images.shape and out[0].dtype == np.float32
    assert np.array_equal(out[0], out[1]) and not np.array_equal(out[0], out[2])
    assert out[0].min() >= 0 and out[0].max() <= 255
    turned = features.RandomRot90(seed=0)(images).numpy()
    dihedral = lambda im: [np.rot90(im, k) for k in range(4)]  # noqa: E731
    kinds = [next(k for k, r in enumerate(dihedral(im)) if np.array_equal(r, t)) for im, t in zip(images, turned)]
    assert len(set(kinds)) > 1  # every image is an exact quarter turn of itself, not all the same one
    assert np.array_equal(features.RandomRot90(seed=0)(images, training=False).numpy(), images.numpy())


def test_augmented_image_dataset_is_seeded(tmp_path):
    from PIL import Image

    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(paths[-1])
    from transferlab import backbones

    record = backbones.preprocessing_record(backbones.get("efficientnet_lite0"), "native", 12)
    batches = lambda seed: np.concatenate(  # noqa: E731
        [x.numpy() for x, _ in features.image_dataset(paths, [0, 1, 2, 3], record, 2, None, seed, "el_cell")]
    )
    plain = np.concatenate([x.numpy() for x, _ in features.image_dataset(paths, [0, 1, 2, 3], record, 2)])
    assert np.array_equal(batches(5), batches(5)) and not np.array_equal(batches(5), plain)
    assert batches(5).shape == plain.shape and batches(5).dtype == plain.dtype


def test_linear_probe_converges_and_is_written_into_the_keras_head():
    x, y = toy(n=300, d=8, classes=3)
    cfg = {**CFG, "probe_solver": "lbfgs", "class_weight": "balanced"}
    head = {**HEAD, "units": 0, "dropout": 0.5}
    model, history, _, chosen = train.train_head(x[:200], y[:200], x[200:250], y[200:250], 3, cfg, head)
    assert list(history["C"]) == list(train.PROBE_C) and chosen["epochs_run"] == len(train.PROBE_C)
    best = chosen["epoch_chosen"] - 1
    assert chosen["probe_c"] == train.PROBE_C[best]
    assert chosen["val_accuracy"] == history["val_accuracy"].max()
    assert (model(x[250:], training=False).numpy().argmax(1) == y[250:]).mean() >= 0.9

    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    for classes in (3, 2):  # the folded Dense layer computes scikit-learn's logits on unscaled features
        keep = y[:200] < classes
        scaler = StandardScaler().fit(x[:200][keep])
        clf = LogisticRegression().fit(scaler.transform(x[:200][keep]), y[:200][keep])
        kernel, bias = train._folded(clf, scaler, 3)
        logits = x[200:] @ kernel + bias
        expected = clf.predict_proba(scaler.transform(x[200:]))
        got = tf.nn.softmax(logits).numpy()[:, :classes]
        assert got == pytest.approx(expected, abs=1e-4)


def epochs_of(ds, n_epochs: int) -> list[np.ndarray]:
    return [np.array(list(ds.as_numpy_iterator())) for _ in range(n_epochs)]


def test_oversampling_draws_classes_by_a_power_of_their_counts_and_keeps_the_epochs_length():
    y = np.array([0] * 60 + [1] * 15 + [2] * 5)  # shares 0.75 / 0.1875 / 0.0625
    plain = epochs_of(features.epoch_order(y, 3), 2)
    assert all(sorted(e) == list(range(80)) for e in plain) and not np.array_equal(*plain)  # each row once
    assert np.array_equal(plain[0], epochs_of(tf.data.Dataset.range(80).shuffle(80, seed=3), 1)[0])  # as before
    for mode, power in (("sqrt", 0.5), ("balanced", 0.0)):
        epochs = epochs_of(features.epoch_order(y, 3, mode), 200)
        assert {len(e) for e in epochs} == {80}  # the epoch keeps its length: the schedule's steps do not change
        assert not np.array_equal(epochs[0], epochs[1])  # drawn anew each epoch
        assert all(np.array_equal(a, b) for a, b in zip(epochs[:3], epochs_of(features.epoch_order(y, 3, mode), 3)))
        drawn = np.bincount(y[np.concatenate(epochs)], minlength=3) / (200 * 80)
        expected = np.array([60, 15, 5]) ** power / (np.array([60, 15, 5]) ** power).sum()
        assert drawn == pytest.approx(expected, abs=0.01)  # 16,000 draws: binomial sd below 0.004
        for epoch in epochs:  # within an epoch a class's rows come in reshuffled cycles: none drawn twice more
            rare = epoch[y[epoch] == 2] - 75
            assert np.ptp(np.bincount(rare, minlength=5)) <= 1
    assert epochs_of(features.epoch_order(y, None, "sqrt"), 1)[0].tolist() == list(range(80))  # unshuffled: in order
    assert set(OVERSAMPLING) == set(features.OVERSAMPLE_POWER)  # every mode params accepts has its power


def test_oversampled_features_and_images_come_in_the_same_order(tmp_path):
    """frozen_end_to_end must reproduce train_head: under oversampling too, images and their features are drawn
    row for row alike."""
    from PIL import Image

    from transferlab import backbones

    paths, y = [], np.array([0, 0, 0, 0, 0, 1, 1, 2])
    for i in range(len(y)):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((4, 4, 3), i * 30, np.uint8)).save(paths[-1])
    record = backbones.preprocessing_record(backbones.get("vgg16"), "rescale", 4)
    x = np.arange(len(y), dtype=np.float32)[:, None] * 30 / 255  # row i's feature: its image's pixel value
    for _ in range(3):
        images = features.image_dataset(paths, y, record, 3, shuffle_seed=7, oversample="balanced")
        rows = train.feature_dataset(x, y, 3, shuffle_seed=7, oversample="balanced")
        for (xi, yi), (xf, yf) in zip(images, rows, strict=True):
            assert np.allclose(xi.numpy()[:, 0, 0, 0], xf.numpy()[:, 0]) and np.array_equal(yi, yf)
