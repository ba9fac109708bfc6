"""Serve application configs built by the control plane: ``serve.engine: vllm`` (Ray Serve LLM) and the one
OpenAI base URL (the ``/v1`` gateway application) carried along with every deploy."""

from __future__ import annotations

import pytest

from zeroplane.errors import SpecError
from zeroplane.names import GATEWAY_APP, GATEWAY_IMPORT_PATH
from zeroplane.serving import ServeClient, app_config, served_version

VERSION = {"version": "v3", "uri": "s3://bucket/models/m/v3"}


def vllm_app(**overrides):
    defaults = {"engine": "vllm", "ray_actor_options": {"num_cpus": 4, "num_gpus": 2},
                "autoscaling": {"min_replicas": 1, "max_replicas": 3}}
    return app_config("m", VERSION, "s3://bucket", defaults, {"auth": False, **overrides})


def test_vllm_engine_renders_a_ray_serve_llm_app_from_the_version():
    app = vllm_app()
    assert app["import_path"] == "ray.serve.llm:build_openai_app" and app["route_prefix"] == "/m"
    (llm,) = app["args"]["llm_configs"]
    assert llm["model_loading_config"] == {"model_id": "m:v3", "model_source": "s3://bucket/models/m/v3"}
    assert llm["engine_kwargs"] == {"tensor_parallel_size": 2}
    assert llm["deployment_config"]["autoscaling_config"]["max_replicas"] == 3
    assert served_version(app["args"]) == "v3"


def test_vllm_engine_needs_auth_off_and_no_canary():
    with pytest.raises(SpecError, match="--no-auth"):
        app_config("m", VERSION, "/s", {"engine": "vllm"})
    with pytest.raises(SpecError, match="canary"):
        app_config("m", VERSION, "/s", {"engine": "vllm"}, {"auth": False},
                   canary={"version": "v4", "uri": "/v4"}, canary_percent=10)


def test_vllm_config_validates_against_ray_serve_llm():
    pytest.importorskip("vllm", reason="ray.serve.llm imports only with vLLM (or SGLang) installed")
    from ray.serve.llm import LLMServingArgs

    args = LLMServingArgs.model_validate(vllm_app()["args"])
    assert args.llm_configs[0].model_loading_config.model_id == "m:v3"


def test_engines_of_the_zeroplane_app_pass_through():
    assert app_config("m", VERSION, "/s", {})["args"]["engine"] == "continuous"
    assert app_config("m", VERSION, "/s", {"engine": "generate"})["args"]["engine"] == "generate"


class FakeServe(ServeClient):
    """A ServeClient whose Serve is a dict of applications; records every config sent."""

    def __init__(self, apps):
        super().__init__("http://127.0.0.1:8265")
        self.apps, self.sent = apps, []
        self._client = self

    def applications(self):
        return {a["name"]: {"deployed_app_config": a, "status": "RUNNING"} for a in self.apps}

    def deploy_applications(self, config):
        self.sent.append(config)
        self.apps = config["applications"]

    def delete_applications(self):
        self.sent.append(None)
        self.apps = []


def test_the_first_deploy_adds_the_v1_gateway_and_the_last_delete_removes_it():
    serve = FakeServe([])
    serve.apply(app_config("m", VERSION, "/store", {}))
    names = [a["name"] for a in serve.apps]
    assert names == ["m", GATEWAY_APP]
    gateway = serve.apps[1]
    assert gateway["import_path"] == GATEWAY_IMPORT_PATH and gateway["route_prefix"] == "/v1"
    assert gateway["args"] == {"storage_path": "/store", "auth": True}  # keys always checked on /v1

    serve.apply(app_config("n", VERSION, "/store", {}))
    assert sorted(a["name"] for a in serve.apps) == sorted(["m", "n", GATEWAY_APP])
    assert [r["name"] for r in serve.status(with_requests=False)] == ["m", "n"]
    serve.delete("m")
    serve.delete("n")
    assert serve.apps == [] and serve.sent[-1] is None
