"""What the host sends back, when it is not what NDIF sends: every malformed answer is a
typed ``RemoteError`` naming the message and the fault, the result size is capped, a
zero timeout is refused, and provenance keeps the model key asked for beside the one
that answered. No server: the decoding functions directly, and a fake websocket.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from typing import Any

import pytest
import torch

import interventions as iv
from interventions.remote import results_from

pytest.importorskip("nnsight")
zstandard = pytest.importorskip("zstandard")

from interventions.adapters import nnsight as nns  # noqa: E402
from interventions.adapters.nnsight import decode  # noqa: E402

LIMIT = 1 << 20


def frame_of(fields: Any) -> bytes:
    """A binary websocket frame as NDIF sends it: ``torch.save`` of the response's fields."""
    out = io.BytesIO()
    torch.save(fields, out, pickle_protocol=4)
    return out.getvalue()


def result_blob(result: Any, compress: bool = False) -> bytes:
    out = io.BytesIO()
    torch.save({"result": result}, out)
    blob = out.getvalue()
    return zstandard.ZstdCompressor().compress(blob) if compress else blob


def good_result(model_key: str = "asked-key") -> dict[str, Any]:
    return {"values": {"y": torch.arange(6.0).view(2, 3)}, "echo": {"model_key": model_key}}


def pickled_zip(payload: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
    return out.getvalue()


# ---------------------------------------------------------------------------------------
# JSON status messages

BAD_JSON = [
    ("{not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    ("[1, 2]", "a JSON list, not an object"),
    ('"COMPLETED"', "a JSON str, not an object"),
    ('{"id": "j", "status": "FINISHED"}', "status"),
    ('{"id": 5, "status": "COMPLETED"}', "id"),
    ('{"status": "COMPLETED"}', "id: Field required"),
    ('{"id": "j", "status": "RUNNING", "meta": "x"}', "meta"),
]


@pytest.mark.parametrize(("text", "named"), BAD_JSON)
def test_malformed_json_statuses_are_typed(text: str | bytes, named: str) -> None:
    with pytest.raises(iv.MalformedResponse, match="a status from the host is malformed") as e:
        decode.response_json(text, "a status")
    assert named in str(e.value)
    assert isinstance(e.value, iv.RemoteError)


def test_a_good_json_status_reads() -> None:
    got = decode.response_json('{"id": "j", "status": "RUNNING"}', "a status")
    assert (got.id, got.status.value) == ("j", "RUNNING")


# ---------------------------------------------------------------------------------------
# binary frames

BAD_FRAMES = [
    (b"garbage", "not a torch.save archive"),
    (frame_of({"id": "j", "status": "RUNNING"})[:-40], "not a torch.save archive"),  # truncated
    (pickled_zip(b"").replace(b"data.pkl", b"other.pk"), "no data.pkl"),
    (pickled_zip(b"\x80\x04garbage"), "cannot be read as plain data"),
    (pickled_zip(pickle.dumps(print)), "may not name builtins.print"),
    (pickled_zip(pickle.dumps([1, 2])), "a list, not a response's fields"),
    (pickled_zip(pickle.dumps({"id": "j", "status": "NOPE"})), "not an NDIF response"),
    (frame_of({"id": "j", "status": "RUNNING", "data": torch.ones(2)}), "may not name torch."),
]


@pytest.mark.parametrize(("frame", "named"), BAD_FRAMES)
def test_malformed_frames_are_typed(frame: bytes, named: str) -> None:
    with pytest.raises(iv.MalformedResponse, match="a websocket frame from the host") as e:
        decode.load_frame(frame, LIMIT)
    assert named in str(e.value)


def test_a_good_frame_reads_and_a_huge_one_is_refused_before_it_is_read() -> None:
    from nnsight.schema.response import Status

    fields = {"id": "j", "status": Status.COMPLETED, "data": result_blob(good_result())}
    got = decode.load_frame(frame_of(fields), LIMIT)
    assert got.status == Status.COMPLETED and isinstance(got.data, bytes)
    with pytest.raises(iv.ResultTooLarge, match="over max_result_bytes=100"):
        decode.load_frame(frame_of(fields), 100)


# ---------------------------------------------------------------------------------------
# result blobs


def test_a_good_result_reads_both_ways() -> None:
    for compress in (False, True):
        values, echo = decode.load_result(result_blob(good_result(), compress), compress, LIMIT)
        torch.testing.assert_close(values["y"], torch.arange(6.0).view(2, 3))
        assert echo == {"model_key": "asked-key"}


BAD_RESULTS = [
    (b"garbage", True, "not zstd-compressed"),
    (result_blob(good_result(), True)[:-30], True, "corrupt or truncated zstd stream"),
    (b"garbage", False, "not a torch.save archive"),
    (result_blob(good_result())[:-60], False, "not a torch.save archive"),  # truncated
    (result_blob({"values": {"y": print}, "echo": None}), False, "not a torch.save archive"),
    (result_blob([1, 2]), False, "no 'result' dict"),
    (result_blob({"values": {"y": [1.0]}, "echo": None}), False, "not tensors by read name"),
    (result_blob({"values": {"y": torch.ones(1)}, "echo": "k"}), False, "'echo' is a str"),
]


@pytest.mark.parametrize(("blob", "compress", "named"), BAD_RESULTS)
def test_malformed_results_are_typed(blob: bytes, compress: bool, named: str) -> None:
    with pytest.raises(iv.MalformedResponse, match="the job's result from the host") as e:
        decode.load_result(blob, compress, LIMIT)
    assert named in str(e.value)


def test_the_decompressed_size_is_capped() -> None:
    big = {"values": {"y": torch.zeros(1 << 18)}, "echo": None}  # 1 MiB of zeros
    packed = result_blob(big, True)
    assert len(packed) < 10_000  # compresses to almost nothing: the cap is on the output
    with pytest.raises(iv.ResultTooLarge, match=r"over max_result_bytes=100000\b") as e:
        decode.load_result(packed, True, 100_000)
    assert "larger max_result_bytes=" in str(e.value)
    # a stream that does not say its size is counted while it is decompressed
    raw = result_blob(big)
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    with pytest.raises(iv.ResultTooLarge, match="over max_result_bytes=100000"):
        decode.load_result(unsized, True, 100_000)
    values, _ = decode.load_result(unsized, True, 2 * len(raw))
    assert values["y"].shape == (1 << 18,)
    with pytest.raises(iv.ResultTooLarge):
        decode.load_result(raw, False, 100_000)


# ---------------------------------------------------------------------------------------
# the job: a fake websocket stands in for the host


class FakeSocket:
    def __init__(self, messages: list[Any]) -> None:
        self.messages = list(messages)
        self.closed = False

    def settimeout(self, seconds: float) -> None:
        pass

    def recv(self) -> Any:
        return self.messages.pop(0)

    def close(self) -> None:
        self.closed = True


def job_on(messages: list[Any], model_key: str = "asked-key", **kw: Any) -> Any:
    client = nns._Ndif("http://127.0.0.1:9", "", model_key, 0)
    return nns._NdifJob(client, "job1", compress=False, timeout=5.0, socket=FakeSocket(messages),
                        max_result_bytes=kw.pop("max_result_bytes", LIMIT), **kw)  # fmt: skip


@pytest.mark.parametrize(
    "message",
    ["{not json", "5", '{"id": "job1", "status": "DONE"}', b"garbage", pickled_zip(b"x")],
)
def test_a_malformed_message_on_the_socket_names_host_model_and_job(message: Any) -> None:
    job = job_on(['{"id": "job1", "status": "RUNNING"}', message])
    with pytest.raises(iv.MalformedResponse) as e:
        job.wait(None)
    assert (e.value.host, e.value.model_key, e.value.job_id) == (
        "http://127.0.0.1:9", "asked-key", "job1",
    )  # fmt: skip
    assert job.socket is None  # closed


def completed(result: dict[str, Any]) -> bytes:
    from nnsight.schema.response import Status

    return frame_of({"id": "job1", "status": Status.COMPLETED, "data": result_blob(result)})


def test_provenance_keeps_the_key_asked_for_and_the_key_that_answered() -> None:
    job = job_on(['{"session_id": "s"}', completed(good_result("answered-key"))])
    tensors, echo = job.wait(None)
    assert job.model_key == "asked-key"  # not overwritten by what came back
    remote = dict(results_from(tensors, echo, job).provenance.remote)
    assert remote["model_key"] == "asked-key"
    assert remote["answered_model_key"] == "answered-key"
    # a job attached by id knows what it asked for only from the request's echo
    attached = job_on([completed(good_result("answered-key"))], model_key="")
    tensors, echo = attached.wait(None)
    assert attached.model_key == "answered-key"


def test_a_result_over_the_cap_is_refused_with_the_option_named() -> None:
    job = job_on([completed(good_result())], max_result_bytes=200)
    with pytest.raises(iv.ResultTooLarge, match="max_result_bytes=200") as e:
        job.wait(None)
    assert e.value.job_id == "job1"


@pytest.mark.parametrize("bad", [0, 0.0, -1, float("nan"), "10", True])
def test_a_timeout_that_is_not_positive_is_refused_never_replaced(bad: Any) -> None:
    if bad != 0:  # waiting 0 s for a result means: look once (below)
        with pytest.raises(iv.InterventionError, match=r"timeout must be a positive number"):
            job_on([]).wait(bad)
    with pytest.raises(iv.InterventionError, match=r"timeout must be a positive number"):
        nns.NNsightBackend().attach("abc", host="http://127.0.0.1:9", timeout=bad)


def test_waiting_zero_seconds_looks_once_and_times_out_naming_the_job() -> None:
    with pytest.raises(iv.RemoteTimeout, match="job1"):
        job_on([]).wait(0)


@pytest.mark.parametrize("bad", [0, -5, 1.5, "1"])
def test_max_result_bytes_must_be_a_positive_int(bad: Any) -> None:
    with pytest.raises(iv.InterventionError, match="max_result_bytes must be a positive int"):
        nns.NNsightBackend().attach("abc", host="http://127.0.0.1:9", max_result_bytes=bad)


def test_submit_refuses_a_zero_timeout_before_sending() -> None:
    from tests.tiny_models import hf_model

    g = iv.Graph()
    g.run("x", tokens=torch.tensor([[1, 2, 3]])).read("logits", name="y")
    with pytest.raises(iv.InterventionError, match=r"positive number of seconds, got 0\b"):
        iv.run(g, hf_model("llama"), backend="nnsight", remote="http://127.0.0.1:9", timeout=0)
