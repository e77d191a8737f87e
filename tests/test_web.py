"""The review web app end to end: a real server on 127.0.0.1 driven by headless Chromium."""
from __future__ import annotations

import json
import re
import shutil
import socket
import threading
import time

import pandas as pd
import pytest

from conftest import SNOW
from test_catalogue import fusion_file, gallery_and_queries  # noqa: F401  (shared fixtures)

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


TOKEN = "token-of-the-test-server"
# a request's own headers replace the client's, so each one carries the cookie
COOKIE = {"Cookie": f"{__import__('spotmatch.web.app', fromlist=['token_cookie']).token_cookie(TOKEN)}={TOKEN}"}


def authorised(**headers):
    """A client that carries the server's access token, as the page does once opened from the printed address."""
    import urllib3

    return urllib3.PoolManager(headers={**COOKIE, **headers})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint, fusion_file, gallery_and_queries):  # noqa: F811
    import uvicorn

    from spotmatch.catalogue.service import add_images, init_catalogue, open_engine, sources_from_csv
    from spotmatch.web.app import ServeConfig, create_app

    folder = tmp_path_factory.mktemp("served") / "cat"
    store = init_catalogue(folder, tiny_checkpoint, fusion_file)
    engine = open_engine(store, shortlist_k=5)
    add_images(store, engine.embedder, engine.local, sources_from_csv(gallery_and_queries[0]))
    store.close()
    port = free_port()
    web = uvicorn.Server(uvicorn.Config(create_app(ServeConfig(folder, shortlist_k=5, top_k=3, token=TOKEN)), host="127.0.0.1",
                                       port=port, log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not web.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", folder
    web.should_exit = True
    thread.join(timeout=10)


def post_file(url: str, name: str, data: bytes):
    return authorised().request("POST", url, fields={"file": (name, data, "image/jpeg")})


def test_only_the_page_opened_with_the_token_may_use_the_server(server, gallery_and_queries):  # noqa: F811
    """The page can relabel animals: another user of the machine, another web site in the reviewer's browser (its
    Origin), a rebound DNS name (its Host), and a framing page are all refused; an oversized upload is refused
    while it arrives, before it fills the disk."""
    import urllib3

    base, folder = server
    anonymous = urllib3.PoolManager()
    refused = anonymous.request("GET", f"{base}/api/photos")
    assert refused.status == 401 and "?token=" in json.loads(refused.data)["error"]
    assert anonymous.request("GET", f"{base}/files/image/1").status == 401
    assert anonymous.request("GET", f"{base}/api/photos?token=wrong-{TOKEN}").status == 401
    opened = anonymous.request("GET", f"{base}/?token={TOKEN}", redirect=False)
    assert opened.status == 303 and COOKIE["Cookie"] in opened.headers["set-cookie"]
    # Lax: the address clicked in a team's chat is a cross-site navigation, which must reach the page
    assert "samesite=lax" in opened.headers["set-cookie"].lower() and "httponly" in opened.headers["set-cookie"].lower()
    page = authorised().request("GET", f"{base}/")
    assert page.status == 200 and page.headers["x-frame-options"] == "DENY"
    assert authorised(Host="attacker.example").request("GET", f"{base}/api/photos").status == 400
    port = base.rsplit(":", 1)[1]
    for loopback in (f"localhost:{port}", f"[::1]:{port}"):
        assert authorised(Host=loopback).request("GET", f"{base}/api/photos").status == 200, loopback
    decision = json.dumps({"photo": "none.jpg", "individual": "Rebound", "who": "mallory"})
    for origin in ("http://attacker.example", "http://127.0.0.2:8000"):
        crossed = authorised().request("POST", f"{base}/api/confirm", body=decision,
                                       headers={**COOKIE, "Origin": origin, "Content-Type": "application/json"})
        assert crossed.status == 403 and origin in json.loads(crossed.data)["error"]
    same_page = authorised().request("POST", f"{base}/api/confirm", body=decision,
                                     headers={**COOKIE, "Origin": base, "Content-Type": "application/json"})
    assert same_page.status == 400 and "none.jpg" in json.loads(same_page.data)["error"]  # past the guard, refused for its photo
    before = sorted(p.name for p in (folder / "uploads").iterdir())
    huge = authorised().request("POST", f"{base}/api/upload", body=b"x" * (53 * 2**20), headers={**COOKIE, "Content-Type": "multipart/form-data; boundary=b"})
    assert huge.status == 413 and "at most 50 MiB" in json.loads(huge.data)["error"]

    def chunks():  # no Content-Length: counted as it arrives, the photo part well formed so that parsing goes on
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        for _ in range(60):
            yield b"y" * 2**20

    streamed = authorised().request("POST", f"{base}/api/upload", body=chunks(), chunked=True,
                                    headers={**COOKIE, "Content-Type": "multipart/form-data; boundary=b"})
    assert streamed.status == 413
    assert sorted(p.name for p in (folder / "uploads").iterdir()) == before


def test_two_uploads_of_one_name_at_once_keep_both_photos(server, gallery_and_queries):  # noqa: F811
    """Uploads run in threads: two photos sent at the same moment under one name (camera traps reuse IMG_0001.JPG)
    must not both be told the name is free, one overwriting the other."""
    from concurrent.futures import ThreadPoolExecutor

    base, folder = server
    photos = [path.read_bytes() for path in sorted((SNOW / "images").iterdir())[-6:]]
    for attempt in range(3):
        name = f"RACE_{attempt}.JPG"
        with ThreadPoolExecutor(len(photos)) as pool:
            answers = list(pool.map(lambda data: post_file(f"{base}/api/upload", name, data), photos))
        stored = [json.loads(answer.data)["photo"] for answer in answers]
        assert len(set(stored)) == len(photos), stored
        assert [(folder / "uploads" / photo).read_bytes() for photo in stored] == photos


def test_a_photo_confirmed_on_the_page_keeps_its_station_date_and_flank(server):
    """The page's "this photo" fields reach the catalogue as `catalogue confirm --station ...` does: without them a new
    animal's first photo would be found by no station, season or flank search. Once in, its facts are shown, and new
    ones refused (they would be dropped unseen)."""
    from spotmatch.catalogue.store import Catalogue

    base, folder = server
    photo = sorted((SNOW / "images").iterdir())[-7]
    name = json.loads(post_file(f"{base}/api/upload", "FACTS_0001.JPG", photo.read_bytes()).data)["photo"]
    assert json.loads(authorised().request("GET", f"{base}/api/history/{name}").data)["facts"] is None

    def confirm(**fields):
        return authorised(**{"Content-Type": "application/json"}).request(
            "POST", f"{base}/api/confirm", body=json.dumps({"photo": name, "individual": None, "who": "tester", **fields}))

    bad = confirm(station="Upper ridge", date="22/07/2013")
    assert bad.status == 400 and "does not read as year-month-day" in json.loads(bad.data)["error"]
    answer = confirm(station=" Upper ridge ", camera="", date="2013-07-22", side="left")  # an empty field: not known
    assert answer.status == 200, answer.data
    image_id = json.loads(answer.data)["image_id"]
    store = Catalogue.open(folder)
    try:
        row = store.image(image_id)
        assert (row["station"], row["camera"], row["side"], row["captured_at"][:10]) == ("Upper ridge", None, "left", "2013-07-22")
    finally:
        store.close()
    history = json.loads(authorised().request("GET", f"{base}/api/history/{name}").data)
    assert history["image_id"] == image_id
    assert {key: history["facts"][key] for key in ("station", "camera", "side")} == {"station": "Upper ridge", "camera": None, "side": "left"}
    again = confirm(station="S01")
    assert again.status == 400 and "already in the catalogue" in json.loads(again.data)["error"]
    assert confirm().status == 200  # relabelled without facts: fine


def test_a_port_in_use_is_one_line_before_any_address_is_printed(server):
    """`serve` printed its address, then uvicorn failed on the busy port (exit 3): the address looked like success."""
    import subprocess
    import sys

    from conftest import REPO

    _, folder = server
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        cli = [sys.executable, "-c", "from spotmatch.cli import main; main()", "serve", str(folder)]
        taken = subprocess.run([*cli, "--port", str(busy.getsockname()[1])], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert taken.returncode == 2 and taken.stdout == "", (taken.stdout, taken.stderr)
        assert len(taken.stderr.strip().splitlines()) == 1 and "cannot listen there" in taken.stderr and "--port" in taken.stderr
        beyond = subprocess.run([*cli, "--port", "99999"], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert beyond.returncode == 2 and "Traceback" not in beyond.stderr and "--port" in beyond.stderr
    finally:
        busy.close()


def test_the_printed_address_brackets_an_ipv6_host():
    from spotmatch.web.app import address

    assert address("0.0.0.0", 8765) == "http://127.0.0.1:8765/"
    assert address("::1", 8765) == "http://[::1]:8765/"
    assert address("192.168.1.5", 80) == "http://192.168.1.5:80/"


def test_upload_names_cannot_escape_the_catalogue(server, gallery_and_queries):  # noqa: F811
    base, folder = server
    photo = gallery_and_queries[1][0].read_bytes()
    for hostile in ("../../etc/passwd", "..\\..\\windows\\win.ini", "/etc/passwd"):
        refused = post_file(f"{base}/api/upload", hostile, photo)
        assert refused.status == 400 and "not an image file name" in json.loads(refused.data)["error"]
    uploads = folder / "uploads"
    # "../../evil.jpg" followed from uploads/ lands in a folder that exists, so an escaping write would succeed there.
    for climbing in ("../../evil.jpg", "../../../tmp/evil.jpg"):
        stored = post_file(f"{base}/api/upload", climbing, photo)
        assert stored.status == 200 and json.loads(stored.data)["photo"] == "evil.jpg"
        for start in (uploads, folder):
            assert not (start / climbing).resolve().exists(), climbing
    assert (uploads / "evil.jpg").read_bytes() == photo
    for restriction, error in (("station=S99", "no station named 'S99'"), ("since=July", "not a date")):
        refused = authorised().request("POST", f"{base}/api/identify/evil.jpg?{restriction}")
        assert refused.status == 400 and error in json.loads(refused.data)["error"]
    for name, data in (("empty.jpg", b""), ("cut.jpg", photo[: len(photo) // 3])):  # never listed for review
        refused = post_file(f"{base}/api/upload", name, data)
        assert refused.status == 400 and json.loads(refused.data)["error"].startswith(f"{name}: cannot decode image")
        assert name not in json.loads(authorised().request("GET", f"{base}/api/photos").data)["photos"]
    identified = json.loads(authorised().request("POST", f"{base}/api/identify/evil.jpg").data)
    assert identified["calibrated"] is True  # the page labels a calibrated number p=, an uncalibrated one similarity
    for probe in ("..%2F..%2Fcatalogue.db", "catalogue.db", "..%2F..%2F..%2Fetc%2Fpasswd"):
        escaped = authorised().request("GET", f"{base}/files/upload/{probe}")
        assert escaped.status in (400, 404) and b"SQLite" not in escaped.data and b"root:" not in escaped.data


def test_an_upload_never_replaces_another_photo_of_the_same_name(server, gallery_and_queries):  # noqa: F811
    """Camera traps reuse names (IMG_0001.JPG): once confirmed, an upload is the catalogue's only copy of its
    photo, so a different photo of that name is kept beside it, never over it."""
    base, folder = server
    known = set(pd.read_csv(gallery_and_queries[0])["filename"]) | {path.name for path in gallery_and_queries[1]}
    first, second = (path.read_bytes() for path in [p for p in sorted((SNOW / "images").iterdir()) if p.name not in known][-2:])
    assert json.loads(post_file(f"{base}/api/upload", "IMG_0001.JPG", first).data)["photo"] == "IMG_0001.JPG"
    http = authorised()
    blank = http.request("POST", f"{base}/api/confirm", body=json.dumps({"photo": "IMG_0001.JPG", "who": ""}),
                         headers={**COOKIE, "Content-Type": "application/json"})
    assert blank.status == 400 and "blank" in json.loads(blank.data)["error"]  # refused, not recorded as the default reviewer
    # confirmed as a cat already there: a new individual could outrank the browser test's expected candidates
    confirmed = http.request("POST", f"{base}/api/confirm", body=json.dumps({"photo": "IMG_0001.JPG", "individual": "Cat1", "who": "ana"}),
                             headers={**COOKIE, "Content-Type": "application/json"})
    image_id = json.loads(confirmed.data)["image_id"]
    assert json.loads(confirmed.data)["previous"] is None  # a new upload was unidentified until now
    history = json.loads(http.request("GET", f"{base}/api/history/IMG_0001.JPG").data)
    assert history["image_id"] == image_id
    assert [(r["action"], r["who"], r["individual"]) for r in history["history"]] == [("confirm", "ana", "Cat1")]
    assert http.request("GET", f"{base}/api/history/IMG_0404.JPG").status == 404
    twin = json.loads(post_file(f"{base}/api/upload", "IMG_0001.JPG", second).data)["photo"]
    assert twin != "IMG_0001.JPG" and (folder / "uploads" / twin).read_bytes() == second
    assert http.request("GET", f"{base}/files/image/{image_id}").data == first  # the confirmed photo is still itself
    assert json.loads(post_file(f"{base}/api/upload", "IMG_0001.JPG", first).data)["photo"] == "IMG_0001.JPG"  # same photo, same file
    assert http.request("GET", f"{base}/files/upload/not_there.jpg").status == 404
    (folder / "uploads" / "IMG_0001.JPG").rename(folder / "uploads" / "kept")
    try:  # another photo saved over the catalogue's file: shown, it would be decided on as the photo that was added
        (folder / "uploads" / "IMG_0001.JPG").write_bytes(second)
        swapped = http.request("GET", f"{base}/files/image/{image_id}")
        assert swapped.status == 409 and "its content changed" in json.loads(swapped.data)["detail"]
    finally:
        (folder / "uploads" / "kept").replace(folder / "uploads" / "IMG_0001.JPG")
    (folder / "uploads" / "IMG_0001.JPG").rename(folder / "uploads" / "archived")  # the photo moved since
    try:
        moved = http.request("GET", f"{base}/files/image/{image_id}")
        assert moved.status == 404 and "catalogue relink" in json.loads(moved.data)["detail"]
    finally:
        (folder / "uploads" / "archived").rename(folder / "uploads" / "IMG_0001.JPG")


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="headless browser test needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
def test_review_page_upload_identify_confirm(server, gallery_and_queries):  # noqa: F811
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from spotmatch.catalogue.store import Catalogue

    base, folder = server
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(f"{base}/?token={TOKEN}")
        wait.until(lambda b: "individuals" in b.find_element(By.ID, "stats").text)
        query = gallery_and_queries[1][1]
        browser.find_element(By.ID, "file").send_keys(str(query))
        browser.find_element(By.ID, "upload").click()
        wait.until(seen.text_to_be_present_in_element((By.ID, "message"), f"uploaded {query.name}"))
        browser.find_element(By.ID, "identify").click()
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".candidate"))
        cards = browser.find_elements(By.CSS_SELECTOR, ".candidate")
        assert 1 <= len(cards) <= 3
        first = cards[0].find_element(By.CSS_SELECTOR, ".individual").text
        probability = float(cards[0].find_element(By.CSS_SELECTOR, ".probability").text)
        assert first in {"Cat1", "Cat5", "Cat21"} and 0 <= probability <= 1
        assert "threshold" in browser.find_element(By.ID, "verdict").text
        # each candidate names its catalogue photo, station and capture date
        assert re.fullmatch(r"\S+\.JPG · S\d+ camera \d+ · 20\d\d-\d\d-\d\dT[\d:]+ · flank unknown",
                            cards[0].find_element(By.CSS_SELECTOR, ".metadata").text)
        explanation = cards[0].find_element(By.CSS_SELECTOR, "img.explanation")
        wait.until(lambda b: b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", explanation) > 0)
        browser.find_element(By.ID, "photo-station").send_keys("Lower gorge")  # where the new photo was taken
        Select(browser.find_element(By.ID, "photo-side")).select_by_visible_text("right")
        cards[0].find_element(By.CSS_SELECTOR, "button.confirm").click()
        wait.until(seen.text_to_be_present_in_element((By.ID, "message"), f"is {first}"))
        wait.until(seen.text_to_be_present_in_element((By.ID, "history"), f"confirm · {first}"))  # the page's own history
        # in the catalogue now: its facts are said as stored, and not offered for editing
        wait.until(seen.text_to_be_present_in_element((By.ID, "photo-facts-note"), "Lower gorge · "))
        assert "right flank" in browser.find_element(By.ID, "photo-facts-note").text
        assert not browser.find_element(By.ID, "photo-station").is_enabled()
    finally:
        browser.quit()
    store = Catalogue.open(folder)
    row = store.db.execute("SELECT images.id, images.station, images.side, individuals.name FROM images JOIN individuals ON individuals.id = images.individual_id"
                           " WHERE images.filename = ?", (query.name,)).fetchone()
    assert row["name"] == first and (row["station"], row["side"]) == ("Lower gorge", "right")
    assert store.db.execute("SELECT action FROM confirmations WHERE image_id = ?", (row["id"],)).fetchone()[0] == "confirm"
