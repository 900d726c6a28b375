"""What the MLflow store holds for people browsing it: experiments of the model-training kind,
and the settings that tell pipelines apart on the pipeline run."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from core.config import TeacherConfig, TrackingConfig
from jobs.tracking import RunLogger, pipeline_params, tracking_uri
from tests.conftest import tiny_config

KIND = "mlflow.experimentKind"  # the tag MLflow 3's UI reads and its experiment-type setting writes


def test_experiments_are_model_training_experiments(tracking_dir):
    run = RunLogger.create("pipeline", TrackingConfig(experiment="fresh"))
    client = MlflowClient(run.uri)
    assert run.uri == tracking_uri() and run.uri.startswith("sqlite:")
    assert client.get_experiment(run.experiment_id).tags[KIND] == "custom_model_development"

    # An experiment from before the tag gets it; a kind chosen in the UI stays.
    older = client.create_experiment("older")
    chosen = client.create_experiment("chosen", tags={KIND: "genai_development"})
    RunLogger.create("extract", TrackingConfig(experiment="older"))
    RunLogger.create("extract", TrackingConfig(experiment="chosen"))
    assert client.get_experiment(older).tags[KIND] == "custom_model_development"
    assert client.get_experiment(chosen).tags[KIND] == "genai_development"


def test_pipeline_params_name_what_was_trained(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    teacher = TeacherConfig(kind="open_clip", name="vidkd-vit-micro").model_dump()
    cfg = tiny_config(tmp_path, manifest, extract={"teacher": teacher})
    assert pipeline_params(cfg) == {
        "teacher": "open_clip vidkd-vit-micro", "student": "vidkd-vit-micro", "objective": "teachclip",
        "teacher_mode": "cached", "epochs": 2, "loss.w_in": 0.2, "loss.w_cgt": 1.0, "loss.w_fgt": 2.0,
        "loss.temperature": 0.07, "loss.tau_video": "auto", "loss.tau_frame": "auto", "tune": "off"}

    # DLDKD's own weights and temperatures, not TeachCLIP's; the demo's teacher is trained here.
    raw = cfg.model_dump(mode="json")
    raw["distill"]["loss"].update(objective="dldkd", w_feat=0.5, tau_video=0.05)
    raw["teacher_training"] = {"distill": {**raw["distill"], "student": {"model": "vidkd-vit-base-32px"},
                                           "epochs": 7, "teacher_mode": "none", "loss": {"objective": "none"}}}
    raw["tune"].update(enabled=True, num_samples=4)
    dldkd = pipeline_params(type(cfg).model_validate(raw))
    assert dldkd["teacher"] == "trained vidkd-vit-base-32px" and dldkd["teacher.epochs"] == 7
    assert dldkd["objective"] == "dldkd" and dldkd["loss.w_feat"] == 0.5 and dldkd["tune"] == "4 trials"
    assert {"loss.lambda_i0", "loss.gamma_e", "loss.tau_kl", "loss.tau_explore"} <= set(dldkd)
    assert not {"loss.w_cgt", "loss.w_fgt", "loss.tau_video", "loss.tau_frame"} & set(dldkd)

    raw["teacher_training"] = None
    raw["extract"]["teacher"] = {"kind": "internvideo2", "variant": "stage2-1b", "checkpoint": "iv2/1b.pt",
                                 "tokenizer": "bert"}
    assert pipeline_params(type(cfg).model_validate(raw))["teacher"] == "internvideo2 stage2-1b iv2/1b.pt"


def test_pipeline_params_as_the_runs_table_shows_them(tracking_dir, tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "manifest.jsonl")
    run = RunLogger.create("pipeline")
    run.log_params(pipeline_params(cfg))
    params = MlflowClient(run.uri).get_run(run.run_id).data.params
    assert params["teacher"] == "none" and params["loss.tau_video"] == "auto" and params["loss.w_fgt"] == "2.0"
    assert params["epochs"] == "2"
