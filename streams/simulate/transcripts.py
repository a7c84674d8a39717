"""Recorded transcripts in, turn events out: the OpenAI chat format as ctxflow's contract sees it.

One session per JSONL line: ``{"session_id": str, "messages": [...]}``, messages in OpenAI chat format
(``role`` system/user/assistant/tool, ``content``, ``tool_calls`` [{``id``, ``type``, ``function``: {``name``,
``arguments``}}], ``tool_call_id``). Message ``i`` becomes the turn with ``seq = i`` and ``item_id = str(i)``:
the system prompt in the system slot, everything else in history; an assistant message that calls tools is a
``tool_call`` item naming every id it issued, a tool message a ``tool_result`` naming the id it answers (ids
may repeat in a session: the planner pairs a result with the nearest earlier call that issued its id).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ctxflow.schemas.models import ItemKind, Role, Slot, TurnEvent

#: When a simulated session starts; message i is stamped i seconds later (event time drives nothing else).
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
_ROLES = {"system": Role.SYSTEM, "developer": Role.SYSTEM, "user": Role.USER, "assistant": Role.ASSISTANT,
          "tool": Role.TOOL, "function": Role.TOOL}


class TranscriptError(ValueError):
    """A transcript line or message that is not in the documented format (says where and what to fix)."""


@dataclass(frozen=True, slots=True)
class Session:
    """One recorded session: its id and messages, as read."""

    session_id: str
    messages: list[dict[str, Any]]


def read_sessions(lines: Iterator[str] | list[str], source: str = "transcripts") -> Iterator[Session]:
    """Parse JSONL lines (blank lines skipped); raises :class:`TranscriptError` naming the line."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise TranscriptError(f"{source}:{number}: not JSON ({error.msg}); one session object per line") from None
        yield as_session(value, f"{source}:{number}")


def as_session(value: Any, where: str = "session") -> Session:
    """Validate one session object."""
    if not isinstance(value, dict) or not isinstance(value.get("messages"), list):
        raise TranscriptError(f'{where}: expected {{"session_id": str, "messages": [...]}}')
    session_id = value.get("session_id")
    if not isinstance(session_id, str) or not session_id:
        raise TranscriptError(f"{where}: session_id must be a non-empty string")
    for i, message in enumerate(value["messages"]):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise TranscriptError(f"{where}: message {i} needs a role of system, user, assistant or tool")
    return Session(session_id, value["messages"])


def text_of(message: dict[str, Any]) -> str:
    """What the model reads of a message: its content (text parts joined) and its tool calls."""
    content = message.get("content")
    if isinstance(content, list):  # content parts: keep the text ones
        content = "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    text = content if isinstance(content, str) else ""
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        text += f"\n{function.get('name', '')}({function.get('arguments', '')})"
    return text


def turns_of(session: Session, tenant_id: str, model: str) -> Iterator[TurnEvent]:
    """The session's messages as turn events of one run (run id = session id)."""
    for i, message in enumerate(session.messages):
        role = _ROLES[message["role"]]
        calls = [str(c.get("id")) for c in message.get("tool_calls") or [] if c.get("id")]
        if role is Role.TOOL:
            kind = ItemKind.TOOL_RESULT
        elif calls:
            kind = ItemKind.TOOL_CALL
        else:
            kind = ItemKind.MESSAGE
        answered = message.get("tool_call_id")
        yield TurnEvent(
            event_id=f"{session.session_id}:{i}", tenant_id=tenant_id, user_id="simulated",
            session_id=session.session_id, run_id=session.session_id, agent_id="simulated", seq=i, role=role,
            kind=kind, slot=Slot.SYSTEM if role is Role.SYSTEM else Slot.HISTORY, item_id=str(i),
            content=text_of(message), model=model, occurred_at=EPOCH + timedelta(seconds=i),
            tool_call_id=str(answered) if role is Role.TOOL and answered else (calls[0] if calls else None),
            tool_call_ids=calls,
        )
