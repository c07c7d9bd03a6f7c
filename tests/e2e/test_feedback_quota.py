"""FEEDBACK_DIR's quota (issue 28): past FEEDBACK_MAX_BYTES or FEEDBACK_MAX_FILES a correction is refused
with 507, counted at /metrics, and nothing stored before is lost; several workers at once do not overshoot."""
import fcntl
import os
import re
import threading
import time

import requests
from support.clients import TIMEOUT
from support.images import shape_image
from support.models import write_colour_model


def send(server, data, label="red", name="x.jpg"):
    return requests.post(server.url + "/feedback", data={"label": label}, files={"data": (name, data)},
                         timeout=TIMEOUT)


def refused(server):
    """classify_feedback_refused_total by limit, summed over the workers."""
    text = requests.get(server.url + "/metrics", timeout=TIMEOUT).text
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^classify_feedback_refused_total\{limit="(\w+)"\} (\S+)$', text, re.M)}


def stored(folder):
    """{path relative to `folder`: bytes} of every file under it."""
    return {os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(folder) for name in names}


def test_past_the_bytes_and_the_files_quota_corrections_are_refused_and_nothing_is_lost(tmp_path, start_server):
    model = write_colour_model(tmp_path / "model")
    small = [shape_image("red_circle", seed) for seed in range(3)]
    big = shape_image("green_square", 99, size=(400, 300))
    assert len(big) > 4 * max(map(len, small))
    folder = tmp_path / "feedback"
    # Room for the three small images, not for the big one beside two of them; and three files at most.
    max_bytes = sum(map(len, small)) + len(big) // 2
    server = start_server({"MODEL_DIR": model, "FEEDBACK_DIR": str(folder), "FEEDBACK_MAX_BYTES": str(max_bytes),
                           "FEEDBACK_MAX_FILES": "3", "FEEDBACK_PER_MINUTE": "1000"}, workers=2)
    assert refused(server) == {"bytes": 0, "files": 0, "disk": 0}

    assert [send(server, data).status_code for data in small[:2]] == [201, 201]
    before = stored(folder)
    r = send(server, big, "green")
    assert r.status_code == 507, r.text
    assert "FEEDBACK_MAX_BYTES" in r.json()["error"] and "nothing was stored" in r.json()["error"]
    assert stored(folder) == before  # not written at all, not even a temp file

    assert send(server, small[2]).status_code == 201  # a smaller one still fits: the third file
    before = stored(folder)
    assert len(before) == 3 and sorted(before.values()) == sorted(small)
    r = send(server, shape_image("blue_triangle", 5), "blue")
    assert r.status_code == 507, r.text
    assert "FEEDBACK_MAX_FILES" in r.json()["error"]
    # A duplicate takes no room: answered as before the quota, 200 "already stored".
    again = send(server, small[0])
    assert again.status_code == 200 and again.json()["new"] is False, again.text
    assert again.json()["message"].startswith("already stored as red/")

    assert refused(server) == {"bytes": 1, "files": 1, "disk": 0}
    assert stored(folder) == before  # every file stored before is there, byte for byte
    # Room made by moving corrections out (as after a retraining) is seen at once: usage is read from disk.
    os.unlink(folder / next(iter(before)))
    assert send(server, shape_image("blue_triangle", 5), "blue").status_code == 201


def test_many_clients_at_once_on_several_workers_do_not_overshoot_the_quota(tmp_path, start_server):
    model = write_colour_model(tmp_path / "model")
    folder = tmp_path / "feedback"
    server = start_server({"MODEL_DIR": model, "FEEDBACK_DIR": str(folder), "FEEDBACK_MAX_FILES": "5",
                           "FEEDBACK_PER_MINUTE": "1000", "THREADS": "8"}, workers=2)
    images = [shape_image("red_circle", 1000 + i) for i in range(24)]
    codes, barrier = [None] * len(images), threading.Barrier(len(images))

    def client(i):
        barrier.wait(timeout=30)
        codes[i] = send(server, images[i]).status_code

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(codes) == [201] * 5 + [507] * 19, codes
    files = stored(folder)
    assert len(files) == 5 and all(data in images for data in files.values())
    assert refused(server)["files"] == 19


def test_a_worker_measures_and_writes_only_while_it_holds_the_folders_lock(tmp_path, start_server):
    """What keeps workers from overshooting together: the measure and the write happen under an flock on
    FEEDBACK_DIR that every process takes. This test holds it, as another worker would: the correction
    waits for it, then is stored."""
    model = write_colour_model(tmp_path / "model")
    folder = tmp_path / "feedback"
    folder.mkdir()
    server = start_server({"MODEL_DIR": model, "FEEDBACK_DIR": str(folder)})
    answers = []
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        thread = threading.Thread(target=lambda: answers.append(send(server, shape_image("red_circle", 7))))
        thread.start()
        time.sleep(2)
        assert not answers and stored(folder) == {}, "stored without the folder's lock"
    finally:
        os.close(fd)
    thread.join(timeout=30)
    assert answers and answers[0].status_code == 201, answers
    assert len(stored(folder)) == 1


def test_usage_counts_what_others_put_there_and_follows_no_link(tmp_path):
    """In process: files copied in by hand count; a symlink counts as the small file it is (a link to a huge
    file elsewhere is not that file); the walk stops once past the quota."""
    from classify_server.http_api.feedback import Quota, QuotaExceeded
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "deep").mkdir(parents=True)
    for i in range(4):
        (tmp_path / "a" / f"{i}.jpg").write_bytes(b"x" * 100)
    (tmp_path / "b" / "deep" / "by-hand.png").write_bytes(b"y" * 50)
    big = tmp_path.parent / f"{tmp_path.name}-big"
    big.write_bytes(b"z" * 100_000)
    os.symlink(big, tmp_path / "b" / "link.jpg")
    link_size = len(str(big))
    assert Quota(10**9, 100).usage(str(tmp_path)) == (450 + link_size, 6)
    assert Quota(10**9, 2).usage(str(tmp_path))[1] == 3  # stopped just past the quota
    Quota(450 + link_size + 10, 7).check(str(tmp_path), 10)  # fits exactly
    for quota, adding, limit in ((Quota(450 + link_size + 10, 7), 11, "bytes"), (Quota(10**9, 6), 1, "files")):
        try:
            quota.check(str(tmp_path), adding)
            raise AssertionError("past the quota, not refused")
        except QuotaExceeded as exc:
            assert exc.limit == limit and f"FEEDBACK_MAX_{limit.upper()}" in exc.message
