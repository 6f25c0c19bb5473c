"""TF-MOT glue checked against TF-MOT itself (imports TensorFlow)."""

import numpy as np
import pytest

pytestmark = pytest.mark.tf


@pytest.fixture(scope="module")
def tfm():
    from edge_agent.ml import tfenv

    return tfenv.load(1)


def test_numpy_2of4_matches_tfmot(tfm):
    from tensorflow_model_optimization.python.core.sparsity.keras import pruning_utils as pu

    from coordinator.masks import mbyn_mask

    rng = np.random.default_rng(0)
    for shape in [(16, 8), (10, 3), (3, 3, 8, 6), (3, 3, 5, 4)]:
        w = rng.normal(size=shape).astype(np.float32)
        t = tfm.tf.constant(w)
        ref = (
            pu.m_by_n_sparsity_mask_prepare(pu.generate_m_by_n_mask(pu.weights_rearrange(t), (2, 4)), t.shape)
            .numpy()
            .astype(bool)
        )
        np.testing.assert_array_equal(mbyn_mask(np.abs(w)), ref, err_msg=str(shape))


def test_wrap_reports_layers_it_cannot_prune(tfm):
    from edge_agent.ml import pruning

    keras = tfm.keras

    class Scale(keras.layers.Layer):  # a custom layer with weights TF-MOT knows nothing about
        def build(self, input_shape):
            self.s = self.add_weight(name="s", shape=(input_shape[-1],), initializer="ones")

        def call(self, x):
            return x * self.s

    inp = keras.Input((8,))
    x = keras.layers.Dense(16, name="fc")(inp)
    x = Scale(name="my_scale")(x)
    out = keras.layers.Dense(3, name="out")(x)
    model = keras.Model(inp, out)
    wrapped, report, schedules = pruning.wrap(model, "unstructured")
    assert set(schedules) == {"fc", "out"}
    assert set(report["pruned"]) == {"fc", "out"}
    assert "my_scale" in report["dense"] and "not supported" in report["dense"]["my_scale"]
    spec = pruning.weight_spec(wrapped)
    assert [s["prunable"] for s in spec] == [True, False, False, True, False]
    # one weight order on both sides: the plain model's weights round-trip through the wrapped one
    plain = pruning.get_weights(model)
    for a, b in zip(plain, pruning.get_weights(wrapped)):
        np.testing.assert_array_equal(a, b)


def test_round_schedule_reaches_target_and_keeps_masks(tfm):
    from edge_agent.ml import data, models, pruning

    model = models.build("digits_cnn", (8, 8, 1), 10)
    sched = pruning.make_round_schedule()
    wrapped, _, _ = pruning.wrap(model, "unstructured", lambda: sched)
    models.compile_model(wrapped)
    train, _ = data.digits_split()
    cb = [tfm.tfmot.sparsity.keras.UpdatePruningStep()]
    sched.set(0.0, 0.8, 1, 9, 2, True)
    wrapped.fit(train.x[:320], train.y[:320], epochs=1, batch_size=32, callbacks=cb, verbose=0)
    masks = [m for m in pruning.get_masks(wrapped) if m is not None]
    assert all(abs((1 - m.mean()) - 0.8) < 0.01 for m in masks)
    # steady state: schedule inactive, the masks we set are kept exactly
    sched.set(0.8, 0.8, 20, 20, 1, False)
    wrapped.fit(train.x[:320], train.y[:320], epochs=1, batch_size=32, callbacks=cb, verbose=0)
    after = [m for m in pruning.get_masks(wrapped) if m is not None]
    assert all(np.array_equal(a, b) for a, b in zip(masks, after))
    weights = pruning.get_weights(wrapped)
    full_masks = pruning.get_masks(wrapped)
    assert all(np.all(w[~m] == 0) for w, m in zip(weights, full_masks) if m is not None)
