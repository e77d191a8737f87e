"""`spotmatch serve`: a local review page over one catalogue (FastAPI; plain HTML/JS, no build step).

The model loads once per server. File access is only ever by catalogue image id, or by a sanitised
name inside the catalogue's uploads/ and explain/ folders: no request path reaches the file system.

Every request needs the access token that `serve` prints in its address (as Jupyter does), since the page can
relabel animals: another user of the machine, or anyone on the network when served beyond it, has no say. A
state-changing request from another web site is refused (its Origin), as is a Host this server was not
started for (DNS rebinding), and the page may not be framed (clickjacking).
"""
from __future__ import annotations

import errno
import hashlib
import mimetypes
import re
import secrets
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel

from spotmatch.data.tables import IMAGE_SUFFIXES
from spotmatch.errors import SpotmatchError
from spotmatch.io import portable_file_name

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 50 * 2**20
MAX_REQUEST_BYTES = MAX_UPLOAD_BYTES + 2**20  # one photo and its multipart framing
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
SECURITY_HEADERS = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'",
                    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


@dataclass
class ServeConfig:
    catalogue: Path
    shortlist_k: int | None = None  # None: the calibration file's (engine.EngineConfig)
    top_k: int = 5
    default_who: str = "reviewer"
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    # Host names the browser may reach this server by; "*" where it listens on every address (any of the
    # machine's names is then right, and the token alone guards it).
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES


def allowed_hosts_for(host: str) -> tuple[str, ...]:
    """The Host headers a server listening on `host` answers: its own address and this machine's loopback names."""
    return ("*",) if host in WILDCARD_HOSTS else tuple(dict.fromkeys([*LOOPBACK_NAMES, host]))


def address(host: str, port: int) -> str:
    """The address to open for a server listening on `host` (an IPv6 address in brackets, as URLs write it)."""
    shown = "127.0.0.1" if host in WILDCARD_HOSTS else host
    return f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/"


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before its address is printed: a port in use (another server) or an address this
    machine does not have is one line and exit 2, not an address that leads nowhere and uvicorn's own exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a restart need not wait
    try:
        listening.bind((host, port))
    except OSError as error:
        listening.close()
        advice = "another server has the port: pass another --port" if error.errno == errno.EADDRINUSE else \
            "pass an address of this machine as --host, or another --port"
        raise SpotmatchError(f"--host {host} --port {port}: cannot listen there ({error.strerror}); {advice}") from None
    return listening


def token_cookie(token: str) -> str:
    """The cookie that keeps `token` in the browser, named after it: cookies do not tell ports apart, and two servers
    on one machine must not overwrite each other's."""
    return "spotmatch_" + hashlib.sha256(token.encode()).hexdigest()[:12]


class RequestSizeLimit:
    """Refuse a request body over `limit` bytes while it arrives (413): FastAPI spools a whole upload to disk
    before the endpoint can look at its size, so a 2 GB post would fill the disk first."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self.refuse(scope, receive, send)
        received, refused = 0, False

        async def counted():
            # Past the limit the app is told the client left: an exception would be turned into the form parser's
            # own 400 by FastAPI.
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                await self.refuse(scope, receive, send)
                refused = True
                return {"type": "http.disconnect"}
            return message

        async def unless_refused(message):
            if not refused:
                await send(message)

        try:
            await self.app(scope, counted, unless_refused)
        except Exception:
            if not refused:  # the app's own failure; past the limit, only its reaction to the cut body
                raise

    @staticmethod
    async def refuse(scope, receive, send):
        await JSONResponse({"error": f"request too large: a photo may be at most {MAX_UPLOAD_BYTES >> 20} MiB; upload a smaller one"},
                           status_code=413)(scope, receive, send)


def refusal(request: Request, token: str, allowed_hosts: tuple[str, ...]) -> tuple[int, str] | None:
    """(status, reason) for a request to a Host this server was not started for (DNS rebinding), one without the
    access token, or a state-changing one sent by another site."""
    host = urlsplit(f"//{request.headers.get('host', '')}").hostname or ""  # "[::1]:8765" -> "::1"
    if "*" not in allowed_hosts and host not in allowed_hosts:
        return 400, f"host {host!r} refused: open the address that `spotmatch serve` printed"
    if request.method not in ("GET", "HEAD"):
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
            return 403, f"a request from {origin} refused: only this review page may change the catalogue"
    offered = request.cookies.get(token_cookie(token)) or request.query_params.get("token") or ""
    if not secrets.compare_digest(offered.encode(), token.encode()):
        return 401, "no access token: open the address that `spotmatch serve` printed (it ends in ?token=...)"
    return None


class Decision(BaseModel):
    photo: str
    individual: str | None = None  # None: a new individual
    who: str | None = None
    # Where, when and which flank, for a photo not in the catalogue yet (as `catalogue confirm --station ...`): a new
    # animal's first photo without them is never found by a station, season or flank search.
    station: str | None = None
    camera: str | None = None
    date: str | None = None
    side: str | None = None


def safe_upload_name(name: str) -> str:
    """A bare file name of letters, digits, dot, dash and underscore: `../../etc/passwd` becomes
    `etc_passwd`-like and can never leave the uploads folder."""
    cleaned = portable_file_name(re.split(r"[\\/]", name or "")[-1])
    if Path(cleaned).suffix.lower() not in IMAGE_SUFFIXES:
        raise SpotmatchError(f"{name!r}: not an image file name (jpg, png, ...); upload a photo")
    return cleaned


def inside(folder: Path, name: str) -> Path:
    """`folder/name`, refused unless it resolves inside `folder` (belt and braces after sanitising)."""
    path = (folder / name).resolve()
    if path.parent != folder.resolve():
        raise SpotmatchError(f"{name!r}: outside the catalogue folder; refused")
    return path


def free_upload_path(uploads: Path, name: str, data: bytes) -> Path:
    """Where an upload goes: its own name, unless a different photo holds it (camera traps reuse IMG_0001.JPG),
    then the name with its content hash added. A confirmed upload is the catalogue's only copy of the photo:
    overwriting it would give its image row another animal's pixels. The same photo again keeps its file."""
    path = inside(uploads, name)
    if not path.exists() or path.read_bytes() == data:
        return path
    stem, suffix = Path(name).stem, Path(name).suffix
    return inside(uploads, f"{stem}-{hashlib.sha256(data).hexdigest()[:12]}{suffix}")


def create_app(conf: ServeConfig):
    from spotmatch.catalogue.service import IdentifyConfig, PhotoFacts, confirm_photo, identify, open_engine
    from spotmatch.catalogue.store import Catalogue, GalleryRestriction

    store = Catalogue.open(conf.catalogue)
    uploads, explain_dir = store.folder / "uploads", store.folder / "explain"
    uploads.mkdir(exist_ok=True)
    explain_dir.mkdir(exist_ok=True)
    engine = open_engine(store, conf.shortlist_k)
    lock = threading.Lock()  # one SQLite connection and one engine: requests take turns
    upload_lock = threading.Lock()  # choosing an upload's file name and writing it, apart from the long identify
    app = FastAPI(title="spotmatch review", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestSizeLimit, limit=MAX_REQUEST_BYTES)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        refused = refusal(request, conf.token, conf.allowed_hosts)
        response = JSONResponse({"error": refused[1]}, status_code=refused[0]) if refused else await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response


    @app.exception_handler(SpotmatchError)
    async def one_line_error(_, exc: SpotmatchError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.get("/")
    def page(request: Request):
        if "token" in request.query_params:  # the printed address: keep the token in a cookie, out of the address bar
            response = RedirectResponse("/", status_code=303)
            # Lax, not Strict: the address is shared in a chat or a wiki, and a click from there is a cross-site
            # navigation that a Strict cookie would not follow through this redirect. Cross-site POSTs still
            # carry no cookie, and their Origin is refused besides.
            response.set_cookie(token_cookie(conf.token), conf.token, httponly=True, samesite="lax")
            return response
        return FileResponse(STATIC / "index.html")

    @app.get("/api/photos")
    def photos():
        return {"photos": sorted(p.name for p in uploads.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
                "stats": {k: v for k, v in store.stats().items() if isinstance(v, int)}, "who": conf.default_who}

    @app.post("/api/upload")
    def upload(file: UploadFile = File(...)):  # not async: decoding a large photo must not stall every other request
        name = safe_upload_name(file.filename)
        data = file.file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise SpotmatchError(f"{name}: larger than {MAX_UPLOAD_BYTES >> 20} MiB; upload a smaller photo")
        from spotmatch.data.images import decode_image
        from spotmatch.io import atomic_path

        decode_image(data, name)  # an empty or corrupt file is refused here, never listed among the photos to review
        with upload_lock:  # uploads run in threads: two of one name must not both find it free
            path = free_upload_path(uploads, name, data)
            if not path.exists():
                with atomic_path(path) as tmp:
                    tmp.write_bytes(data)
        return {"photo": path.name}

    @app.post("/api/identify/{photo}")
    def identify_photo(photo: str, station: str = "", since: str = "", until: str = "", side: str = ""):
        path = inside(uploads, safe_upload_name(photo))
        restriction = GalleryRestriction.from_text([station] if station.strip() else [], since, until, side)  # the form's empty field: unset
        with lock:
            result = identify(store, engine, [path], IdentifyConfig(conf.top_k, explain_dir, restriction))[0]
        return {"photo": photo, "verdict": result.verdict, "named": result.named, "threshold": result.threshold,
                "new_threshold": result.new_below, "known_image_id": result.known_image_id,
                "gallery": result.gallery, "decision": result.decision, "decision_score": result.decision_score,
                "calibrated": result.calibrated,
                "candidates": [{**c.__dict__, "gallery_path": Path(c.gallery_path).name,
                                "explanation_png": Path(c.explanation_png).name if c.explanation_png else None}
                               for c in result.candidates]}

    @app.post("/api/confirm")
    def confirm(decision: Decision):
        path = inside(uploads, safe_upload_name(decision.photo))
        # The form's empty fields: unset (the date then comes from the photo's EXIF).
        facts = PhotoFacts(*(value or None for value in (decision.station, decision.camera, decision.date, decision.side)))
        with lock:
            who = conf.default_who if decision.who is None else decision.who  # a blank name is refused, not replaced
            confirmed = confirm_photo(store, engine, path, decision.individual, who, facts)
        return {"image_id": confirmed.image_id, "individual": confirmed.individual, "previous": confirmed.previous,
                "previous_removed": confirmed.previous_removed}

    @app.get("/api/history/{photo}")
    def photo_history(photo: str):
        """The decisions recorded about an uploaded photo (none until it is confirmed into the catalogue), and the
        station, date and flank it was added with."""
        from spotmatch.data.images import file_sha256

        path = inside(uploads, safe_upload_name(photo))
        if not path.is_file():
            raise HTTPException(404)
        with lock:
            known = store.image_by_sha(file_sha256(path))
            if known is None:
                return {"photo": photo, "image_id": None, "history": [], "facts": None}
            rows = store.history(image_id=int(known["id"])).drop(columns="photo")
        return {"photo": photo, "image_id": int(known["id"]), "history": rows.astype(object).where(rows.notna(), None).to_dict("records"),
                "facts": {key: known[key] for key in ("station", "camera", "captured_at", "side")}}

    @app.get("/files/upload/{name}")
    def upload_file(name: str):
        path = inside(uploads, safe_upload_name(name))
        if not path.is_file():
            raise HTTPException(404)
        return FileResponse(path)

    @app.get("/files/explain/{name}")
    def explain_file(name: str):
        path = inside(explain_dir, safe_upload_name(name))
        if not path.is_file():
            raise HTTPException(404)
        return FileResponse(path)

    @app.get("/files/image/{image_id}")
    def catalogue_image(image_id: int):
        with lock:
            row = store.image(image_id)
        if not Path(row["path"]).is_file():  # moved or archived since it was added
            raise HTTPException(404, f"{row['path']}: photo not there any more; if it moved: spotmatch catalogue relink"
                                     f" {store.folder} --photos OLD=NEW")
        data = Path(row["path"]).read_bytes()
        # Whatever lies at the stored path now (another photo saved over it, a link to any file) is not the photo the
        # reviewer is deciding on.
        if hashlib.sha256(data).hexdigest() != row["sha256"]:
            raise HTTPException(409, f"{row['path']}: not the photo added as image {image_id} (its content changed); put the"
                                     f" original back, or if it moved: spotmatch catalogue relink {store.folder} --photos OLD=NEW")
        return Response(data, media_type=mimetypes.guess_type(row["path"])[0] or "application/octet-stream")

    return app
