"""Mailer services: queue an email, send it, resend it, record what the provider reports.

Views, the admin, tasks and other apps call these; none of them builds or sends a message itself.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email import encoders
from email.message import MIMEPart
from email.mime.base import MIMEBase
from typing import Any

import django
from django.conf import settings
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.core.files import File
from django.core.files.base import ContentFile
from django.core.mail import EmailMultiAlternatives
from django.core.serializers.json import DjangoJSONEncoder
from django.core.validators import validate_email
from django.db import Error as DatabaseError
from django.db import connections, router, transaction
from django.db.models import Exists, F, OuterRef, QuerySet
from django.utils import timezone

from jobs.context import get_request_id
from jobs.exceptions import RetryLater, TransientError
from jobs.publish import enqueue
from mailer import backend, rendering
from mailer.exceptions import EmailRefused
from mailer.models import Email, EmailAttachment

logger = logging.getLogger("mailer")

_NEWLINE = re.compile(r"[\r\n]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTENT_ID = re.compile(r"[A-Za-z0-9._@-]{1,100}")
# The first bytes a file of each type must start with; a type not listed is not sniffed.
_SIGNATURES: dict[str, tuple[bytes, ...]] = {
    "application/pdf": (b"%PDF-",),
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
}


@dataclass(frozen=True)
class Attachment:
    """A file to send with an email. `content_id` makes it an inline image the HTML part shows
    with `<img src="cid:<content_id>">`."""

    filename: str
    content: bytes
    content_type: str | None = None
    content_id: str = ""


class HandOffInProgress(RetryLater):
    """Another attempt is handing this email to the backend right now: try again when its lease
    ends (a postponement: it uses none of the retry budget, so the waiting copy can never give up
    before the attempt it waits for has had its whole lease)."""


class SentNotRecorded(TransientError):
    """The backend took the email but the database would not record it; the fact is kept in the
    cache and the next attempt records it without sending again."""


# --- queueing ---------------------------------------------------------------------------------


def email_queue(
    *,
    template: str,
    to: Sequence[str],
    context: dict[str, Any],
    attachments: Iterable[Attachment | File] = (),
    request_id: str | None = None,
) -> Email:
    """Validates, renders and stores an email, and queues it to be sent once the current
    transaction commits. The task message carries only the email's id.

    Raises `EmailRefused` (a `ValidationError`) with a readable message and a `code`:
    `unknown_template`, `invalid_address`, `header_injection`, `too_many_recipients`,
    `invalid_context`, `too_many_attachments`, `attachment_too_large`,
    `attachment_type_not_allowed`, `invalid_attachment`. Nothing is stored or queued then.
    """
    if not rendering.template_exists(template):
        raise EmailRefused(f"unknown email template {template!r}", code="unknown_template", field="template")
    recipients = _clean_recipients(to)
    if not isinstance(context, dict) or not all(isinstance(key, str) for key in context):
        raise EmailRefused("context must be an object with string keys", code="invalid_context", field="context")
    try:
        json.dumps(context, cls=DjangoJSONEncoder)
    except (TypeError, ValueError) as exc:
        message = f"context cannot be stored as JSON: {exc}"
        raise EmailRefused(message, code="invalid_context", field="context") from None
    files = _clean_attachments(attachments)
    missing = sorted(rendering.required_context(template) - set(context))
    if missing:
        needed = ", ".join(missing)
        message = f"the template {template!r} needs {needed} in its context"
        raise EmailRefused(message, code="missing_context", field=f"context.{missing[0]}")
    rendered = rendering.render(template, context)
    if _NEWLINE.search(rendered.subject):
        raise EmailRefused("the subject must be one line", code="header_injection", field="context")
    if len(rendered.subject) > Email._meta.get_field("subject").max_length:
        raise EmailRefused("the subject is longer than 998 characters", code="invalid_context", field="context")

    stored: list[EmailAttachment] = []
    try:
        email = _store(template, recipients, context, rendered, request_id, files, stored)
    except BaseException:
        for attachment in stored:  # the rows rolled back; do not leave their files behind
            attachment.file.storage.delete(attachment.file.name)
        raise
    logger.info(
        "email.queued",
        extra={"email_id": email.pk, "template": template, "recipients": len(recipients), "attachments": len(files)},
    )
    return email


def _store(
    template: str,
    recipients: list[str],
    context: dict[str, Any],
    rendered: rendering.Rendered,
    request_id: str | None,
    files: list[Attachment],
    stored: list[EmailAttachment],
) -> Email:
    with transaction.atomic():
        email = Email.objects.create(
            to=recipients,
            from_email=settings.DEFAULT_FROM_EMAIL,
            template=template,
            context=context,
            subject=rendered.subject,
            body_text=rendered.text,
            body_html=rendered.html,
            request_id=(request_id or get_request_id() or "")[:128],
        )
        for item in files:
            attachment = EmailAttachment(
                email=email,
                filename=item.filename,
                content_type=item.content_type or "",
                size=len(item.content),
                content_id=item.content_id,
            )
            attachment.file.save(item.filename, ContentFile(item.content), save=False)
            stored.append(attachment)
            attachment.save()
        _enqueue_on_commit(email)
    return email


def _enqueue_on_commit(email: Email) -> None:
    from mailer.tasks import send_email

    enqueue(send_email, args=[email.pk], request_id=email.request_id or None)


def _clean_recipients(to: Sequence[str]) -> list[str]:
    if isinstance(to, str) or not isinstance(to, Sequence) or not to:
        raise EmailRefused("to must be a non-empty list of addresses", code="invalid_address", field="to")
    limit = settings.MAILER_MAX_RECIPIENTS
    if len(to) > limit:
        raise EmailRefused(f"at most {limit} recipients per email", code="too_many_recipients", field="to")
    cleaned = []
    for address in to:
        if not isinstance(address, str):
            raise EmailRefused("every recipient must be a string", code="invalid_address", field="to")
        if _NEWLINE.search(address):
            raise EmailRefused("a recipient contains a line break", code="header_injection", field="to")
        address = address.strip()
        name, _, addr_spec = address.rpartition("<") if address.endswith(">") else ("", "", address)
        addr_spec = addr_spec.removesuffix(">") if name or address.startswith("<") else addr_spec
        try:
            if _CONTROL.search(address) or any(char in name for char in "<>"):
                raise ValidationError("malformed")
            validate_email(addr_spec)
        except ValidationError:
            raise EmailRefused(f"invalid email address {address!r}", code="invalid_address", field="to") from None
        cleaned.append(address)
    return cleaned


def _clean_attachments(attachments: Iterable[Attachment | File]) -> list[Attachment]:
    items = [_as_attachment(item) for item in attachments or ()]
    if len(items) > settings.MAILER_MAX_ATTACHMENTS:
        raise EmailRefused(
            f"at most {settings.MAILER_MAX_ATTACHMENTS} attachments per email",
            code="too_many_attachments",
            field="attachments",
        )
    total = 0
    allowed = {kind.lower() for kind in settings.MAILER_ATTACHMENT_CONTENT_TYPES}
    for item in items:
        name = item.filename
        if not name or len(name) > 255 or _CONTROL.search(name) or "/" in name or "\\" in name or name in {".", ".."}:
            raise EmailRefused(f"invalid attachment name {name!r}", code="invalid_attachment", field="attachments")
        if item.content_id and not _CONTENT_ID.fullmatch(item.content_id):
            raise EmailRefused(
                f"invalid content id {item.content_id!r}", code="invalid_attachment", field="attachments"
            )
        size = len(item.content)
        if size > settings.MAILER_MAX_ATTACHMENT_BYTES:
            raise EmailRefused(
                f"attachment {name!r} is {size} bytes; the limit is {settings.MAILER_MAX_ATTACHMENT_BYTES}",
                code="attachment_too_large",
                field="attachments",
            )
        total += size
        kind = (item.content_type or "").lower()
        if kind not in allowed:
            raise EmailRefused(
                f"attachment {name!r} has a content type that is not allowed: {kind or 'unknown'}",
                code="attachment_type_not_allowed",
                field="attachments",
            )
        if not _content_matches(kind, item.content):
            raise EmailRefused(
                f"attachment {name!r} is not a {kind} file",
                code="attachment_type_not_allowed",
                field="attachments",
            )
        if item.content_id and not kind.startswith("image/"):
            raise EmailRefused(
                f"inline attachment {name!r} must be an image", code="invalid_attachment", field="attachments"
            )
    if total > settings.MAILER_MAX_TOTAL_ATTACHMENT_BYTES:
        raise EmailRefused(
            f"attachments total {total} bytes; the limit is {settings.MAILER_MAX_TOTAL_ATTACHMENT_BYTES}",
            code="attachment_too_large",
            field="attachments",
        )
    return items


def _as_attachment(item: Attachment | File) -> Attachment:
    if isinstance(item, Attachment):
        declared = item.content_type
        content = item.content
        if not isinstance(content, bytes):
            raise EmailRefused("attachment content must be bytes", code="invalid_attachment", field="attachments")
        filename, content_id = item.filename, item.content_id
    elif isinstance(item, File):  # an upload, or a file opened from storage
        limit = settings.MAILER_MAX_ATTACHMENT_BYTES
        if item.size is not None and item.size > limit:
            raise EmailRefused(
                f"attachment {item.name!r} is {item.size} bytes; the limit is {limit}",
                code="attachment_too_large",
                field="attachments",
            )
        item.seek(0)
        content = item.read(limit + 1)
        declared = getattr(item, "content_type", None)
        filename, content_id = (item.name or "").rsplit("/", 1)[-1], ""
    else:
        raise EmailRefused(
            "an attachment must be a mailer.services.Attachment or a Django File",
            code="invalid_attachment",
            field="attachments",
        )
    kind = (declared or mimetypes.guess_type(filename)[0] or "").split(";")[0].strip().lower()
    return Attachment(filename=filename, content=content, content_type=kind, content_id=content_id)


def _content_matches(kind: str, content: bytes) -> bool:
    """Whether the bytes look like the declared type, so an executable cannot pass for a PDF."""
    if kind in _SIGNATURES:
        return content.startswith(_SIGNATURES[kind])
    if kind == "image/webp":
        return content[:4] == b"RIFF" and content[8:12] == b"WEBP"
    if kind.startswith("text/"):
        try:
            content.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return b"\x00" not in content
    return True


# --- sending ----------------------------------------------------------------------------------


def _sending_lease() -> timedelta:
    seconds = settings.MAILER_SENDING_LEASE_SECONDS or (settings.CELERY_TASK_TIME_LIMIT + settings.EMAIL_TIMEOUT)
    return timedelta(seconds=seconds)


def email_send(*, email: Email | int, attempt: str = "") -> Email:
    """Hands the email (`email`, or its id) to the configured backend, at most once per successful
    hand-off. Raises `Email.DoesNotExist` when there is no such email.

    1. Claim: one conditional UPDATE moves the email to `sending` and counts the attempt, only
       if it is `queued` or `failed` (or `sending` for longer than the lease, meaning the attempt
       that claimed it died mid hand-off), and returns what the message is built from. An email
       already `sent` is left alone; one claimed by an attempt still running raises
       `HandOffInProgress` (retried when the lease ends).
    2. Send, with the email's stable Message-ID header.
    3. Record: `sent`, when, and the provider's message id. If the send raised, the email goes
       back to `queued` with the error, and the error is raised for the task to classify. If the
       database cannot record it, the hand-off is kept in the cache and `SentNotRecorded` raised:
       the next attempt records it and sends nothing.

    A worker lost between 2 and 3 leaves the email in `sending`; after the lease (or at once, when
    the worker's main process saw its pool process die: `email_release`) it is sent again with the
    same Message-ID, as an SMTP client must do when the server's final reply never came.
    `attempt` (the run's token, `JobTask.run_token()`: the job and the process running it) names
    the claim's holder.

    The common case, a queued email sent at its first attempt, costs one cache read and two
    statements: the claim (which returns the row) and the record (a mail queue drains hundreds
    of these a second). The cache is read first, always: a hand-off it remembers is recorded, never
    repeated, even when the database lost the claim that preceded it (a failover to a replica
    that lagged behind).
    """
    email_id = email if isinstance(email, int) else email.pk
    handed_off = _handed_off(email_id)
    if handed_off is not None:  # an earlier attempt sent it; only the record was missing
        return _record_late(Email.objects.get(pk=email_id), handed_off)
    now = timezone.now()
    claimed = _claim(email_id, attempt, now, stale_after=None)
    if claimed is None:
        lease = _sending_lease()
        claimed = _claim(email_id, attempt, now, stale_after=lease)
        if claimed is not None:
            logger.warning("email.handoff_unconfirmed", extra={"email_id": email_id})
        else:
            current = Email.objects.get(pk=email_id)  # raises DoesNotExist for an email gone
            if current.status == Email.Status.SENDING:
                ends = (current.handed_off_at or now) + lease
                raise HandOffInProgress(
                    f"email {email_id} is being handed off by another attempt",
                    retry_after=(ends - timezone.now()).total_seconds() + 1,
                )
            logger.info("email.already_sent", extra={"email_id": email_id, "status": current.status})
            return current
    try:
        message = _build_message(claimed)
    except Exception as exc:
        # Claimed, nothing handed off (the database cut right after the claim, an attachment
        # gone): give the claim back now, else the job's retries wait out the whole lease.
        _undo_claim(email_id, attempt, f"{type(exc).__name__}: {exc}"[:2000])
        raise
    return _hand_off(claimed, message)


# What the claim returns: everything `_build_message` and the caller read, in the model's field
# order (which `Model.from_db` expects).
_CLAIM_RETURNS = tuple(
    field.attname
    for field in Email._meta.concrete_fields
    if field.attname
    in {
        "id",
        "to",
        "from_email",
        "subject",
        "body_text",
        "body_html",
        "message_id",
        "attempts",
        "status",
        "claimed_by",
        "handed_off_at",
        "created_at",
        "template",
        "request_id",
    }
)


def _claim(email_id: int, attempt: str, now: datetime, *, stale_after: timedelta | None) -> Email | None:
    """Takes the email for this attempt: from `queued` or `failed`, or (with `stale_after`) from
    a `sending` claim older than that. Returns the claimed row, or None when it was not claimable.
    One UPDATE ... RETURNING: the claim and the read are one statement.

    On PostgreSQL the claim's time and its age are the database's (`STATEMENT_TIMESTAMP()`), so
    workers whose clocks disagree still agree on whose claim has lapsed; elsewhere (SQLite: one
    host) this process's `now`."""
    db = router.db_for_write(Email)
    connection = connections[db]
    if connection.vendor not in RETURNING_VENDORS:
        stale_before = None if stale_after is None else now - stale_after
        return _claim_then_read(db, email_id, attempt, now, stale_before=stale_before)
    ops = connection.ops
    quote = ops.quote_name
    table = quote(Email._meta.db_table)
    attachments = EmailAttachment._meta
    database_time = connection.vendor == "postgresql"
    stamp_sql = "STATEMENT_TIMESTAMP()" if database_time else "%s"
    if stale_after is None:
        where, where_params = f"{quote('status')} IN (%s, %s)", [Email.Status.QUEUED, Email.Status.FAILED]
    elif database_time:
        where = f"{quote('status')} = %s AND {quote('handed_off_at')} < STATEMENT_TIMESTAMP() - %s"
        where_params = [Email.Status.SENDING, stale_after]
    else:
        where = f"{quote('status')} = %s AND {quote('handed_off_at')} < %s"
        where_params = [Email.Status.SENDING, ops.adapt_datetimefield_value(now - stale_after)]
    returning = ", ".join(quote(Email._meta.get_field(name).column) for name in _CLAIM_RETURNS)
    # Names from the model's metadata; every value is a parameter.
    sql = (
        f"UPDATE {table} SET {quote('status')} = %s, {quote('attempts')} = {quote('attempts')} + 1, "  # noqa: S608
        f"{quote('handed_off_at')} = {stamp_sql}, {quote('updated_at')} = {stamp_sql}, {quote('claimed_by')} = %s "
        f"WHERE {quote('id')} = %s AND {where} "
        f"RETURNING {returning}, EXISTS (SELECT 1 FROM {quote(attachments.db_table)} "
        f"WHERE {quote(attachments.get_field('email').column)} = {table}.{quote('id')}) AS has_attachments"
    )
    stamps = [] if database_time else [ops.adapt_datetimefield_value(now)] * 2
    params = [Email.Status.SENDING, *stamps, attempt[:64], email_id, *where_params]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    if row is None:
        return None
    values = [convert(value) for convert, value in zip(_converters(connection), row, strict=True)]
    email = Email.from_db(db, _CLAIM_RETURNS, values[: len(_CLAIM_RETURNS)])
    email.has_attachments = values[-1]
    return email


#: Databases whose UPDATE returns rows (SQLite from 3.35); MySQL and MariaDB claim, then read.
RETURNING_VENDORS = {"postgresql", "sqlite"}


def _claim_then_read(
    db: str, email_id: int, attempt: str, now: datetime, *, stale_before: datetime | None
) -> Email | None:
    """`_claim` in two statements, for databases without UPDATE ... RETURNING."""
    if stale_before is None:
        claimable = {"status__in": [Email.Status.QUEUED, Email.Status.FAILED]}
    else:
        claimable = {"status": Email.Status.SENDING, "handed_off_at__lt": stale_before}
    claim = {
        "status": Email.Status.SENDING,
        "attempts": F("attempts") + 1,
        "handed_off_at": now,
        "updated_at": now,
        "claimed_by": attempt[:64],
    }
    if not Email.objects.using(db).filter(pk=email_id, **claimable).update(**claim):
        return None
    has_attachments = Exists(EmailAttachment.objects.filter(email=OuterRef("pk")))
    return Email.objects.using(db).annotate(has_attachments=has_attachments).get(pk=email_id)


def _converters(connection: Any) -> list[Callable[[Any], Any]]:
    """What the ORM applies to each column `_claim` returns (JSON text to lists, SQLite's
    datetime text to aware datetimes), composed once per connection object (per thread)."""
    cached = getattr(connection, "_mailer_claim_converters", None)
    if cached is not None:
        return cached
    converters: list[Callable[[Any], Any]] = []
    for name in _CLAIM_RETURNS:
        column = Email._meta.get_field(name).get_col(Email._meta.db_table)
        steps = connection.ops.get_db_converters(column) + column.field.get_db_converters(connection)

        def convert(value: Any, steps: list = steps, column: Any = column) -> Any:
            for step in steps:
                value = step(value, column, connection)
            return value

        converters.append(convert)
    converters.append(bool)  # has_attachments: 0/1 on SQLite
    connection._mailer_claim_converters = converters
    return converters


def _record_late(email: Email, provider_id: str) -> Email:
    _record_sent(email, provider_id)
    _forget_handed_off(email.pk)
    logger.info("email.sent_recorded_late", extra={"email_id": email.pk})
    return email


def _hand_off(email: Email, message: EmailMultiAlternatives) -> Email:
    """Sends the email this attempt has claimed, and records it sent."""
    try:
        backend.deliver(message)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:2000]
        _undo_claim(email.pk, email.claimed_by, error)
        logger.warning("email.send_failed", extra={"email_id": email.pk, "attempt": email.attempts, "error": error})
        raise
    provider_id = _provider_message_id(message)
    try:
        _record_sent(email, provider_id)
    except DatabaseError as exc:
        _keep_handed_off(email.pk, provider_id)
        raise SentNotRecorded(f"email {email.pk} was sent but not recorded: {type(exc).__name__}") from exc
    logger.info(
        "email.sent",
        extra={"email_id": email.pk, "attempt": email.attempts, "provider_message_id": provider_id or None},
    )
    return email


def _undo_claim(email_id: int, attempt: str, error: str) -> None:
    """Back to `queued` the email this attempt claimed and did not hand off (on a new connection
    if need be: the database may just have cut this one). Failing that, the lease ends the claim."""
    from jobs.db import with_fresh_connection

    def undo() -> None:
        Email.objects.filter(pk=email_id, status=Email.Status.SENDING, claimed_by=attempt[:64]).update(
            status=Email.Status.QUEUED, claimed_by="", last_error=error, updated_at=timezone.now()
        )

    try:
        with_fresh_connection(undo, what="email_undo_claim")
    except DatabaseError:
        logger.warning("email.claim_not_undone", extra={"email_id": email_id}, exc_info=True)


HANDED_OFF_KEY = "mailer:handed-off:{}"


def _handed_off(email_id: int) -> str | None:
    try:
        return cache.get(HANDED_OFF_KEY.format(email_id))
    except Exception:  # noqa: BLE001 - no cache: nothing known, the database decides
        return None


def _keep_handed_off(email_id: int, provider_id: str) -> None:
    try:
        cache.set(HANDED_OFF_KEY.format(email_id), provider_id, timeout=7 * 24 * 3600)
    except Exception:
        logger.exception("email.handoff_not_kept", extra={"email_id": email_id})


def _forget_handed_off(email_id: int) -> None:
    try:
        cache.delete(HANDED_OFF_KEY.format(email_id))
    except Exception:  # noqa: BLE001 - it only says to record `sent`, which is done
        logger.warning("email.handoff_not_forgotten", extra={"email_id": email_id})


def _record_sent(email: Email, provider_id: str, tries: int = 5) -> None:
    """Marks the email sent. The message is out: a database hiccup here must not turn into a retry
    that sends it again, so the write is tried a few times, each on a new connection when the
    last one died (a database restart cuts every connection)."""
    from jobs.db import with_fresh_connection

    done = timezone.now()
    fields = {
        "status": Email.Status.SENT,
        "sent_at": done,
        "provider_message_id": provider_id,
        "last_error": "",
        "updated_at": done,
    }

    db = router.db_for_write(Email)
    ops = connections[db].ops
    assignments = ", ".join(f"{ops.quote_name(name)} = %s" for name in fields)
    table = ops.quote_name(Email._meta.db_table)
    sql = f"UPDATE {table} SET {assignments} WHERE {ops.quote_name('id')} = %s"  # noqa: S608 - values are parameters
    params = [ops.adapt_datetimefield_value(v) if isinstance(v, datetime) else v for v in fields.values()]

    def record() -> None:  # the SQL of `Email.objects.filter(pk=...).update(**fields)`, built once
        with connections[db].cursor() as cursor:
            cursor.execute(sql, [*params, email.pk])

    try:
        with_fresh_connection(record, what="email_record_sent", attempts=tries)
    except DatabaseError:
        logger.exception("email.sent_unrecorded", extra={"email_id": email.pk})
        raise
    for name, value in fields.items():
        setattr(email, name, value)


class _Message(EmailMultiAlternatives):
    """Django's message, with each multipart boundary a fresh UUID: the standard library's
    generator otherwise makes a random one and compiles a regular expression for every message to
    check that no line of the text contains it (a fifth of a worker's time per email). A 128-bit
    random boundary cannot collide with text that was written before it existed.

    With an inline image (`related`), the outer multipart/mixed becomes multipart/related: what the
    undocumented `mixed_subtype = "related"` did, which Django 6.0 refuses (AttributeError)."""

    related = False

    def message(self, *args: Any, **kwargs: Any) -> Any:
        built = super().message(*args, **kwargs)
        if self.related and built.get_content_type() == "multipart/mixed":
            built.set_type("multipart/related")
        for part in built.walk():
            if part.is_multipart() and part.get_boundary() is None:
                part.set_boundary(f"=_{uuid.uuid4().hex}")
        return built


def _build_message(email: Email) -> EmailMultiAlternatives:
    message = _Message(
        subject=email.subject,
        body=email.body_text,
        from_email=email.from_email,
        to=list(email.to),
        headers={"Message-ID": email.message_id},
    )
    if email.body_html:
        message.attach_alternative(email.body_html, "text/html")
    inline = False
    has_attachments = getattr(email, "has_attachments", True)  # set by the claim
    for attachment in email.attachments.all() if has_attachments else ():
        with attachment.file.open("rb") as fh:
            content = fh.read()
        if attachment.content_id:
            message.attach(_inline_part(content, attachment.content_type, attachment.content_id, attachment.filename))
            inline = True
        else:
            message.attach(attachment.filename, content, attachment.content_type)
    message.related = inline
    return message


def _inline_part(content: bytes, content_type: str, content_id: str, filename: str) -> MIMEBase | MIMEPart:
    """An inline attachment: a MIMEPart from Django 6.0 on (which deprecates MIMEBase attachments;
    Django 5.2 accepts only MIMEBase)."""
    maintype, _, subtype = content_type.partition("/")
    if django.VERSION >= (6, 0):
        part = MIMEPart()
        part.set_content(content, maintype, subtype, disposition="inline", filename=filename, cid=f"<{content_id}>")
        return part
    legacy = MIMEBase(maintype, subtype)
    legacy.set_payload(content)
    encoders.encode_base64(legacy)
    legacy.add_header("Content-ID", f"<{content_id}>")
    legacy.add_header("Content-Disposition", "inline", filename=filename)
    return legacy


def _provider_message_id(message: EmailMultiAlternatives) -> str:
    status = getattr(message, "anymail_status", None)  # set by django-anymail backends
    message_id = getattr(status, "message_id", None)
    if isinstance(message_id, set):
        message_id = ",".join(sorted(str(item) for item in message_id if item))
    return str(message_id or "")[:255]


def email_release(*, email_id: int, attempt: str) -> bool:
    """The attempt `attempt` that claimed the email was stopped mid hand-off (its process died):
    the email goes back to `queued`, so the job's next attempt sends it without waiting for the
    lease. Only that attempt's claim is released. True when it was."""
    if not attempt:
        return False
    released = Email.objects.filter(pk=email_id, status=Email.Status.SENDING, claimed_by=attempt[:64]).update(
        status=Email.Status.QUEUED, claimed_by="", updated_at=timezone.now()
    )
    if released:
        logger.warning("email.handoff_interrupted", extra={"email_id": email_id})
    return bool(released)


def email_mark_failed(*, email_id: int, error: str, users_error: bool = False) -> bool:
    """Marks an email that will not be retried any more as `failed`; False when it is gone or was
    sent after all. `users_error`: it failed on what the user gave (an address refused for good),
    logged as a warning, not an error an operator must look at."""
    updated = Email.objects.filter(
        pk=email_id, status__in=[Email.Status.QUEUED, Email.Status.SENDING, Email.Status.FAILED]
    ).update(status=Email.Status.FAILED, last_error=error[:2000], updated_at=timezone.now())
    if updated:
        log = logger.warning if users_error else logger.error
        log("email.failed", extra={"email_id": email_id, "error": error[:500]})
    return bool(updated)


# --- resending --------------------------------------------------------------------------------


@dataclass
class ResendResult:
    requeued: list[int]  # failed emails queued again as they are
    copied: list[int]  # ids of the new copies of sent emails
    skipped: list[int]  # still queued or being sent

    @property
    def count(self) -> int:
        return len(self.requeued) + len(self.copied)


def emails_resend(*, emails: QuerySet[Email], actor: str) -> ResendResult:
    """Sends the selected emails again. A failed email is queued again as it is (same row, same
    Message-ID); a sent one is copied into a new email with a new Message-ID, because sending the
    same message twice on purpose is a new message. Queued and sending ones are skipped."""
    result = ResendResult(requeued=[], copied=[], skipped=[])
    with transaction.atomic():
        for email in emails.select_for_update().prefetch_related("attachments").order_by("pk"):
            if email.status == Email.Status.FAILED:
                Email.objects.filter(pk=email.pk).update(status=Email.Status.QUEUED, updated_at=timezone.now())
                _enqueue_on_commit(email)
                result.requeued.append(email.pk)
            elif email.status == Email.Status.SENT:
                copy = Email.objects.create(
                    to=email.to,
                    from_email=email.from_email,
                    template=email.template,
                    context=email.context,
                    subject=email.subject,
                    body_text=email.body_text,
                    body_html=email.body_html,
                    request_id=(get_request_id() or email.request_id)[:128],
                    resent_from=email,
                )
                EmailAttachment.objects.bulk_create(
                    EmailAttachment(
                        email=copy,
                        file=attachment.file.name,  # the stored file is shared, not copied
                        filename=attachment.filename,
                        content_type=attachment.content_type,
                        size=attachment.size,
                        content_id=attachment.content_id,
                    )
                    for attachment in email.attachments.all()
                )
                _enqueue_on_commit(copy)
                result.copied.append(copy.pk)
            else:
                result.skipped.append(email.pk)
    logger.info(
        "email.resent",
        extra={
            "requeued": len(result.requeued),
            "copied": len(result.copied),
            "skipped": len(result.skipped),
            "actor": actor,
        },
    )
    return result


# --- provider status ---------------------------------------------------------------------------

# A later event never replaces a graver one (events may arrive out of order).
_DELIVERY_RANK = {
    Email.DeliveryStatus.UNKNOWN: 0,
    Email.DeliveryStatus.DELIVERED: 1,
    Email.DeliveryStatus.BOUNCED: 2,
    Email.DeliveryStatus.COMPLAINED: 3,
}


def email_delivery_record(
    *, provider_message_id: str, delivery_status: str, at: datetime | None = None, detail: str = ""
) -> int:
    """Records a provider's report (delivered, bounced, complained) on the emails it sent with
    `provider_message_id`; returns how many emails changed."""
    status = Email.DeliveryStatus(delivery_status)
    if not provider_message_id:
        return 0
    lower = [value for value, rank in _DELIVERY_RANK.items() if rank < _DELIVERY_RANK[status]]
    changed = Email.objects.filter(provider_message_id=provider_message_id, delivery_status__in=lower).update(
        delivery_status=status,
        delivery_detail=detail[:2000],
        delivery_updated_at=at or timezone.now(),
        updated_at=timezone.now(),
    )
    logger.info(
        "email.delivery_status",
        extra={"provider_message_id": provider_message_id, "delivery_status": status.value, "changed": changed},
    )
    return changed


def emails_purge(*, older_than_days: int) -> int:
    """Deletes the emails sent more than `older_than_days` days ago, and their attachment files;
    returns how many emails went. Idempotent (a second run finds nothing to delete)."""
    if older_than_days < 1:
        raise ValueError("older_than_days must be at least 1")
    cutoff = timezone.now() - timedelta(days=older_than_days)
    old = Email.objects.filter(status=Email.Status.SENT, sent_at__lt=cutoff).order_by("pk")
    purged = 0
    while ids := list(old.values_list("pk", flat=True)[:500]):
        for attachment in EmailAttachment.objects.filter(email_id__in=ids):
            attachment.file.delete(save=False)  # the stored file; its row goes with its email
        purged += Email.objects.filter(pk__in=ids).delete()[1].get(Email._meta.label, 0)
    logger.info("email.purged", extra={"purged": purged, "older_than_days": older_than_days})
    return purged
