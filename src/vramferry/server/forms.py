"""Request bodies that come as JSON or as ``multipart/form-data`` (OpenAI's edits and videos routes take both).

A form's fields are strings. A field whose type takes no string (a number, an object such as ``lora``) is read as
JSON text (``"2"`` is the integer 2, ``'{"style": 0.8}'`` an object); then the same pydantic model as for a JSON
body validates them, as strictly. Files are read into memory: the route's body limit bounds them.
"""

from __future__ import annotations

import json
import types
from typing import Annotated, Any, Union, get_args, get_origin

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .answers import CLIENT_CLOSED, APIError, invalid

MAX_FORM_FIELDS = 64


def _gone() -> APIError:
    return APIError(
        CLIENT_CLOSED, "the client closed the connection", type="invalid_request_error", code="client_closed"
    )


def _errors(exc: ValidationError) -> RequestValidationError:
    return RequestValidationError(exc.errors(include_url=False, include_context=False, include_input=False))


async def read_body(
    request: Request, model: type[BaseModel], files: dict[str, tuple[str, ...]]
) -> tuple[Any, dict[str, bytes]]:
    """The body of ``request`` validated by ``model``, and its uploaded files.

    Args:
        files: the file fields, each with the names a client may send it under (``("image", "image[]")``); a JSON
            body has none.

    Returns:
        ``(body, {field: bytes})``, with only the files sent.

    Raises:
        RequestValidationError: a field fails ``model`` (answered 400, naming it).
        APIError: a body that is neither valid JSON nor valid multipart, a file sent twice or as text.
    """
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        return await _read_form(request, model, files)
    if kind not in ("application/json", ""):
        raise APIError(
            415,
            f"Content-Type {kind!r} is not served here: send application/json or multipart/form-data",
            type="invalid_request_error",
            code="unsupported_media_type",
        )
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise _gone() from None
    try:
        return model.model_validate_json(raw or b"{}"), {}
    except ValidationError as exc:
        raise _errors(exc) from None


async def _read_form(
    request: Request, model: type[BaseModel], files: dict[str, tuple[str, ...]]
) -> tuple[Any, dict[str, bytes]]:
    try:
        form = await request.form(max_files=len(files) + 1, max_fields=MAX_FORM_FIELDS)
    except ClientDisconnect:
        raise _gone() from None
    except StarletteHTTPException as exc:
        if exc.status_code != 400 or exc.__cause__ is not None:
            raise  # the body limit (413), a client that left
        raise invalid(f"request body: not valid multipart/form-data ({exc.detail})", None) from None
    fields: dict[str, Any] = {}
    uploads: dict[str, bytes] = {}
    aliases = {alias: name for name, names in files.items() for alias in names}
    try:
        for key, value in form.multi_items():
            name = aliases.get(key, key)
            if name in fields or name in uploads:
                raise invalid(f"{name}: sent more than once; send one", name)
            if name in files:
                if not isinstance(value, UploadFile):
                    raise invalid(f"{name}: must be a file upload, not a text field", name)
                uploads[name] = await value.read()
            elif isinstance(value, UploadFile):
                raise invalid(f"{key}: a file was sent where text is expected", key)
            else:
                fields[name] = _field(model, name, value)
    finally:
        await form.close()
    try:
        return model.model_validate(fields), uploads
    except ValidationError as exc:
        raise _errors(exc) from None


def _takes_text(annotation: Any) -> bool:
    """Whether a field of this type takes a string (``str``, ``str | None``, ``Annotated[str, ...]``)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _takes_text(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return any(_takes_text(arg) for arg in get_args(annotation))
    return annotation is str


def _field(model: type[BaseModel], name: str, value: str) -> Any:
    field = model.model_fields.get(name)
    if field is None or _takes_text(field.annotation):
        return value  # text, or an unknown field (which the model names)
    try:
        return json.loads(value)
    except ValueError:
        return value  # the model names the field and its type
