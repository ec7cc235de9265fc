"""Pretrain once, fine-tune many (``pretrain_cache``), and promote only a better model
(``tracking.promote``): real training on tiny data, real MLflow stores under tmp_path, asserted
through MlflowClient as a user would look."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest

import tfharness
from conftest import TINY_SYNTHETIC
from tfharness.errors import ConfigError, HarnessError
from tfharness.pipeline import pretrain_cache
from tfharness.pipeline.fingerprint import FINGERPRINT_TAG
from test_sweeps import parent_and_children, sweep, trials_table

QUICK = [*TINY_SYNTHETIC, "model.units=[4]", "trainer.epochs=2", "finetune.epochs=2"]
# Timings and byte sizes differ between runs; everything else must repeat exactly.
UNTIMED = ("seconds", "per_second", "size_bytes")


def comparable(metrics):
    return {k: v for k, v in metrics.items() if not any(p in k for p in UNTIMED)}


def weights(path: Path):
    return [np.asarray(w) for w in tfharness.serialization.load_model(path).weights]


def test_a_run_reuses_a_finished_pretraining_with_the_same_fingerprint(make_cfg, client):
    first = tfharness.run(make_cfg([*QUICK, "finetune.learning_rate=1e-2"], out="a"))
    second = tfharness.run(make_cfg([*QUICK, "finetune.learning_rate=1e-1"], out="b"))
    fresh = tfharness.run(make_cfg([*QUICK, "finetune.learning_rate=1e-1",
                                    "pretrain_cache=off"], out="c"))
    assert first.pretrain_reused_from is None and fresh.pretrain_reused_from is None
    assert second.pretrain_reused_from == first.run_id
    runs = {r.info.run_id: r for r in client.search_runs(
        [client.get_experiment_by_name("tfharness").experiment_id])}
    reused = runs[second.run_id]
    tags = reused.data.tags
    assert tags[pretrain_cache.REUSED_FROM_TAG] == first.run_id
    assert tags[pretrain_cache.PRETRAIN_TAG] == "reused"
    assert tags["pretrain_cache"] == "auto" and "pretrain_cache" not in reused.data.params
    # One fingerprint for the three; searchable as a tag.
    digest = tags[FINGERPRINT_TAG]
    same = client.search_runs([reused.info.experiment_id],
                              filter_string=f"tags.`{FINGERPRINT_TAG}` = '{digest}'")
    assert {r.info.run_id for r in same} == {first.run_id, second.run_id, fresh.run_id}
    # Not pretrained here: no pretrain metrics, no pretrained model of its own; the lineage
    # leads to the run that measured them.
    assert not [k for k in reused.data.metrics if k.startswith("pretrain/")]
    assert runs[first.run_id].data.metrics["pretrain/test_loss"] == first.metrics[
        "pretrain/test_loss"]
    assert f"{tfharness.tracking.MODEL_URI_TAG}.pretrained" not in tags
    model_inputs = client.get_run(second.run_id).inputs.model_inputs
    assert [m.model_id for m in model_inputs] == [
        runs[first.run_id].data.tags[f"{tfharness.tracking.MODEL_URI_TAG}.pretrained"]
        .split("/")[-1]]
    local = client.download_artifacts(second.run_id, pretrain_cache.REUSE_REPORT)
    assert first.run_id in Path(local).read_text() and "pretrain/test_loss" in Path(
        local).read_text()
    # Deterministic training: the reused model is what a fresh pretraining produces.
    for reused_w, fresh_w in zip(weights(second.artifacts["pretrained"]),
                                 weights(fresh.artifacts["pretrained"]), strict=True):
        np.testing.assert_array_equal(reused_w, fresh_w)
    assert comparable(second.metrics) == {k: v for k, v in comparable(fresh.metrics).items()
                                          if not k.startswith(("pretrain/", "reload/"))
                                          or k.startswith("reload/finetuned/")}


def test_what_changes_pretraining_changes_the_fingerprint_and_refresh_pretrains(make_cfg,
                                                                                client):
    base = tfharness.run(make_cfg(QUICK, out="a"))
    other_seed = tfharness.run(make_cfg([*QUICK, "trainer.seed=7"], out="b"))
    other_data = tfharness.run(make_cfg([*QUICK, "data.seed=3"], out="c"))
    assert other_seed.pretrain_reused_from is None and other_data.pretrain_reused_from is None
    refreshed = tfharness.run(make_cfg([*QUICK, "pretrain_cache=refresh"], out="d"))
    assert refreshed.pretrain_reused_from is None
    after = tfharness.run(make_cfg([*QUICK, "finetune.epochs=1"], out="e"))
    assert after.pretrain_reused_from == refreshed.run_id != base.run_id
    prints = {client.get_run(r.run_id).data.tags[FINGERPRINT_TAG]
              for r in (base, other_seed, other_data)}
    assert len(prints) == 3
    recorded = json.loads(Path(client.download_artifacts(
        base.run_id, "pretrain_fingerprint.json")).read_text())
    assert set(recorded) >= {"fingerprint", "data", "model", "trainer", "seed", "source",
                             "versions"}
    assert set(recorded["versions"]) == {"tfharness", "tensorflow", "keras"}


def test_a_bad_pretrain_cache_value_is_one_clear_error(make_cfg):
    with pytest.raises(ConfigError, match="'pretrain_cache': got 'sometimes'"):
        tfharness.run(make_cfg([*QUICK, "pretrain_cache=sometimes"]))


def test_one_claim_lands_and_a_failed_holder_is_a_clear_error(client):
    experiment = client.create_experiment("claims")
    parent = client.create_run(experiment).info.run_id
    holder = client.create_run(experiment).info.run_id
    other = client.create_run(experiment).info.run_id
    assert pretrain_cache.claim(client, parent, "ab" * 32, holder) == holder
    assert pretrain_cache.claim(client, parent, "ab" * 32, other) == holder
    client.set_tag(holder, "error", "NumericalError: loss is NaN")

    def query(function, *args):  # what Tracker.query does with this store
        return function(client, *args)

    client.set_terminated(holder, "FAILED")
    with pytest.raises(HarnessError, match=f"run {holder}.*ended FAILED.*loss is NaN"):
        pretrain_cache.wait_for(query, holder, 5.0, "ab" * 32)
    running = client.create_run(experiment).info.run_id
    with pytest.raises(HarnessError, match="waited pretrain_wait_s=0"):
        pretrain_cache.wait_for(query, running, 0.0, "ab" * 32)


def test_a_parallel_sweep_pretrains_once_and_matches_a_sweep_without_the_cache(tmp_path):
    """Three jobs at once (joblib) in a fresh store share one fingerprint: one pretrains, the
    others wait for it and reuse it; under deterministic training every trial's metrics equal
    those of the same sweep with pretrain_cache=off."""
    space = ["model.units=[4]", "trainer.epochs=2", "finetune.epochs=2",
             "finetune.learning_rate=1e-1,1e-2,1e-3"]
    cached_uri, off_uri = (f"sqlite:///{tmp_path / name}" for name in ("cached.db", "off.db"))
    # Each job asks the store through its tracking process (claim, wait, find).
    out = sweep("hydra/launcher=joblib", "hydra.launcher.n_jobs=3", "tracking.process=true",
                *space, f"hydra.sweep.dir={tmp_path / 'cached'}", cwd=tmp_path, uri=cached_uri)
    assert out.returncode == 0, out.stderr[-3000:]
    out = sweep("pretrain_cache=off", *space, f"hydra.sweep.dir={tmp_path / 'off'}",
                cwd=tmp_path, uri=off_uri)
    assert out.returncode == 0, out.stderr[-3000:]
    client = mlflow.MlflowClient(cached_uri)
    parent, children = parent_and_children(client)
    trained = [c for c in children if c.data.tags[pretrain_cache.PRETRAIN_TAG] == "trained"]
    assert len(trained) == 1
    holder = trained[0].info.run_id
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags.get("error")
        if child.info.run_id != holder:
            assert child.data.tags[pretrain_cache.REUSED_FROM_TAG] == holder
            assert "pretrain/loss" not in child.data.metrics
    table = trials_table(client, parent.info.run_id, tmp_path)
    assert sorted(row["pretrain"] for row in table) == sorted(
        ["trained", f"reused {holder}", f"reused {holder}"])
    _, off_children = parent_and_children(mlflow.MlflowClient(off_uri))
    assert all(c.data.tags[pretrain_cache.PRETRAIN_TAG] == "trained" for c in off_children)
    by_rate = {c.data.params["finetune.learning_rate"]: c for c in off_children}
    for child in children:
        fresh = by_rate[child.data.params["finetune.learning_rate"]].data.metrics
        mine = comparable(child.data.metrics)
        assert "test/loss" in mine and "finetune/val_loss" in mine
        assert mine == {k: v for k, v in comparable(fresh).items() if k in mine}


DIGITS = ["model.units=[16]", "trainer.epochs=2", "finetune.epochs=3",
          "tracking.register=digits-clf", "tracking.promote=champion",
          "tracking.promote_metric=finetune/val_accuracy"]


def test_the_alias_moves_only_to_a_better_model(make_cfg, client):
    worse = ["finetune.learning_rate=1e-9"]
    first = tfharness.run(make_cfg([*DIGITS, *worse], out="a"))
    assert first.promotion.promoted and "no model holds the alias" in first.promotion.reason
    better = tfharness.run(make_cfg([*DIGITS, "finetune.learning_rate=1e-2"], out="b"))
    assert better.promotion.promoted, better.promotion.reason
    again = tfharness.run(make_cfg([*DIGITS, *worse], out="c"))
    assert not again.promotion.promoted
    assert str(client.get_model_version_by_alias("digits-clf", "champion").version) == "2"
    assert sorted(int(v.version) for v in client.search_model_versions("name='digits-clf'")) == [
        1, 2, 3]
    run = client.get_run(again.run_id)
    assert run.data.tags["tfharness.promotion"].startswith("not promoted to digits-clf@champion")
    assert run.data.tags["tfharness.registered_model"] == "digits-clf/3"
    # Both models evaluated on the same data in this run: the champion's value is what it
    # measured for itself, the candidate's what the first (identical) run measured.
    assert run.data.metrics["promotion/champion"] == client.get_run(
        better.run_id).data.metrics["promotion/candidate"]
    assert run.data.metrics["promotion/candidate"] == first.promotion.candidate
    assert again.promotion.candidate < again.promotion.champion
    table = json.loads(Path(client.download_artifacts(
        again.run_id, "promotion/comparison.json")).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [row["decision"] for row in rows] == ["not promoted", "keeps the alias"]
    assert rows[1]["model"] == "digits-clf@champion (version 2)"


def test_promote_needs_a_registered_name_and_a_held_out_metric(make_cfg):
    with pytest.raises(ConfigError, match="'tracking.promote'"):
        tfharness.run(make_cfg([*QUICK, "tracking.promote=champion"]))
    with pytest.raises(ConfigError, match="'tracking.promote_metric'"):
        tfharness.run(make_cfg([*QUICK, "tracking.register=x", "tracking.promote=champion",
                                "tracking.promote_metric=finetune/loss"]))


def test_a_sweeps_best_trial_worse_than_the_champion_is_registered_without_the_alias(
        make_cfg, client, tracking_uri):
    """Today's register_best moved `champion` to the latest sweep's best trial even when it was
    worse; with tracking.promote the sweep decides on what its best trial measured."""
    from omegaconf import OmegaConf

    from tfharness.sweeps import SweepCallback, collect

    good = ["model.units=[16]", "trainer.epochs=2", "finetune.epochs=3",
            "finetune.learning_rate=1e-2"]
    champion = tfharness.run(make_cfg([*good, "tracking.register=clf",
                                       "tracking.promote=champion"], out="champion"))
    assert champion.promotion.promoted
    experiment = client.get_experiment_by_name("tfharness").experiment_id
    parent = client.create_run(experiment, tags={"tfharness.sweep": "parent"}).info.run_id
    trial_cfg = make_cfg([*good, "finetune.learning_rate=1e-9", "sweep.register_best=clf",
                          "tracking.promote=champion"], out="trial")
    trial = tfharness.run(trial_cfg, parent_run_id=parent, require_objective=True,
                          tags={"tfharness.job_num": "0"})
    measured = client.get_run(trial.run_id).data
    assert measured.tags["tfharness.promotion.champion"] == "clf/1"
    assert measured.metrics["promotion/champion"] > measured.metrics["promotion/candidate"]
    # The sweep's end, as SweepCallback.finish runs it in the launching process.
    callback = SweepCallback()
    callback.parent_run_id, callback._client, callback._experiment_id = parent, client, experiment
    callback._cfg = OmegaConf.create(OmegaConf.to_container(trial_cfg, resolve=True))
    summary = collect(client, experiment, parent, "finetune/val_accuracy", "maximize")
    callback._register_champion(summary.best)
    assert str(client.get_model_version_by_alias("clf", "champion").version) == "1"
    assert len(client.search_model_versions("name='clf'")) == 2
    tags = client.get_run(parent).data.tags
    assert tags["tfharness.registered_model"] == "clf/2"
    assert tags["tfharness.promotion"].startswith("version 2 not promoted to clf@champion")
    table = json.loads(Path(client.download_artifacts(
        parent, "promotion/comparison.json")).read_text())
    assert table["data"][0][table["columns"].index("decision")] == "not promoted"
