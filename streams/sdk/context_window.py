"""An agent's OpenAI-style message list kept in step with ctxflow's decisions about its run.

ctxflow's eviction planner decides which of a run's context items leave, shrink or come back, and publishes
those decisions (:class:`DecisionStream`); the agent applies them to the list it sends to the model::

    window = ContextWindow(run_id=ctx.run_id)
    window.add({"role": "system", "content": policy}, item_id=system_turn.item_id)
    window.add({"role": "user", "content": question}, item_id=user_turn.item_id)
    ...
    window.apply(decision)  # for each decision from client.decisions(tenant, run_id=ctx.run_id)
    reply = openai.chat.completions.create(model=model, messages=window.messages())

Item ids are the ``item_id`` the agent set on each ``TurnEvent``: a chat message carries no id, so the window
keeps them beside the messages. An assistant message that issues tool calls is one item (the planner's
``tool_call`` item, whose ``tool_call_ids`` list every id it issued); each tool result is one item.

What each decision kind does to the list:

- ``evict``: the named items leave for good (from the list, and from the offloaded store if they are there).
- ``offload``: the named items leave the list and wait in :attr:`ContextWindow.offloaded`.
- ``recall``: offloaded items come back at the tail, in the order the actions list them (the cached prompt
  prefix stays intact). An id that is not offloaded is skipped.
- ``mask``: a tool result keeps its place, role and ``tool_call_id``; its content becomes the placeholder in
  ``summary.text``. The planner names the placeholder of ``actions[0]`` only; any further action (or a mask with
  no text) gets the planner's placeholder format built from the item id and its tokens.
- ``swap``: the sources (the actions, and ``summary.source_ids``) present in the list are replaced by one
  message, placed where the earliest of them was, whose item id is ``summary.summary_id`` (a later decision may
  evict it or swap it into a depth-2 summary). The message has role ``assistant`` and content
  :data:`SUMMARY_PREFIX` + ``summary.text``: role ``user`` would read as if the user had said it, and
  ``system`` would give a lossy summary the authority of policy. Sources that are offloaded stay offloaded.
  A ``no_retention`` run's swap carries no text (``summary.text`` is null): the list is unchanged and the
  decision is not recorded as applied, so the agent may summarize the sources itself and call
  ``apply(decision, summary_text=...)``, or skip the swap (the planner already counts the summary's tokens
  instead of the sources', so skipping leaves the agent's context larger than ctxflow believes).
- ``stale_context``: a memory the run recalled (item id = memory id, as :meth:`CtxflowClient.recall` reports it)
  was revoked, superseded, quarantined or archived. Its items are *dropped* (from the list and the offloaded
  store), not marked: a stale memory left in the prompt keeps acting as truth, and a marker the model reads is
  no safer than its absence. What went stale, with its new status and replacement, is kept in
  :attr:`ContextWindow.stale` (also for ids the window did not hold), so the agent can recall the replacement
  (``decision.stale[i].replaced_by``) and tell the model what changed.
- ``compress`` (a summary was requested) and every other kind: no change.

Redelivery: decisions are delivered at least once (after a worker crash a decision can come again with the
same ``decision_id``). A decision id applied once changes nothing the second time; every kind is also
idempotent by its effect, so the same decision under another id, applied right after, changes nothing either.
Ids the window does not hold are skipped: a decision changes only what it can name.

The window is not thread-safe: apply decisions and read :meth:`~ContextWindow.messages` from one task.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from ctxflow.processors.eviction.planner import mask_placeholder
from ctxflow.schemas.models import Decision, DecisionKind, StaleMemory

#: The content prefix of a summary message, so the model reads it as a digest, not as something just said.
SUMMARY_PREFIX = "[summary of earlier context] "
#: The content prefix of a recalled memory's message (:meth:`ContextWindow.add_memory`).
MEMORY_PREFIX = "[recalled memory] "

_SYSTEM_ROLES = frozenset(("system", "developer"))
#: Keys that keep an assistant message worth sending once its tool calls are gone.
_PAYLOAD_KEYS = ("content", "refusal", "audio", "function_call")

Message = dict[str, Any]


class ContextWindow:
    """An agent's OpenAI-style message list kept in step with ctxflow's decisions.

    Guarantees: :meth:`messages` is always a list the chat API accepts as far as tool calls go (see there);
    the caller's dicts are never mutated, and nothing returned aliases the window's own state; a decision
    applied twice changes nothing the second time; ``len(messages())`` never exceeds the messages added.
    ``run_id``, when given, makes :meth:`apply` ignore decisions about any other run.
    """

    def __init__(self, run_id: str | None = None) -> None:
        self._run_id = run_id
        self._items: list[tuple[str, Message]] = []
        self._ids: set[str] = set()  # the ids in _items
        self._offloaded: dict[str, Message] = {}
        self._applied: set[str] = set()
        self._stale: dict[str, StaleMemory] = {}

    # ---- building ---------------------------------------------------------------------------------------------
    def add(self, message: Mapping[str, Any], item_id: str) -> None:
        """Append a copy of ``message`` (role system/developer/user/assistant/tool, content, tool_calls,
        tool_call_id...) as item ``item_id``. Raises ``ValueError`` when the message has no role or the id is
        empty or already held (in the list or offloaded)."""
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ValueError("a message is a mapping with a string 'role'")
        if not item_id:
            raise ValueError("item_id must be a non-empty string")
        if self.holds(item_id):
            raise ValueError(f"item {item_id!r} is already in the window (or offloaded)")
        self._items.append((item_id, copy.deepcopy(dict(message))))
        self._ids.add(item_id)

    def add_memory(self, memory_id: str, text: str) -> bool:
        """Append a recalled memory (item id = its memory id, as :meth:`CtxflowClient.recall` reports it) unless
        the window already holds it; True when added. The message has role ``assistant`` and content
        :data:`MEMORY_PREFIX` + ``text``, for the reasons a summary has (see the module docstring): a ``tool``
        message answers a tool call, and one without its call is dropped from :meth:`messages`."""
        if self.holds(memory_id):
            return False
        self.add({"role": "assistant", "content": MEMORY_PREFIX + text}, item_id=memory_id)
        return True

    def holds(self, item_id: str) -> bool:
        """Whether item ``item_id`` is in the window (in the list, or offloaded)."""
        return item_id in self._ids or item_id in self._offloaded

    # ---- decisions --------------------------------------------------------------------------------------------
    def apply(self, decision: Decision, summary_text: str | None = None) -> bool:
        """Apply one decision; True when the window (its list or its offloaded store) changed.

        ``summary_text`` stands in for a swap's null ``summary.text`` (a no-retention run whose agent
        summarized the sources itself); it is ignored when the decision carries text.
        """
        if decision.decision_id in self._applied:
            return False
        if self._run_id is not None and decision.run_id != self._run_id:
            return False
        ids = list(dict.fromkeys(a.item_id for a in decision.actions))
        kind = decision.kind
        if kind is DecisionKind.EVICT:
            changed = self._evict(set(ids))
        elif kind is DecisionKind.OFFLOAD:
            changed = self._offload(set(ids))
        elif kind is DecisionKind.RECALL:
            changed = self._recall(ids)
        elif kind is DecisionKind.MASK:
            changed = self._mask(decision)
        elif kind is DecisionKind.STALE_CONTEXT:
            for stale in decision.stale:
                self._stale[stale.memory_id] = stale
            changed = self._evict({stale.memory_id for stale in decision.stale})
        elif kind is DecisionKind.SWAP:
            text = decision.summary.text if decision.summary is not None else None
            if decision.summary is not None and text is None and summary_text is None:
                return False  # no-retention: wait for the agent's own summary (not recorded as applied)
            changed = self._swap(decision, ids, text if text is not None else summary_text)
        else:
            changed = False  # compress (informational), budget and admission kinds
        self._applied.add(decision.decision_id)
        return changed

    def _evict(self, ids: set[str]) -> bool:
        listed = bool(ids & self._ids)
        if listed:
            self._keep([(i, m) for i, m in self._items if i not in ids])
        dropped = [i for i in ids if self._offloaded.pop(i, None) is not None]
        return listed or bool(dropped)

    def _offload(self, ids: set[str]) -> bool:
        if not ids & self._ids:
            return False
        kept: list[tuple[str, Message]] = []
        for item_id, message in self._items:
            if item_id in ids:
                self._offloaded[item_id] = message
            else:
                kept.append((item_id, message))
        self._keep(kept)
        return True

    def _recall(self, ids: list[str]) -> bool:
        back = [(i, self._offloaded.pop(i)) for i in ids if i in self._offloaded]
        self._keep(self._items + back)
        return bool(back)

    def _mask(self, decision: Decision) -> bool:
        text = decision.summary.text if decision.summary is not None else None
        changed = False
        for n, action in enumerate(decision.actions):
            if action.item_id not in self._ids:
                continue
            placeholder = text if n == 0 and text is not None else mask_placeholder(action.item_id, action.tokens)
            for k, (item_id, message) in enumerate(self._items):
                if item_id == action.item_id and message.get("content") != placeholder:
                    self._items[k] = (item_id, {**message, "content": placeholder})
                    changed = True
        return changed

    def _swap(self, decision: Decision, ids: list[str], text: str | None) -> bool:
        summary = decision.summary
        if summary is None or text is None:
            return False  # a swap without provenance names no summary to put in
        sources = set(ids) | set(summary.source_ids)
        present = [k for k, (item_id, _) in enumerate(self._items) if item_id in sources]
        if not present:
            return False  # every source gone (or already swapped): a summary of nothing stays out
        sid = summary.summary_id
        # A copy of a swap applied before (another decision id) finds its summary held: it only removes sources.
        insert = not (sid in self._offloaded or (sid in self._ids and sid not in sources))
        items: list[tuple[str, Message]] = []
        for k, (item_id, message) in enumerate(self._items):
            if k == present[0] and insert:
                items.append((sid, {"role": "assistant", "content": SUMMARY_PREFIX + text}))
            if item_id not in sources:
                items.append((item_id, message))
        self._keep(items)
        return True

    # ---- reading ----------------------------------------------------------------------------------------------
    def messages(self) -> list[Message]:
        """The list to send: system (and developer) messages first, as given, then the rest in order.

        Tool pairing follows the chat API: a tool message answers the nearest earlier assistant message that
        issued its ``tool_call_id`` (ids repeat across a session). A tool message with no such call is dropped;
        a tool call whose result is missing is dropped from a copy of its assistant message, and the message
        too when nothing else is left of it; a second answer to one call is dropped. Each assistant message is
        followed directly by its answers, in the order they were held, so a message that a swap or a recall
        left between a call and its result moves to after the results (the API wants them adjacent).
        """
        return [message for _, message in self.items()]

    def items(self) -> list[tuple[str, Message]]:
        """:meth:`messages` with each message's item id (copies)."""
        system = [(i, m) for i, m in self._items if m.get("role") in _SYSTEM_ROLES]
        rest = [(i, m) for i, m in self._items if m.get("role") not in _SYSTEM_ROLES]
        issuer: dict[str, int] = {}  # tool-call id -> position in rest of the nearest assistant that issued it
        answers: dict[int, dict[str, int]] = {}  # assistant position -> call id -> position of its answer
        for k, (_, message) in enumerate(rest):
            role = message.get("role")
            if role == "assistant":
                for call_id in _call_ids(message):
                    issuer[call_id] = k
            elif role == "tool":
                call_id = message.get("tool_call_id")
                if isinstance(call_id, str) and call_id in issuer:
                    answers.setdefault(issuer[call_id], {}).setdefault(call_id, k)
        out = [(i, copy.deepcopy(m)) for i, m in system]
        for k, (item_id, message) in enumerate(rest):
            role = message.get("role")
            if role == "tool":
                continue  # sent right after its assistant message, or not at all
            if role != "assistant":
                out.append((item_id, copy.deepcopy(message)))
                continue
            answered = answers.get(k, {})
            calls, seen = [], set()
            for call in message.get("tool_calls") or []:
                call_id = call.get("id") if isinstance(call, Mapping) else None
                if call_id in answered and call_id not in seen:
                    seen.add(call_id)
                    calls.append(copy.deepcopy(call))
            kept = {key: copy.deepcopy(v) for key, v in message.items() if key != "tool_calls"}
            if calls:
                kept["tool_calls"] = calls
            elif not any(kept.get(key) for key in _PAYLOAD_KEYS):
                continue  # nothing left of it (or nothing there: the API refuses an empty assistant message)
            out.append((item_id, kept))
            for j in sorted(answered[c] for c in seen):
                out.append((rest[j][0], copy.deepcopy(rest[j][1])))
        return out

    def item_ids(self) -> list[str]:
        """The ids of every item in the context, in context order (offloaded items excluded). It may name items
        :meth:`messages` leaves out (a tool result whose call is gone); :meth:`items` pairs ids with what is sent."""
        return [item_id for item_id, _ in self._items]

    @property
    def offloaded(self) -> dict[str, Message]:
        """Offloaded items by id (copies), in the order they were offloaded; a ``recall`` brings them back."""
        return copy.deepcopy(self._offloaded)

    @property
    def stale(self) -> dict[str, StaleMemory]:
        """Memories ``stale_context`` decisions named, by id: their new status and ``replaced_by`` (the memory
        to recall instead, when there is one), in the order they were reported."""
        return dict(self._stale)

    def _keep(self, items: list[tuple[str, Message]]) -> None:
        self._items = items
        self._ids = {item_id for item_id, _ in items}


def _call_ids(message: Mapping[str, Any]) -> list[str]:
    """The tool-call ids an assistant message issued."""
    return [c["id"] for c in message.get("tool_calls") or [] if isinstance(c, Mapping) and isinstance(c.get("id"), str)]
