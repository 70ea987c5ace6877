"""hopper_delegation.compat through upstream Hopper's own scenarios: create -> accept ->
complete, reject with a reason, and the chain of a task routed Global -> Project ->
Orchestration; the records validate as upstream's pydantic ``DelegationResponse``."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

import pytest
from conftest import Server
from pydantic import BaseModel, ConfigDict

from hopper_delegation import FailedPrecondition, HopperClient, InstanceStatus, Scope
from hopper_delegation.compat import TaskDelegationRepository


# upstream's api/schemas/task_delegation.py, its fields and configuration.
class DelegationType(str, Enum):  # noqa: UP042 (as upstream declares it)
    ROUTE = "route"
    DECOMPOSE = "decompose"
    ESCALATE = "escalate"
    REASSIGN = "reassign"


class DelegationStatus(str, Enum):  # noqa: UP042
    PENDING = "pending"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class DelegationResponse(BaseModel):
    model_config = ConfigDict(from_attributes=True, use_enum_values=True)

    id: str
    task_id: str
    source_instance_id: str | None = None
    target_instance_id: str | None = None
    delegation_type: DelegationType
    status: DelegationStatus
    delegated_at: datetime
    accepted_at: datetime | None = None
    completed_at: datetime | None = None
    result: dict[str, Any] | None = None
    rejection_reason: str | None = None
    notes: str | None = None
    delegated_by: str | None = None
    created_at: datetime
    updated_at: datetime


def tree(client: HopperClient) -> TaskDelegationRepository:
    for id, scope, parent in (
        ("global-del", Scope.GLOBAL, None),
        ("project-del", Scope.PROJECT, "global-del"),
        ("orch-del", Scope.ORCHESTRATION, "project-del"),
    ):
        client.register_instance(
            id=id, name=id, scope=scope, parent_id=parent, status=InstanceStatus.RUNNING
        )
    return TaskDelegationRepository(client)


def test_create_accept_complete(server: Server) -> None:
    with HopperClient(server.target) as client:
        repo = tree(client)
        client.create_task(id="TASK-1", title="Test", instance_id="global-del")
        created = repo.create_delegation(
            "DEL-1", "TASK-1", "global-del", "project-del", delegated_by="router", notes="n"
        )
        assert (created.id, created.status, created.delegation_type) == (
            "DEL-1",
            "pending",
            "route",
        )
        assert (created.is_pending, created.is_active, created.is_terminal) == (True, True, False)
        assert repo.get_pending_delegations("project-del") == [created]
        assert repo.get_current_location("TASK-1") == "project-del"

        accepted = repo.mark_accepted("DEL-1")
        assert accepted is not None and accepted.status == "accepted"
        assert accepted.accepted_at is not None
        assert (accepted.is_pending, accepted.is_active, accepted.is_terminal) == (
            False,
            True,
            False,
        )
        assert repo.get_active_delegations("project-del") == [accepted]
        assert repo.get_outgoing_delegations("global-del") == [accepted]

        result = {"output": "Success", "artifacts": ["file.txt"]}
        completed = repo.mark_completed("DEL-1", result)
        assert completed is not None and completed.status == "completed"
        assert completed.result == result and completed.completed_at is not None
        assert (completed.is_pending, completed.is_active, completed.is_terminal) == (
            False,
            False,
            True,
        )
        assert repo.get_current_location("TASK-1") is None
        assert repo.get_latest_delegation("TASK-1") == completed
        assert repo.count_delegations_by_status("project-del") == {
            "pending": 0,
            "accepted": 0,
            "rejected": 0,
            "completed": 1,
            "cancelled": 0,
        }
        response = DelegationResponse.model_validate(completed, from_attributes=True)
        assert response.status == "completed" and response.result == result
        assert response.notes == "n" and response.delegated_by == "router"
        # Unknown ids read as None, as upstream's repository returns them.
        assert repo.mark_accepted("nope") is None and repo.get("nope") is None
        with pytest.raises(FailedPrecondition):
            repo.mark_cancelled("DEL-1")


def test_reject_with_a_reason(server: Server) -> None:
    with HopperClient(server.target) as client:
        repo = tree(client)
        client.create_task(id="TASK-2", title="Test", instance_id="global-del")
        # Without a source: from where the task is.
        repo.create_delegation("DEL-2", "TASK-2", None, "project-del")
        rejected = repo.mark_rejected("DEL-2", "Instance is busy")
        assert rejected is not None and rejected.status == "rejected"
        assert rejected.rejection_reason == "Instance is busy" and rejected.is_terminal
        assert client.get_task(id="TASK-2").instance_id == "global-del"
        DelegationResponse.model_validate(rejected, from_attributes=True)
        repo.create_delegation("DEL-3", "TASK-2", "global-del", "project-del")
        cancelled = repo.mark_cancelled("DEL-3")
        assert cancelled is not None and cancelled.status == "cancelled"


def test_the_chain_of_a_task_routed_global_project_orchestration(server: Server) -> None:
    with HopperClient(server.target) as client:
        repo = tree(client)
        client.create_task(id="TASK-CHAIN", title="Chained Task", instance_id="global-del")
        repo.create_delegation("DEL-CHAIN-1", "TASK-CHAIN", "global-del", "project-del")
        repo.mark_accepted("DEL-CHAIN-1")
        repo.create_delegation("DEL-CHAIN-2", "TASK-CHAIN", "project-del", "orch-del")
        repo.mark_accepted("DEL-CHAIN-2")
        chain = repo.get_delegation_chain("TASK-CHAIN")
        assert [d.id for d in chain] == ["DEL-CHAIN-1", "DEL-CHAIN-2"]
        assert chain[0].source_instance_id == "global-del"
        assert chain[1].target_instance_id == "orch-del"
        assert repo.get_delegations_for_task("TASK-CHAIN") == chain
        assert repo.get_current_location("TASK-CHAIN") == "orch-del"
        # The completion at Orchestration bubbles: both hops complete.
        repo.mark_completed("DEL-CHAIN-2", {"output": "done"})
        statuses = [d.status for d in repo.get_delegation_chain("TASK-CHAIN")]
        assert statuses == ["completed", "completed"]
        for record in repo.get_delegation_chain("TASK-CHAIN"):
            DelegationResponse.model_validate(record, from_attributes=True)


def test_an_expired_hop_reads_as_upstreams_cancelled(server: Server) -> None:
    """A hop whose target's lease lapsed: upstream has no "expired", so it is "cancelled"."""
    with HopperClient(server.target) as client:
        repo = tree(client)
        client.register_instance(
            id="leased", name="leased", scope=Scope.ORCHESTRATION, parent_id="project-del",
            lease=timedelta(seconds=1),
        )  # fmt: skip
        client.create_task(id="TASK-X", title="x", instance_id="project-del")
        repo.create_delegation("DEL-X", "TASK-X", "project-del", "leased")
        deadline = time.monotonic() + 30
        while (record := repo.get("DEL-X")) is not None and record.status == "pending":
            assert time.monotonic() < deadline, "the hop never expired"
            time.sleep(0.1)
        assert record is not None and record.status == "cancelled" and record.is_terminal
        DelegationResponse.model_validate(record, from_attributes=True)
        assert repo.count_delegations_by_status("leased")["cancelled"] == 1
