"""The feedback web page: radiologists log in, see the newest finished jobs with their overlays and
findings, and agree or disagree with each finding.

Closed by default, as the SCP: clients from loopback only unless ``feedback.allowed_networks``
lists more (and then only over TLS, see :class:`~dicom_node.config.FeedbackSettings`); every page
but the login form needs a login from the users file (:mod:`dicom_node.feedback.users`). The
session is a signed cookie (HttpOnly, SameSite=Strict, Secure over TLS) holding the user and a
CSRF token that every form carries back. Pages show job ids, study dates, modalities, UIDs and
scores; never a patient's name or ID. Every text the page shows is fixed.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from html import escape
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any
from urllib.parse import urlencode

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Route

from dicom_node.audit import AuditEvent, AuditTrail, Outcome
from dicom_node.config import Settings
from dicom_node.db import NodeDatabase
from dicom_node.errors import NodeError, PortInUseError
from dicom_node.feedback.store import (
    MAX_REASON,
    FeedbackError,
    ReviewedFinding,
    ReviewedJob,
    jobs_to_review,
    overlay_png,
    record_verdict,
)
from dicom_node.feedback.users import authenticate, load_users, users_file

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

COOKIE = "dicom_node_feedback"
#: Failed logins an address may make within :data:`LOGIN_WINDOW_S` before its logins are refused.
LOGIN_FAILURES = 5
LOGIN_WINDOW_S = 900.0
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #111; background: #f6f7f9; }
header { display: flex; gap: 1em; align-items: baseline; }
header form { margin-left: auto; }
.job { background: #fff; border: 1px solid #ccd; border-radius: 6px; padding: 1em; margin: 1em 0; }
.job.flagged { border-left: 6px solid #c22; }
.instance { display: flex; gap: 1.5em; align-items: flex-start; margin-top: .5em; }
.instance img { width: 300px; border: 1px solid #999; background: #000; }
table { border-collapse: collapse; }
td, th { padding: .3em .6em; border-bottom: 1px solid #e3e3ea; text-align: left; }
.flag { color: #c22; font-weight: bold; }
.experimental { color: #777; }
.verdict-agree { color: #171; font-weight: bold; }
.verdict-disagree { color: #a40; font-weight: bold; }
input[name=reason] { width: 14em; }
td form { white-space: nowrap; }
td.verdict { max-width: 16em; }
.uid { color: #666; font-size: 12px; }
.notice { color: #555; font-size: 12px; }
.error { color: #b00; }
"""


class AddressGate:
    """ASGI middleware admitting clients from loopback and ``networks`` only (403 otherwise); the
    client is the connection's peer address, never a forwarded header."""

    def __init__(self, app: ASGIApp, networks: list[IPv4Network | IPv6Network]) -> None:
        self.app = app
        self.networks = networks

    def admits(self, host: str | None) -> bool:
        """Return whether a client at ``host`` (an IP address) may reach the page."""
        try:
            address = ip_address(host or "")
        except ValueError:
            return False
        address = getattr(address, "ipv4_mapped", None) or address
        return address.is_loopback or any(address in network for network in self.networks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.admits((scope.get("client") or (None,))[0]):
            await PlainTextResponse("Forbidden: this address may not reach the feedback page.",
                                    status_code=403)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def session_key(settings: Settings) -> str:
    """Return the key that signs session cookies: ``feedback.session_key_file`` (default
    ``state_dir/feedback.key``), generated (mode 0600) when it does not exist."""
    path = settings.feedback.session_key_file or settings.state_dir / "feedback.key"
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(secrets.token_hex(32))
    except FileExistsError:
        pass
    except OSError as exc:
        raise NodeError(f"cannot create the feedback session key {path}: {exc.strerror}") from exc
    key = path.read_text().strip()
    if not key:
        raise NodeError(f"the feedback session key {path} is empty")
    return key


def _page(title: str, body: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
        f"<link rel=stylesheet href=/style.css></head><body>{body}</body></html>",
        status_code=status_code, headers=HEADERS)


def _csrf_token(request: Request) -> str:
    """Return the session's CSRF token, made on first use."""
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(32)
    return str(token)


def _csrf_field(request: Request) -> str:
    return f'<input type=hidden name=csrf value="{escape(_csrf_token(request))}">'


def _csrf_valid(request: Request, form: Any) -> bool:
    expected, given = request.session.get("csrf"), form.get("csrf")
    return bool(expected) and isinstance(given, str) and hmac.compare_digest(str(expected), given)


def _login_form(request: Request, error: str = "", status_code: int = 200) -> HTMLResponse:
    message = f"<p class=error>{escape(error)}</p>" if error else ""
    return _page("Log in — dicom-node feedback", f"""
<h1>dicom-node feedback</h1>{message}
<form method=post action=/login>{_csrf_field(request)}
<p><label>User <input name=user autocomplete=username required></label></p>
<p><label>Password <input name=password type=password autocomplete=current-password required></label></p>
<p><button type=submit>Log in</button></p></form>""", status_code)


def _finding_row(request: Request, job: ReviewedJob, sop_uid: str, finding: ReviewedFinding,
                 flagged_only: bool) -> str:
    marks = ("<span class=flag>⚑ flagged</span>" if finding.flagged else "") + \
            (" <span class=experimental>experimental</span>" if finding.experimental else "")
    verdict = (f"<span class=verdict-{finding.verdict.value}>you: {finding.verdict.value}</span>"
               + (f" <q>{escape(finding.reason)}</q>" if finding.reason else "") if finding.verdict else "")
    return f"""<tr data-finding="{escape(finding.name)}"><td>{escape(finding.display_name)}</td>
<td>{finding.probability:.2f}</td><td>{finding.threshold:.2f}</td><td>{marks}</td>
<td><form method=post action=/feedback>{_csrf_field(request)}
<input type=hidden name=job value={job.job_id}><input type=hidden name=instance value="{escape(sop_uid)}">
<input type=hidden name=finding value="{escape(finding.name)}">{'<input type=hidden name=flagged value=1>' if flagged_only else ''}
<input name=reason placeholder="reason (optional)" maxlength={MAX_REASON}>
<button name=verdict value=agree>Agree</button> <button name=verdict value=disagree>Disagree</button>
</form></td><td class=verdict>{verdict}</td></tr>"""


def _job_section(request: Request, job: ReviewedJob, flagged_only: bool) -> str:
    date = job.study_date
    shown_date = f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 and date.isdigit() else "date unknown"
    flag = " · <span class=flag>flagged</span>" if job.flagged else ""
    heading = (f'<section class="job{" flagged" if job.flagged else ""}" id=job-{job.job_id} data-job={job.job_id}>'
               f"<h2>Job {job.job_id} · {escape(shown_date)} · {escape(job.modality or '?')}{flag}</h2>")
    parts = [heading]
    for instance in job.instances:
        uid = escape(instance.sop_instance_uid)
        image = (f'<img alt="overlay of {uid}" src="/overlay/{job.job_id}/{uid}/{escape(instance.pipeline)}.png">'
                 if instance.overlay else "<p class=notice>no overlay</p>")
        rows = "".join(_finding_row(request, job, instance.sop_instance_uid, finding, flagged_only)
                       for finding in instance.findings)
        parts.append(f"""<div class=instance>{image}<div><p class=uid>instance {uid} · {escape(instance.pipeline)}</p>
<table><tr><th>finding</th><th>score</th><th>threshold</th><th></th><th>your verdict</th><th></th></tr>{rows}</table>
</div></div>""")
    parts.append("</section>")
    return "".join(parts)


class FeedbackApp:
    """The page's routes, bound to the node's database, audit trail and settings."""

    def __init__(self, settings: Settings, db: NodeDatabase, audit: AuditTrail) -> None:
        self.settings = settings
        self.db = db
        self.audit = audit
        self.users = users_file(settings)
        self._failures: dict[str, list[float]] = {}
        self._failures_lock = threading.Lock()

    def _throttled(self, remote: str, failed: bool = False) -> bool:
        """Return whether ``remote`` made :data:`LOGIN_FAILURES` failed logins within the window;
        with ``failed``, count one more first."""
        now = time.monotonic()
        with self._failures_lock:
            recent = [t for t in self._failures.get(remote, []) if now - t < LOGIN_WINDOW_S] + ([now] if failed else [])
            self._failures[remote] = recent
            return len(recent) >= LOGIN_FAILURES

    def user(self, request: Request) -> str | None:
        """Return the logged-in user: a session younger than ``feedback.session_hours`` of a user
        still in the users file; None otherwise."""
        name, since = request.session.get("user"), request.session.get("since", 0)
        if not isinstance(name, str) or time.time() - float(since) > self.settings.feedback.session_hours * 3600:
            return None
        return name if name in load_users(self.users) else None

    async def login_form(self, request: Request) -> Response:
        if self.user(request):
            return RedirectResponse("/", status_code=303)
        return _login_form(request)

    async def login(self, request: Request) -> Response:
        form = await request.form()
        if not _csrf_valid(request, form):
            return _login_form(request, "The form expired; please log in again.", 403)
        name, password = str(form.get("user", "")), str(form.get("password", ""))
        remote = request.client.host if request.client else None
        if self._throttled(str(remote)):
            return _login_form(request, "Too many failed logins from this address; try again later.", 429)
        accepted = await run_in_threadpool(authenticate, self.users, name, password)
        if not accepted:
            self._throttled(str(remote), failed=True)
        # The actor is a known user's name only: what else was typed as a name may be a password.
        known = name in load_users(self.users)
        await run_in_threadpool(
            self.audit.record, AuditEvent.FEEDBACK_LOGIN,
            outcome=Outcome.SUCCESS if accepted else Outcome.MINOR_FAILURE,
            actor=name if known else None, remote=remote,
            detail="feedback page login" if accepted else
            "feedback page login refused: wrong password" if known else "feedback page login refused: unknown user")
        if not accepted:
            return _login_form(request, "Wrong user name or password.", 401)
        request.session.clear()
        request.session.update(user=name, since=time.time(), csrf=secrets.token_urlsafe(32))
        return RedirectResponse("/", status_code=303)

    async def logout(self, request: Request) -> Response:
        form = await request.form()
        if _csrf_valid(request, form):
            request.session.clear()
        return RedirectResponse("/login", status_code=303)

    async def index(self, request: Request) -> Response:
        user = self.user(request)
        if user is None:
            return RedirectResponse("/login", status_code=303)
        flagged_only = request.query_params.get("flagged") == "1"
        jobs = await run_in_threadpool(jobs_to_review, self.db, self.settings.results_dir, user=user,
                                       limit=self.settings.feedback.recent_jobs, flagged_only=flagged_only)
        switch = ('<a href="/">all recent</a>' if flagged_only else '<a href="/?flagged=1">flagged only</a>')
        body = "".join(_job_section(request, job, flagged_only) for job in jobs) or \
            "<p>No finished analyses to review.</p>"
        return _page("dicom-node feedback", f"""<header><h1>AI findings to review</h1>{switch}
<span>logged in as {escape(user)}</span><form method=post action=/logout>{_csrf_field(request)}
<button>Log out</button></form></header>
<p class=notice>AI results, not for diagnosis. Agree or disagree with each finding; a reason helps.</p>
{body}""")

    async def overlay(self, request: Request) -> Response:
        if self.user(request) is None:
            return PlainTextResponse("Log in first.", status_code=401, headers=HEADERS)
        params = request.path_params
        try:
            png = await run_in_threadpool(overlay_png, self.db, self.settings.results_dir, job_id=params["job_id"],
                                          sop_uid=params["sop_uid"], pipeline=params["pipeline"])
        except FeedbackError:
            return PlainTextResponse("No such overlay.", status_code=404, headers=HEADERS)
        return Response(png, media_type="image/png", headers=HEADERS)

    async def feedback(self, request: Request) -> Response:
        user = self.user(request)
        if user is None:
            return RedirectResponse("/login", status_code=303)
        form = await request.form()
        if not _csrf_valid(request, form):
            return _page("Form expired", '<p class=error>The form expired; <a href="/">reload the page</a>.</p>', 403)
        try:
            job_id = int(str(form.get("job", "")))
            await run_in_threadpool(
                record_verdict, self.db, self.audit, self.settings.results_dir, job_id=job_id,
                finding=str(form.get("finding", "")), verdict=str(form.get("verdict", "")), user=user,
                reason=str(form.get("reason", "")), sop_uid=str(form.get("instance", "")) or None,
                remote=request.client.host if request.client else None)
        except (NodeError, ValueError):
            return _page("Not recorded", '<p class=error>That verdict could not be recorded (unknown job, '
                         f'instance or finding, or a reason over {MAX_REASON} characters). '
                         '<a href="/">Back</a></p>', 400)
        query = "?" + urlencode({"flagged": "1"}) if form.get("flagged") == "1" else ""
        return RedirectResponse(f"/{query}#job-{job_id}", status_code=303)

    async def style(self, request: Request) -> Response:
        return Response(STYLE, media_type="text/css", headers=HEADERS)

    async def no_icon(self, request: Request) -> Response:
        return Response(status_code=204, headers=HEADERS)


def create_app(settings: Settings, db: NodeDatabase, audit: AuditTrail) -> ASGIApp:
    """Return the feedback page as an ASGI app, behind the address gate and the session cookie."""
    page = FeedbackApp(settings, db, audit)
    routes = [
        Route("/", page.index), Route("/style.css", page.style), Route("/favicon.ico", page.no_icon),
        Route("/login", page.login_form, methods=["GET"]), Route("/login", page.login, methods=["POST"]),
        Route("/logout", page.logout, methods=["POST"]), Route("/feedback", page.feedback, methods=["POST"]),
        Route("/overlay/{job_id:int}/{sop_uid}/{pipeline}.png", page.overlay),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(
        SessionMiddleware, secret_key=session_key(settings), session_cookie=COOKIE,
        max_age=int(settings.feedback.session_hours * 3600), same_site="strict",
        https_only=settings.feedback.tls is not None)])
    return AddressGate(app, list(settings.feedback.allowed_networks))


class FeedbackServer:
    """The page served by uvicorn in a thread of ``serve``."""

    def __init__(self, settings: Settings, db: NodeDatabase, audit: AuditTrail) -> None:
        feedback = settings.feedback
        tls = feedback.tls
        self.url = f"{'https' if tls else 'http'}://{feedback.host}:{feedback.port}"
        self.server = uvicorn.Server(uvicorn.Config(
            create_app(settings, db, audit), host=feedback.host, port=feedback.port, lifespan="off",
            ssl_certfile=str(tls.certificate) if tls else None, ssl_keyfile=str(tls.private_key) if tls else None,
            proxy_headers=False, server_header=False, access_log=False, log_config=None))
        self.thread = threading.Thread(target=self.server.run, name="feedback-page", daemon=True)
        self.networks = feedback.allowed_networks

    def start(self, timeout: float = 30.0) -> None:
        """Listen; raises :class:`PortInUseError` when the page cannot."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise PortInUseError(f"the feedback page cannot listen on {self.url}")
            time.sleep(0.05)
        reach = ", ".join(str(n) for n in self.networks) if self.networks else "loopback only"
        logger.info("Feedback page on %s (clients: %s)", self.url, reach)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
