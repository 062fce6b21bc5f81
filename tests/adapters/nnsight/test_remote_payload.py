"""What a remote run ships, checked without a server (the ``remote`` tests run it on one).

The request body is nnsight's serialization of one session: the block's source and the
plain data it names. It must name nothing of this package (an NDIF host does not have
it) and ship no code by value; the client must refuse what cannot run remotely before
sending anything, and errors must name host, model key and job id.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from pathlib import Path
from typing import Any

import pytest
import torch

import interventions as iv
from interventions.execute import _prepare
from tests.tiny_models import hf_model, toy_net, word_tokenizer

pytest.importorskip("nnsight")

from interventions.adapters import nnsight as nns


def globals_named(blob: bytes) -> set[tuple[str, str]]:
    """(module, name) of every global a pickle refers to (GLOBAL and STACK_GLOBAL)."""
    found: set[tuple[str, str]] = set()
    memo: dict[int, Any] = {}
    pushed: list[Any] = []
    for op, arg, _ in pickletools.genops(io.BytesIO(blob)):
        if op.name == "GLOBAL":
            module, name = str(arg).split(" ", 1)
            found.add((module, name))
        elif op.name == "STACK_GLOBAL":
            found.add((str(pushed[-2]), str(pushed[-1])))
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            pushed.append(memo.get(int(arg)))
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            pushed.append(arg)
        elif op.stack_after:
            pushed.append(None)
    return found


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    hf_model("llama").save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return str(path)


def payload(graph: iv.Graph, checkpoint: str) -> tuple[bytes, Any]:
    model, _, plan, impl, _ = _prepare(
        graph, checkpoint, "nnsight", word_tokenizer(), True, None, {}, remote=True
    )
    client = nns._Ndif("http://127.0.0.1:9", "", checkpoint, 0)
    return impl.payload(plan, model, client, {"wanted": list(graph.reads())}), client


def test_the_payload_names_nothing_of_this_package(checkpoint: str) -> None:
    g = iv.Graph()
    a = g.run("a", text=["w5 w6 w7 w8"])
    b = g.run("b", tokens=torch.tensor([[9, 6, 7, 8]]))
    b.patch("resid_post", layer=0, pos=1, value=a.read("resid_post", layer=0))
    b.ablate("mlp_out", layer=1, method="mean", source="a")
    b.read("attn_pattern", layer=1, name="pattern")
    b.read("logits", pos=-1, name="out")
    gen = g.run("gen", tokens=torch.tensor([[5, 9, 14]]), max_new_tokens=3)
    gen.add("resid_post", layer=0, direction=torch.ones(32))
    blob, client = payload(g, checkpoint)
    named = globals_named(blob)
    roots = {module.split(".")[0] for module, _ in named}
    assert not roots & {"interventions", "adapters", "tests", "__main__"}, sorted(named)
    assert roots <= {"torch", "nnsight", "transformers", "builtins", "collections", "typing",
                     "copyreg", "_codecs", "cloudpickle", "pathlib", "types"}, sorted(roots)  # fmt: skip
    # nothing is shipped by value: no function source rebuilt on the host
    assert ("nnsight.intervention.serialization", "_load_function") not in named
    assert client.model_key.startswith("nnsight.modeling.transformers.TransformersModel:")
    assert checkpoint in client.model_key


def test_the_payload_holds_one_session_for_the_whole_graph(checkpoint: str) -> None:
    g = iv.Graph()
    for length in (3, 4, 5):  # three prompt lengths: three traces, one request
        g.run(f"r{length}", tokens=torch.arange(3, 3 + length)[None]).read(
            "logits", name=f"o{length}"
        )
    model, _, plan, _, _ = _prepare(g, checkpoint, "nnsight", None, True, None, {}, remote=True)
    assert len(nns._Compiler(plan, model, True).stages(None)) == 3
    blob, _ = payload(g, checkpoint)
    assert len(blob) < 200_000


def test_remote_needs_a_hf_causal_lm() -> None:
    g = iv.Graph()
    g.run("x", tokens=torch.tensor([[1, 2, 3]])).read("output", name="y")
    with pytest.raises(iv.InterventionError, match="HuggingFace causal LM"):
        iv.run(g, toy_net(), backend="nnsight", remote="http://127.0.0.1:9")


def test_remote_is_refused_by_backends_that_cannot(checkpoint: str) -> None:
    g = iv.Graph()
    g.run("x", tokens=torch.tensor([[1, 2, 3]])).read("logits", name="y")
    with pytest.raises(
        iv.InterventionError, match="cannot run remotely; backends that can: nnsight"
    ):
        iv.run(g, hf_model("llama"), backend="torch", remote=True)


@pytest.mark.parametrize("family", ["falcon_alibi", "falcon_alibi_par"])
def test_patterns_of_falcon_with_alibi_are_refused_remotely(family: str) -> None:
    """The host's eager Falcon attention counts ALiBi twice; the client corrects only its
    own copy, so the graph is refused before anything is sent (a closed port: no host)."""
    g = iv.Graph()
    g.run("x", tokens=torch.tensor([[1, 2, 3]])).read("attn_pattern", layer=0, name="p")
    with pytest.raises(iv.UnsupportedOp, match="attn_pattern on Falcon with ALiBi cannot run"):
        iv.run(g, hf_model(family), backend="nnsight", remote="http://127.0.0.1:9", retries=0)
    ok = iv.Graph()  # the same model without patterns goes on to the (closed) host
    ok.run("x", tokens=torch.tensor([[1, 2, 3]])).read("logits", name="y")
    with pytest.raises(iv.InterventionError) as info:
        iv.run(ok, hf_model(family), backend="nnsight", remote="http://127.0.0.1:9", retries=0)
    assert not isinstance(info.value, iv.UnsupportedOp)


def test_unknown_remote_options_are_refused(checkpoint: str) -> None:
    g = iv.Graph()
    g.run("x", tokens=torch.tensor([[1, 2, 3]])).read("logits", name="y")
    with pytest.raises(iv.InterventionError, match="unknown options \\['cache'\\]"):
        iv.run(g, checkpoint, backend="nnsight", remote=True, cache=True)


def test_a_closed_port_fails_fast_and_typed(checkpoint: str) -> None:
    g = iv.Graph()
    g.run("x", tokens=torch.tensor([[1, 2, 3]])).read("logits", name="y")
    with pytest.raises(iv.RemoteConnectionError, match="after 1 attempt") as caught:
        iv.run(g, checkpoint, backend="nnsight", remote="http://127.0.0.1:9", retries=0)
    assert caught.value.host == "http://127.0.0.1:9"
    assert caught.value.job_id is None


def test_a_503_while_the_host_reconnects_is_waited_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """NDIF answers 503 "compute backend is reconnecting" for a while after a disturbance;
    the client waits it out with growing pauses. A loopback server answers 503 twice."""
    import http.server
    import threading

    answers = [503, 503, 200]
    seen: list[int] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status = answers[min(len(seen), len(answers) - 1)]
            seen.append(status)
            body = b'{"detail": "compute backend is reconnecting"}' if status == 503 else b"{}"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    pauses: list[float] = []
    monkeypatch.setattr("time.sleep", pauses.append)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host = f"http://127.0.0.1:{server.server_address[1]}"
        client = nns._Ndif(host, "", "m", retries=nns._DEFAULT_RETRIES)
        response = client.call("GET", f"{host}/status")
        assert response.status_code == 200 and seen == [503, 503, 200]
        assert pauses == [0.5, 1.0]
        answers[:] = [503]  # never recovers: typed error after every retry
        seen.clear()
        with pytest.raises(iv.RemoteConnectionError, match=r"after 6 attempt.*reconnecting"):
            client.call("GET", f"{host}/status")
        assert len(seen) == 6 and pauses[2:] == [0.5, 1.0, 2.0, 4.0, 8.0]
    finally:
        server.shutdown()
        server.server_close()


def test_remote_errors_name_host_model_and_job_and_pickle() -> None:
    error = iv.JobLost("the host lost the job", host="http://h:1", model_key="m", job_id="abc",
                       hint="Run it again")  # fmt: skip
    text = str(error)
    assert "host http://h:1" in text and "model m" in text and "job abc" in text
    assert text.endswith("Run it again")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is iv.JobLost and again.job_id == "abc" and str(again) == text
    assert issubclass(iv.RemoteExecutionError, iv.ExecutionError)
    for cls in (iv.RemoteConnectionError, iv.RemoteAuthError, iv.ModelNotDeployed,
                iv.RemoteExecutionError, iv.RemoteTimeout, iv.JobLost):  # fmt: skip
        assert issubclass(cls, iv.RemoteError) and issubclass(cls, iv.InterventionError)


@pytest.mark.parametrize("bad", ["", "../etc/passwd", "a b", "x" * 200])
def test_attach_refuses_what_is_not_a_job_id(bad: str) -> None:
    with pytest.raises(iv.InterventionError, match="not a job id"):
        iv.Job.attach(bad, host="http://127.0.0.1:9")


def test_host_and_key_follow_nnsight(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from nnsight.schema.config import CONFIG

    monkeypatch.setattr(CONFIG.API, "HOST", "http://127.0.0.1:1")
    monkeypatch.setattr(CONFIG.API, "APIKEY", "from-config")
    monkeypatch.delenv("NDIF_HOST", raising=False)
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    assert nns._config_host_key(None, None) == ("http://127.0.0.1:1", "from-config")
    monkeypatch.setenv("NDIF_HOST", "http://127.0.0.1:2/")
    monkeypatch.setenv("NDIF_API_KEY", "from-env")
    assert nns._config_host_key(None, None) == ("http://127.0.0.1:2", "from-env")
    assert nns._config_host_key("http://127.0.0.1:3", "arg") == ("http://127.0.0.1:3", "arg")
    with pytest.raises(iv.RemoteConnectionError, match="http:// or https://"):
        nns._config_host_key("127.0.0.1:4", None)
