"""Run names and table columns as the MLflow UI shows them (pure functions, no MLflow)."""

from tfharness.tracking import naming


def test_short_keys_tell_swept_keys_apart():
    assert naming.short_keys(["finetune.learning_rate", "model"]) == {
        "finetune.learning_rate": "lr", "model": "model"}
    # Two keys that would read the same get their group in front.
    assert naming.short_keys(["finetune.epochs", "trainer.epochs", "trainer.batch_size"]) == {
        "finetune.epochs": "ft.epochs", "trainer.epochs": "tr.epochs", "trainer.batch_size": "bs"}


def test_sweep_child_is_named_by_its_swept_values_in_typed_order():
    overrides = ["data=digits", "finetune.learning_rate=1e-3", "model=cnn", "trainer.seed=3"]
    assert naming.run_name(overrides, ["finetune.learning_rate", "model"]) == "lr=0.001 model=cnn"
    assert naming.sweep_name({"finetune.learning_rate": "1e-2,1e-3", "model": "mlp,cnn"}) == \
        "sweep lr × model"


def test_a_single_run_is_named_by_what_it_changed_not_where_it_records():
    overrides = ["trainer.epochs=3", "tracking.uri=sqlite:///x.db", "output_dir=/tmp/o",
                 "print_report=false", "model.units=[16, 16]"]
    assert naming.run_name(overrides, fallback="digits-mlp") == "epochs=3 units=[16,16]"
    assert naming.run_name(["resume=true"], fallback="digits-mlp") == "digits-mlp"


def test_values_read_short_and_integers_stay_as_typed():
    assert [naming.format_value(v) for v in ("1e-2", "0.0010", "1234567", "true", "[4]")] == [
        "0.01", "0.001", "1234567", "true", "[4]"]


def test_table_columns_have_no_dots():
    rows = [{"trial": 0, "finetune.learning_rate": "0.01"}, {"trial": 1,
                                                             "finetune.learning_rate": "0.001"}]
    assert naming.table_columns(rows) == {"trial": [0, 1],
                                          "finetune_learning_rate": ["0.01", "0.001"]}
