"""Remote runs on a real NDIF server (started on 127.0.0.1 by ``conftest.py``).

The server runs in its own virtual environment, where ``interventions`` is not
installed: every graph that runs here proves the shipped payload is self-contained.
Remote results are held to local ones at the conformance tolerance (1e-5), generated
tokens exactly. Faults are injected for real: a closed port, a server that is not NDIF,
bad API keys, an undeployed model, a trace that raises, timeouts, a model replica killed
mid-job, and the API stopped and restarted mid-job. Every network call goes to
127.0.0.1, with bounded retries and timeouts.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from interventions.adapters import nnsight as nns

import interventions as iv
from interventions.architectures import describe
from interventions.recipes import Metric, activation_patching
from tests.adapters.nnsight.test_nnsight_agreement import (
    _flow_graph,
    _generation_graph,
    _sae,
    _selector_graph,
)
from tests.conformance.test_conformance import draw_graph
from tests.remote.conftest import ROOT, Stack
from tests.tiny_models import hf_model, word_tokenizer

pytestmark = pytest.mark.remote

TOL = {"atol": 1e-5, "rtol": 1e-5}


def assert_same(got: iv.Results, want: iv.Results) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        if not want[name].is_floating_point():
            assert torch.equal(got[name], want[name]), name
            continue
        torch.testing.assert_close(
            got[name], want[name], equal_nan=True, msg=lambda m, n=name: f"{n}: {m}", **TOL
        )


def remote(graph: iv.Graph, ndif: Stack, **options: Any) -> iv.Results:
    return iv.run(graph, ndif.checkpoint, backend="nnsight", remote=True, **options)


def local(graph: iv.Graph, **options: Any) -> iv.Results:
    return iv.run(graph, hf_model("llama"), backend="nnsight", **options)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def long_graph(rows: int = 2048) -> iv.Graph:
    """29 forward passes (one per prompt length) of ``rows`` prompts: a few seconds of work."""
    g = iv.Graph()
    gen = torch.Generator().manual_seed(0)
    for length in range(2, 31):
        run = g.run(f"r{length}", tokens=torch.randint(3, 64, (rows, length), generator=gen))
        run.read("logits", pos=-1, name=f"out{length}")
    return g


def small_graph() -> iv.Graph:
    g = iv.Graph()
    a = g.run("a", tokens=torch.tensor([[5, 6, 7, 8]]))
    b = g.run("b", tokens=torch.tensor([[9, 6, 7, 8]]))
    b.patch("resid_post", layer=0, pos=1, value=a.read("resid_post", layer=0))
    b.read("logits", pos=-1, name="out")
    return g


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def model_ready(ndif: Stack, timeout: float = 120.0) -> None:
    """Wait until the deployed model answers again (after a replica was killed)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            remote(small_graph(), ndif, timeout=30)
            return
        except iv.RemoteError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


# ---------------------------------------------------------------------------------------
# the same numbers as a local run


def test_a_remote_run_is_a_local_run_with_provenance(ndif: Stack) -> None:
    g = small_graph()
    got = remote(g, ndif)
    assert_same(got, local(g))
    prov = dict(got.provenance.remote)
    assert prov["host"] == ndif.url
    assert prov["model_key"] == ndif.model_key
    assert len(prov["job_id"]) >= 16
    assert got.provenance.graph == g.fingerprint()
    assert got.provenance.backend == "nnsight"
    # a model object of the same architecture works as well as the model's name
    same = iv.run(g, hf_model("llama"), backend="nnsight", remote=True, model_key=ndif.checkpoint)
    assert_same(same, got)


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_conformance_graphs_remote_equal_local(ndif: Stack, data: st.DataObject) -> None:
    graph = draw_graph(data, "llama")
    tokenizer = word_tokenizer()
    assert_same(remote(graph, ndif, tokenizer=tokenizer), local(graph, tokenizer=tokenizer))


@pytest.mark.parametrize("batch", [True, False], ids=["merged", "invokes"])
def test_named_graphs_remote_equal_local(ndif: Stack, batch: bool) -> None:
    """Every op and selector kind, values flowing between runs and stages, SAE splices and
    attention patterns (eager attention switched on the host for the request)."""
    info = describe(hf_model("llama"))
    selectors, _ = _selector_graph(info, part=None if batch else 2)
    for graph in (selectors, _flow_graph()):
        assert_same(remote(graph, ndif, batch=batch), local(graph, batch=batch))
    g = iv.Graph()
    run = g.run("x", tokens=torch.tensor([[5, 9, 14, 3, 22, 7]]))
    edits = [iv.FeatureEdit.set(1, 3.0), iv.FeatureEdit.clamp([4, 5], low=0.1, high=0.2)]
    run.sae_splice(
        "resid_post", 0, sae=_sae("topk", 32), edits=edits, features="x.feats", pos=[1, 3]
    )
    run.read("attn_pattern", 1, name="x.pattern")
    run.read("logits", name="x.logits")
    assert_same(remote(g, ndif, batch=batch), local(g, batch=batch))
    # a cross-site transcoder: reads resid_pre[1], writes mlp_out[1] in the same forward
    g = iv.Graph()
    run = g.run("t", tokens=torch.tensor([[5, 9, 14, 3, 22, 7]]))
    gen = torch.Generator().manual_seed(0)
    tc = iv.Transcoder(
        torch.randn(32, 48, generator=gen) * 0.2, torch.zeros(48),
        torch.randn(48, 32, generator=gen) * 0.2, torch.zeros(32),
    )  # fmt: skip
    run.sae_splice("mlp_out", 1, sae=tc, source="resid_pre", source_layer=1, error="drop",
                   features="t.feats")  # fmt: skip
    run.read("logits", name="t.logits")
    assert_same(remote(g, ndif, batch=batch), local(g, batch=batch))


def test_steered_generation_remote(ndif: Stack) -> None:
    g = _generation_graph(32)
    got, want = remote(g, ndif), local(g)
    assert_same(got, want)
    assert not torch.equal(want["plain.generated"], want["steer.generated"])


def test_every_sae_kind_spliced_remotely_equals_local(ndif: Stack) -> None:
    from tests.conformance.test_sae_kinds import IDS, kinds

    g = iv.Graph()
    edits = [iv.FeatureEdit.set(1, 2.0), iv.FeatureEdit.clamp([3, 4], high=0.1)]
    for name, sae in kinds(32).items():
        run = g.run(name, tokens=IDS)
        run.sae_splice(
            "resid_post", 0, sae=sae, edits=edits, features=f"{name}.f", pos=slice(1, None)
        )
        run.read("logits", pos=-1, name=f"{name}.logits")
    assert_same(remote(g, ndif), local(g))


def test_prompts_of_different_lengths_remote_equal_local(ndif: Stack) -> None:
    g = iv.Graph()
    clean = g.run("clean", tokens=[[4, 5, 6, 7, 8], [9, 10], [11, 12, 13]])
    corrupt = g.run("corrupt", tokens=[[4, 5, 16, 7, 8, 3], [9, 20, 21], [11, 22, 13]])
    whole = clean.read("resid_pre", layer=1, name="clean_whole")
    corrupt.patch("resid_pre", layer=1, pos=iv.per_prompt([2, 1, 1]), value=whole)
    corrupt.ablate("mlp_out", layer=0, method="mean", source=clean, pos=-1)
    corrupt.read("logits", pos=-1, name="end")
    corrupt.read("resid_post", layer=1, name="corrupt_whole")
    got, want = remote(g, ndif), local(g)
    assert_same(got, want)
    for name in ("clean_whole", "corrupt_whole"):
        assert torch.equal(got.mask(name), want.mask(name))
    # and local nnsight is the torch reference (the ragged oracle tests hold that to each
    # prompt alone)
    assert_same(want, iv.run(g, hf_model("llama")))


def test_a_patch_sweep_is_one_request(ndif: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    posts: list[str] = []
    post = nns._Ndif.post

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        posts.append(self.host)
        return post(self, *args, **kwargs)

    monkeypatch.setattr(nns._Ndif, "post", counting)
    clean = torch.tensor([[5, 9, 14, 3, 22, 7]])
    corrupt = torch.tensor([[5, 9, 30, 3, 22, 7]])
    metric = Metric.logit_diff(10, 11)
    want = activation_patching(hf_model("llama"), clean, corrupt, metric, backend="nnsight")
    got = activation_patching(
        ndif.checkpoint, clean, corrupt, metric, backend="nnsight", remote=True
    )
    assert posts == [ndif.url]  # 2 layers x 6 positions + clean + corrupt runs: one request
    torch.testing.assert_close(got.scores, want.scores, **TOL)
    assert got.results is not None and dict(got.results.provenance.remote)["job_id"]


def test_gradients_remote_equal_local(ndif: Stack) -> None:
    """EAP, EAP-IG, attribution patching and input attribution take their gradients in
    the trace on the host (grad ops): they equal the local nnsight run."""
    from interventions.circuits.eap import edge_attribution
    from interventions.recipes import attribution_patching, input_attribution

    model = hf_model("llama")
    clean = torch.tensor([[5, 9, 14, 3, 22, 7], [4, 8, 13, 2, 21, 6]])
    corrupt = torch.tensor([[5, 9, 30, 3, 22, 7], [4, 8, 31, 2, 21, 6]])
    metric = Metric.logit_diff(torch.tensor([10, 12]), torch.tensor([11, 13]))
    where = {"backend": "nnsight", "model_key": ndif.checkpoint}
    for steps in (None, 2):
        want = edge_attribution(model, clean, corrupt, metric, steps=steps, backend="nnsight")
        got = edge_attribution(model, clean, corrupt, metric, steps=steps, remote=True, **where)
        assert got.edges == want.edges and max(abs(s) for s in want.scores) > 1e-4
        torch.testing.assert_close(torch.tensor(got.scores), torch.tensor(want.scores), **TOL)
    want_ap = attribution_patching(model, clean, corrupt, metric, backend="nnsight")
    got_ap = attribution_patching(model, clean, corrupt, metric, remote=True, **where)
    torch.testing.assert_close(got_ap.approx.values, want_ap.approx.values, **TOL)
    ig = {"method": "integrated_gradients", "steps": 3}
    want_ia = input_attribution(model, clean, Metric.logit(10), backend="nnsight", **ig)
    got_ia = input_attribution(model, clean, Metric.logit(10), remote=True, **where, **ig)
    for a, b in zip(got_ia.attributions, want_ia.attributions, strict=True):
        torch.testing.assert_close(a, b, **TOL)


# ---------------------------------------------------------------------------------------
# jobs that survive the client


def test_a_job_is_collected_later_by_id(ndif: Stack) -> None:
    g = small_graph()
    job = iv.submit(g, ndif.checkpoint)
    assert isinstance(job.id, str) and job.id
    again = iv.Job.attach(job.id)
    assert_same(again.result(timeout=120), local(g))
    assert dict(again.result().provenance.remote)["model_key"] == ndif.model_key
    assert again.status() == "COMPLETED"


def test_a_new_process_reattaches_and_the_submitter_may_die(ndif: Stack, tmp_path: Path) -> None:
    """A process submits, prints the id and exits at once; another collects the result."""
    submit = (
        "import os, sys, torch, interventions as iv\n"
        "from tests.remote.test_remote import small_graph\n"
        f"job = iv.submit(small_graph(), {ndif.checkpoint!r})\n"
        "print(job.id, flush=True)\n"
        "os._exit(0)  # the client dies: no wait, no cleanup\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", submit], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().splitlines()[-1]
    collect = (
        "import sys, interventions as iv\n"
        f"res = iv.Job.attach({job_id!r}).result(timeout=120)\n"
        f"res.save({str(tmp_path / 'res')!r})\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", collect], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr
    got = iv.Results.load(tmp_path / "res")
    assert_same(got, local(small_graph()))
    assert dict(got.provenance.remote)["job_id"] == job_id


def test_a_job_outlives_a_short_timeout(ndif: Stack) -> None:
    job = iv.submit(long_graph(256), ndif.checkpoint)
    with pytest.raises(iv.RemoteTimeout, match=job.id) as caught:
        job.result(timeout=0.0)
    assert caught.value.job_id == job.id and caught.value.host == ndif.url
    assert "Job.attach" in str(caught.value)
    assert len(job.result(timeout=120)) == 29


# ---------------------------------------------------------------------------------------
# faults, each injected for real


def test_connection_refused_is_retried_then_typed(ndif: Stack) -> None:
    host = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(iv.RemoteConnectionError, match="after 3 attempt") as caught:
        iv.run(small_graph(), ndif.checkpoint, backend="nnsight", remote=host, retries=2)
    assert time.monotonic() - t0 < 30
    assert caught.value.host == host and caught.value.model_key == ndif.model_key
    assert caught.value.job_id is None and "NDIF_HOST" in str(caught.value)


def test_a_host_that_is_not_ndif(ndif: Stack) -> None:
    host = f"http://127.0.0.1:{ndif.port('objectstore')}"  # an S3 server, not NDIF
    with pytest.raises(iv.RemoteConnectionError, match="NDIF") as caught:
        iv.run(small_graph(), ndif.checkpoint, backend="nnsight", remote=host, retries=0)
    assert caught.value.host == host


@pytest.mark.parametrize(
    ("key", "status"),
    [("", "401"), ("not-a-key", "400"), ("00000000-0000-4000-8000-00000000dead", "403")],
    ids=["missing", "malformed", "unknown"],
)
def test_a_bad_api_key(ndif: Stack, monkeypatch: pytest.MonkeyPatch, key: str, status: str) -> None:
    from nnsight.schema.config import CONFIG

    monkeypatch.setenv("NDIF_API_KEY", key)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    with pytest.raises(iv.RemoteAuthError, match=f"HTTP {status}") as caught:
        remote(small_graph(), ndif)
    error = caught.value
    assert error.host == ndif.url and error.model_key == ndif.model_key
    assert "NDIF_API_KEY" in str(error)


def test_a_model_that_is_not_deployed(ndif: Stack) -> None:
    g = iv.Graph()
    g.run("a", tokens=torch.tensor([[5, 6, 7]])).read("logits", name="out")
    with pytest.raises(iv.ModelNotDeployed) as caught:
        iv.run(g, ndif.spare, backend="nnsight", remote=True, timeout=120)
    error = caught.value
    assert error.host == ndif.url and ndif.spare in str(error.model_key)
    assert error.job_id and "deploy" in str(error)


def test_a_trace_that_raises_on_the_host(ndif: Stack) -> None:
    """The client validates against a wider model than the host serves: the add's
    direction does not fit there, and the host's traceback comes back as text."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=48,
        intermediate_size=48, vocab_size=64, max_position_embeddings=32,
    )  # fmt: skip
    wider = AutoModelForCausalLM.from_config(config).eval()
    g = iv.Graph()
    run = g.run("b", tokens=torch.tensor([[5, 6, 7, 8]]))
    run.add("resid_post", layer=0, direction=torch.ones(48))
    run.read("logits", pos=-1, name="out")
    with pytest.raises(iv.RemoteExecutionError, match="RuntimeError") as caught:
        iv.run(g, wider, backend="nnsight", remote=True, model_key=ndif.checkpoint)
    error = caught.value
    assert isinstance(error, iv.ExecutionError) and isinstance(error, iv.RemoteError)
    assert error.job_id and error.host == ndif.url and error.model_key == ndif.model_key
    assert error.remote_traceback and "Traceback" in error.remote_traceback
    model_ready(ndif)  # the replica is unharmed


def test_a_blocking_run_that_times_out_names_its_job(ndif: Stack) -> None:
    with pytest.raises(iv.RemoteTimeout) as caught:
        remote(long_graph(256), ndif, timeout=0.05)
    assert caught.value.job_id and caught.value.host == ndif.url
    assert "iv.submit" in str(caught.value)


def test_a_replica_killed_mid_job(ndif: Stack) -> None:
    """A job whose replica dies while it runs fails with JobLost (a Job keeps its id and
    is not re-sent); a blocking run is sent again, a bounded number of times, and
    returns the right numbers once Ray has restarted the replica."""
    import signal

    model_ready(ndif)
    g = long_graph()
    job = iv.submit(g, ndif.checkpoint)
    wait_until(lambda: job.status() == "RUNNING", 120, "the job to run")
    (pid,) = ndif.model_actor_pids()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(iv.JobLost) as caught:
        job.result(timeout=120)
    assert caught.value.job_id == job.id and "again" in str(caught.value)
    model_ready(ndif)

    box: dict[str, Any] = {}

    def blocking() -> None:
        try:
            box["res"] = remote(g, ndif, timeout=300, retries=3)
        except BaseException as exc:  # surfaced below
            box["err"] = exc

    thread = threading.Thread(target=blocking)
    thread.start()
    wait_until(lambda: bool(running_tasks(ndif)) or not thread.is_alive(), 120, "the run")
    (pid,) = ndif.model_actor_pids()
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=400)
    assert not thread.is_alive()
    assert "err" not in box, box.get("err")
    want = iv.run(g, hf_model("llama"), backend="torch")
    assert_same(box["res"], want)


def running_tasks(ndif: Stack) -> list[Any]:
    import json
    import urllib.request

    url = (
        f"http://127.0.0.1:{ndif.port('ray_dashboard')}/api/v0/tasks?detail=0&limit=200"
        "&filter_keys=state&filter_predicates=%3D&filter_values=RUNNING"
    )
    with urllib.request.urlopen(url, timeout=10) as response:
        data = json.load(response)
    return [t for t in data["data"]["result"]["result"] if "CPUModelActor.run" in t["name"]]


def test_the_api_restarted_mid_job(ndif: Stack) -> None:
    """The API goes down while a job runs: polling fails with a typed error naming the
    job (after bounded retries); once the API is back the job's result is collected."""
    model_ready(ndif)
    g = long_graph(1024)
    job = iv.submit(g, ndif.checkpoint)
    wait_until(lambda: job.status() in ("RUNNING", "COMPLETED"), 120, "the job to run")
    ndif.stack("stop-service", "api")
    try:
        t0 = time.monotonic()
        with pytest.raises(iv.RemoteConnectionError) as caught:
            job.status()
        assert time.monotonic() - t0 < 30
        assert caught.value.job_id == job.id and caught.value.host == ndif.url
    finally:
        ndif.stack("restart", "api")
    got = iv.Job.attach(job.id).result(timeout=180)
    assert_same(got, iv.run(g, hf_model("llama"), backend="torch"))
    model_ready(ndif)  # leave the stack serving: its dispatcher may still be reconnecting


def test_the_readme_remote_example_runs(ndif: Stack) -> None:
    """The README's remote example (its ``py`` block), with ``name`` the deployed model."""
    from tests.core.test_readme import _blocks

    (block,) = _blocks("py")
    namespace: dict[str, Any] = {"name": ndif.checkpoint}
    exec(compile(block, "README.md", "exec"), namespace)
    assert dict(namespace["res"].provenance.remote)["job_id"] == namespace["job"].id
    assert namespace["sweep"].scores.shape == (2, 4)
