"""The SDK's child runs: each in a session of its own under its parent's, in this process (``child``) or another
(``handoff`` and ``delegated``), so a sub-agent's session memory and recall are its own and the worker's
``delegation_shared_session`` rule never fires on an SDK child."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

from ctxflow.schemas.models import ItemKind, MemoryScope, MemoryType, PrivacyMode, Role, Slot
from ctxflow.streams.sdk import Delegation, RunContext
from ctxflow.streams.sdk.run_context import child_session, in_session
from hypothesis import given
from hypothesis import strategies as st

NOW = datetime(2025, 2, 3, 8, 30, tzinfo=UTC)


def root(**kw: object) -> RunContext:
    ids = (f"id-{n}" for n in itertools.count())
    return RunContext(tenant_id="acme", user_id="u1", session_id="s1", agent_id="planner", model="gpt-4o",
                      run_id="root", id_factory=lambda: next(ids), clock=lambda: NOW, **kw)  # type: ignore[arg-type]


def test_a_child_runs_in_a_session_of_its_own_under_its_parents() -> None:
    parent = root()
    child = parent.child("researcher", run_id="kid")
    grandchild = child.child("critic")
    assert child.session_id == "s1/kid"
    assert grandchild.session_id == f"s1/kid/{grandchild.run_id}"
    assert (grandchild.parent_run_id, grandchild.workflow_id) == ("kid", "root")
    # Everything the child builds carries its own session, its parent's run as parent.
    note = child.memory_candidate(MemoryScope.SESSION, MemoryType.FACT, "order 4411 failed", confidence=0.9)
    turn = child.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "find the logs")
    for event in (child.started(), turn, note):
        assert (event.session_id, event.parent_run_id) == ("s1/kid", "root")


def test_a_childs_generated_run_id_names_its_session_and_ids_are_drawn_as_before() -> None:
    parent = root()
    child = parent.child("helper")
    assert child.run_id == "id-0" and child.session_id == "s1/id-0"  # one id drawn, for the run and its session
    assert parent.id_factory() == "id-1"


def test_a_delegated_child_in_another_process_gets_its_own_session_from_the_handoff() -> None:
    parent = root(privacy=PrivacyMode.NO_RETENTION, policy_version="p-7")
    handoff = parent.handoff()
    assert handoff.session_id == "s1"  # the parent's: the child derives its own from it
    remote = RunContext.delegated(handoff.model_dump_json(), "remote", run_id="far", privacy=PrivacyMode.RETAINED)
    assert (remote.session_id, remote.parent_run_id, remote.workflow_id) == ("s1/far", "root", "root")
    assert (remote.privacy, remote.policy_version, remote.user_id) == (PrivacyMode.NO_RETENTION, "p-7", "u1")
    generated = RunContext.delegated(Delegation.model_validate_json(handoff.model_dump_json()), "remote")
    assert generated.session_id == f"s1/{generated.run_id}" and generated.run_id
    # Two sub-agents of one parent never share a session.
    assert RunContext.delegated(handoff, "remote").session_id != generated.session_id


@given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_a_child_session_groups_under_its_parents_and_is_never_its_parents(parent: str, run: str, other: str
                                                                          ) -> None:
    mine = child_session(parent, run)
    assert mine != parent and in_session(mine, parent) and in_session(parent, parent)
    assert in_session(child_session(mine, other), parent)  # a grandchild too
    assert not in_session(parent, mine)
    assert not in_session(None, parent)
    if not (other == parent or other.startswith(f"{parent}/")):
        assert not in_session(other, parent)
