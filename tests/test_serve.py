"""`r2f serve`: one service (real Ray Serve on the session's local Ray, real stores made by
`r2f run` on Gardens Point frames) shared by every test of this module, in order: ranked lists
equal r2f run's, bad inputs, the page in Chromium, then a reindex publishing under load."""
from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pipeline.datasets import write_frame_manifest
from pipeline.rerank import read_results
from pipeline.run import RunConfig, run
from tests.conftest import free_port

SIZE = [128, 224]
DB_FRAMES = list(range(0, 48, 4))      # 12 day_right frames
QUERY_FRAMES = [2, 17, 30, 41]         # night_right frames between and at them
ADDED_FRAME = 49                       # the image the reindex adds
K = 5


@pytest.fixture(scope="module")
def served(gardens_point, tmp_path_factory, ray_session):
    from pipeline.serve import ServeConfig, start

    root = tmp_path_factory.mktemp("serve")
    db = write_frame_manifest(root / "db.csv", gardens_point / "day_right", DB_FRAMES)
    queries = write_frame_manifest(root / "q.csv", gardens_point / "night_right", QUERY_FRAMES)
    t = time.perf_counter()
    run(RunConfig(database=db, queries=queries, out=str(root / "run"), backbone="efficientnet-lite0",
                  reranker="ransac", candidates=K, positive_radius=2, image_size=SIZE, report_samples=0))
    run_s = time.perf_counter() - t
    t = time.perf_counter()
    cfg = ServeConfig(database_store=str(root / "run" / "database_store"), index_dir=str(root / "run" / "index"),
                      reranker="ransac", candidates=K, max_candidates=8, port=free_port(), poll_s=0.5,
                      keep_previous_s=30, max_body_bytes=2_000_000, max_queue=6, extract_threads=1)
    service = start(cfg)
    print(f"\nr2f run {run_s:.1f} s, service up in {time.perf_counter() - t:.1f} s at {service.url}")
    yield {"url": service.url, "root": root, "cfg": cfg, "db_csv": db}
    service.stop()


def post(url: str, body: bytes, ctype: str = "image/jpeg", query: str = "", headers: dict | None = None):
    req = urllib.request.Request(url + "localize" + query, data=body, method="POST",
                                 headers={"Content-Type": ctype, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body or b"{}"), e.headers
        except ValueError:
            return e.code, {"detail": body.decode(errors="replace")}, e.headers


def get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.read(), r.headers


def test_localize_equals_r2f_run(served, gardens_point):
    results = read_results(str(served["root"] / "run" / "results")).to_pandas()
    assert results["query_id"].nunique() == len(QUERY_FRAMES)
    for frame in QUERY_FRAMES:
        path = gardens_point / "night_right" / f"Image{frame:03d}.jpg"
        want = results[results["query_path"] == str(path)].sort_values("rank")
        status, answer, headers = post(served["url"], path.read_bytes())
        assert status == 200, answer
        got = answer["candidates"]
        assert [c["image_id"] for c in got] == want["image_id"].tolist(), frame
        assert [c["rank"] for c in got] == want["rank"].tolist()
        assert [c["path"] for c in got] == want["candidate_path"].tolist()
        np.testing.assert_allclose([c["rerank_score"] for c in got], want["rerank_score"], atol=0)
        np.testing.assert_allclose([c["global_score"] for c in got], want["global_score"], rtol=1e-5, atol=1e-5)
        assert answer["estimate"]["confidence_kind"] == "inliers" and headers["X-Reranker"] == "ransac"
        assert answer["estimate"]["utm_east"] == got[0]["utm_east"]
        assert answer["estimate"]["confidence"] == got[0]["rerank_score"]
        assert set(answer) == {"candidates", "estimate", "state", "timings"}
        assert {"extract_ms", "search_ms", "rerank_ms", "total_ms"} <= set(answer["timings"])
    # multipart upload, the other reranker names and the cap
    frame = QUERY_FRAMES[0]
    data = (gardens_point / "night_right" / f"Image{frame:03d}.jpg").read_bytes()
    boundary = "r2fboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    status, multi, _ = post(served["url"], body, f"multipart/form-data; boundary={boundary}")
    assert status == 200 and multi["candidates"] == post(served["url"], data)[1]["candidates"]
    status, none, _ = post(served["url"], data, query="?reranker=none&candidates=3")
    assert status == 200 and [c["rank"] for c in none["candidates"]] == [1, 2, 3]
    assert none["estimate"]["confidence_kind"] == "global_similarity"
    assert all(c["rerank_score"] is None for c in none["candidates"])
    status, capped, headers = post(served["url"], data, query="?candidates=50")
    assert status == 200 and len(capped["candidates"]) == 8 and headers["X-Candidates-Capped"] == "8"


def test_bad_inputs_are_4xx_with_a_message(served, gardens_point):
    url = served["url"]
    jpeg = (gardens_point / "night_right" / "Image002.jpg").read_bytes()
    cases = {
        "not an image": (b"this is plain text, not a photo" * 10, "image/jpeg", 400, "not a readable image"),
        "empty": (b"", "image/jpeg", 400, "empty body"),
        "corrupt jpeg": (jpeg[: len(jpeg) // 2], "image/jpeg", 400, "not a readable image"),
        "wrong type": (jpeg, "text/plain", 415, "Content-Type text/plain"),
        "no image field": (b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--b--\r\n",
                           "multipart/form-data; boundary=b", 400, "no file field named 'image'"),
    }
    for what, (body, ctype, code, message) in cases.items():
        status, answer, _ = post(url, body, ctype)
        assert status == code and message in answer["detail"], (what, status, answer)
    status, answer, _ = post(url, jpeg, query="?reranker=sift")
    assert status == 400 and "unknown reranker" in answer["detail"]
    status, answer, _ = post(url, jpeg, query="?candidates=0")
    assert status == 422 and "candidates" in json.dumps(answer["detail"])
    # r2former on weights without a trained reranker: its scores would be noise
    status, answer, _ = post(url, jpeg, query="?reranker=r2former")
    assert status == 400 and "trained reranker" in answer["detail"]

    # 413 from the declared length, before the body is sent: the server answers while we still hold it
    host, port = url.split("//")[1].rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/localize")
    conn.putheader("Content-Type", "image/jpeg")
    conn.putheader("Content-Length", str(50_000_000))
    conn.endheaders()
    conn.send(b"\xff\xd8" + b"\0" * 1000)  # 1 KB of the announced 50 MB
    r = conn.getresponse()
    assert r.status == 413 and "limit is 2000000 bytes" in json.loads(r.read())["detail"]
    conn.close()

    # overload: --max-queue requests in progress (each still sending its body), then one more gets
    # 503 + Retry-After at once; the held ones then complete normally
    held = []
    try:
        for _ in range(served["cfg"].max_queue):
            c = http.client.HTTPConnection(host, int(port), timeout=60)
            c.putrequest("POST", "/localize")
            c.putheader("Content-Type", "image/jpeg")
            c.putheader("Content-Length", str(len(jpeg)))
            c.endheaders()
            c.send(jpeg[:100])
            held.append(c)
        deadline = time.time() + 20
        while True:
            status, answer, headers = post(url, jpeg)
            if status == 503 or time.time() > deadline:
                break
            time.sleep(0.2)  # the held requests may still be on their way to the replica
        assert status == 503 and headers["Retry-After"] == "1" and "overloaded" in answer["detail"], \
            (status, answer)
        for c in held:
            c.send(jpeg[100:])
        assert [c.getresponse().status for c in held] == [200] * len(held)
    finally:  # a failure here must not leave requests in progress for the tests after it
        for c in held:
            c.close()
    assert post(url, jpeg)[0] == 200
    # thumbnails only by image_id of a held state
    status, state_body, _ = get(url + "state")
    state = json.loads(state_body)
    with pytest.raises(urllib.error.HTTPError) as err:
        get(url + "thumbnail/12345")
    assert err.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as err:
        get(url + "thumbnail/..%2F..%2Fetc%2Fpasswd")
    assert err.value.code in (404, 422)
    assert state["num_images"] == len(DB_FRAMES) and state["model"]["backbone"] == "efficientnet-lite0"


def test_page_in_chromium_shows_the_top1(served, gardens_point):
    frame = QUERY_FRAMES[1]
    path = gardens_point / "night_right" / f"Image{frame:03d}.jpg"
    _, want, _ = post(served["url"], path.read_bytes())
    page = upload_and_read_top1(served["url"], path)
    assert page["top1"] == str(want["candidates"][0]["image_id"]), page
    assert page["state"] == want["state"]["index_version"]
    assert page["thumbnails_loaded"] == min(5, len(want["candidates"])), page
    assert page["estimate_marks"] == 1 and page["points"] >= len(DB_FRAMES), page


REINDEX = """
import json, sys, time
from pipeline.index import leases
from pipeline.reindex import ReindexConfig, run
source, store, index_dir = sys.argv[1:4]
seen = {}
def on_stage(name, info):
    if name == "published":
        seen["published_at"] = time.time()
        seen["leases"] = [r["state"] for r in leases.live_leases(index_dir, grace_s=0) if r["job"].startswith("serve-")]
    if name == "collected":
        seen["gc"] = info["report"].as_dict()
res = run(ReindexConfig(source=source, store=store, index_dir=index_dir, keep_versions=1, gc_grace_s=0.0),
          on_stage=on_stage)
print("RESULT " + json.dumps({"status": res.status, "added": res.added, "version": res.version,
                              "store_generation": res.store_generation, **seen}))
"""


def test_hot_switch_during_load(served, gardens_point):
    """A scheduled reindex (its own process and embedded Ray, as beside a running service) adds an
    image and publishes while clients keep asking: no request fails, each answer names one of the
    two states, answers started poll_s (+ the switch's load) after the publish come from the new
    one, and the GC the reindex runs right after publishing keeps every state the service leases."""
    import subprocess
    import sys

    from pipeline.datasets import write_frame_manifest as frames

    url, cfg, root = served["url"], served["cfg"], served["root"]
    old = json.loads(get(url + "state")[1])["state"]
    source = frames(root / "db2.csv", gardens_point / "day_right", DB_FRAMES + [ADDED_FRAME])
    jpeg = (gardens_point / "night_right" / f"Image{QUERY_FRAMES[3]:03d}.jpg").read_bytes()
    answers, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            t0 = time.time()
            status, answer, _ = post(url, jpeg)
            answers.append((t0, time.time(), status, answer.get("state")))
            time.sleep(0.05)

    clients = [threading.Thread(target=client) for _ in range(2)]
    for c in clients:
        c.start()
    try:
        proc = subprocess.run([sys.executable, "-c", REINDEX, source, cfg.database_store, cfg.index_dir],
                              capture_output=True, text=True, timeout=300, cwd=str(Path(__file__).parents[1]))
        assert proc.returncode == 0, proc.stderr[-3000:]
        res = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
        deadline = time.time() + 30
        while time.time() < deadline and json.loads(get(url + "state")[1])["state"] == old:
            time.sleep(0.2)
        time.sleep(2 * cfg.poll_s + 1)
    finally:
        stop.set()
        for c in clients:
            c.join(120)
    assert res["status"] == "published" and res["added"] == 1, res
    new = {"index_version": res["version"], "store_generation": res["store_generation"]}
    assert new != old
    state = json.loads(get(url + "state")[1])
    assert state["state"] == new and state["num_images"] == len(DB_FRAMES) + 1
    lag = state["last_switch"]["load_seconds"]
    assert answers and all(s == 200 for _, _, s, _ in answers), [a for a in answers if a[2] != 200]
    assert all(st in (old, new) for *_, st in answers)
    after = [st for t0, _, _, st in answers if t0 > res["published_at"] + cfg.poll_s + lag + 0.5]
    assert after and all(st == new for st in after), (res["published_at"], lag, answers)
    # the switch is one-way: once a request saw the new state, later-started ones do too
    first_new = min(t0 for t0, _, _, st in answers if st == new)
    assert all(st == new for t0, _, _, st in answers if t0 > first_new + 0.05)
    # GC ran right after the publish with keep_versions=1, grace 0: every state the service leased was kept
    report = res["gc"]
    held = {(s["index_version"], s["store_generation"]) for s in res["leases"]}
    assert (old["index_version"], old["store_generation"]) in held, res
    assert {v for v, _ in held} <= set(report["kept_versions"]), (held, report)
    assert any(j.startswith("serve-") for j in report["leases"]), report
    print(f"\nhot switch: {len(answers)} requests, {sum(st == old for *_, st in answers)} from {old}, "
          f"{sum(st == new for *_, st in answers)} from {new}; switch load {lag:.2f} s; GC kept "
          f"{report['kept_versions']}")


# ---------------------------------------------------------------- Chromium through the DevTools protocol
def upload_and_read_top1(url: str, photo: Path, timeout: float = 90) -> dict:
    """Open the page in Debian's headless Chromium, choose ``photo`` in its file input
    (DOM.setFileInputFiles) and read what the page shows once it has answered."""
    import shutil
    import subprocess
    import tempfile

    import websocket

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "Chromium is not installed (make test-tools: apt-get install chromium)"
    port = free_port()
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen([exe, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                                 f"--remote-debugging-port={port}", "--remote-allow-origins=*", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 30
            while True:
                try:
                    targets = json.loads(get(f"http://127.0.0.1:{port}/json")[1])
                    ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
                    break
                except (OSError, StopIteration):
                    assert time.time() < deadline, "Chromium's DevTools endpoint did not come up"
                    time.sleep(0.2)
            ws = websocket.create_connection(ws_url, timeout=30)
            ids = iter(range(1, 10**6))

            def call(method: str, **params):
                i = next(ids)
                ws.send(json.dumps({"id": i, "method": method, "params": params}))
                while True:
                    msg = json.loads(ws.recv())
                    if msg.get("id") == i:
                        assert "error" not in msg, msg
                        return msg["result"]

            def js(expr: str):
                return call("Runtime.evaluate", expression=expr, returnByValue=True)["result"].get("value")

            call("Page.navigate", url=url)
            while js("document.readyState") != "complete" or not js("!!document.getElementById('photo')"):
                assert time.time() < deadline + timeout, "the page did not load"
                time.sleep(0.1)
            root = call("DOM.getDocument")["root"]["nodeId"]
            node = call("DOM.querySelector", nodeId=root, selector="#photo")["nodeId"]
            call("DOM.setFileInputFiles", files=[str(photo)], nodeId=node)
            end = time.time() + timeout
            while not js("document.getElementById('status').textContent.startsWith('answered')"):
                status = js("document.getElementById('status').textContent")
                assert time.time() < end and "error" not in (js("document.getElementById('status').className") or ""), \
                    status
                time.sleep(0.2)
            while js("Array.from(document.querySelectorAll('.cand img')).some(i => !i.complete)") and time.time() < end:
                time.sleep(0.1)
            out = js("""({top1: document.getElementById('top1').dataset.imageId,
                          state: document.getElementById('top1').dataset.state,
                          text: document.getElementById('top1').textContent,
                          thumbnails_loaded: Array.from(document.querySelectorAll('.cand img'))
                              .filter(i => i.complete && i.naturalWidth > 0).length,
                          estimate_marks: document.querySelectorAll('#plot .estimate').length,
                          points: document.querySelectorAll('#plot circle').length})""")
            ws.close()
            return out
        finally:
            proc.terminate()
            proc.wait(10)
