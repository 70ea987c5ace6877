"""The whole story through both clients, on both backends: a hierarchy, a task routed
Global -> Project -> Orchestration and completed there, the completion bubbling up, the
chain, a decomposed parent whose subtasks complete it, the tree, and the listings."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import REPO, Server

import hopper_delegation
from hopper_delegation import (
    AsyncHopperClient,
    DelegationDirection,
    DelegationStatus,
    DelegationType,
    EventKind,
    HopperClient,
    InstanceStatus,
    Scope,
    TaskStatus,
)
from hopper_delegation._proto import delegation_service_pb2, resources_pb2

RESULT = {"tests": 118, "coverage": 0.93, "artifact": "build-42", "steps": [1, 2.5, {"n": 3}]}


def register_tree(client: HopperClient) -> None:
    client.register_instance(id="global", name="Global", scope=Scope.GLOBAL)
    client.register_instance(
        id="project", name="Project", scope=Scope.PROJECT, parent_id="global",
        status=InstanceStatus.RUNNING, config={"repo": "hopper", "workers": 4},
    )  # fmt: skip
    for child in ("orch", "orch2"):
        client.register_instance(
            id=child, name=child, scope=Scope.ORCHESTRATION, parent_id="project"
        )


def test_a_completion_at_orchestration_bubbles_to_global(server: Server) -> None:
    with HopperClient(server.target) as client:
        register_tree(client)
        project = client.get_instance(id="project")
        assert project.config == {"repo": "hopper", "workers": 4}
        assert isinstance(project.config["workers"], int)
        assert project.parent_id == "global" and project.status is InstanceStatus.RUNNING
        assert project.created_at.tzinfo is not None
        assert abs(project.created_at - datetime.now(UTC)) < timedelta(minutes=5)

        task = client.create_task(id="t", title="Ship it", instance_id="global")
        assert task.status is TaskStatus.PENDING and task.parent_task_id is None
        watch = client.watch("global", descendants=True, after=0)
        to_project = client.create_delegation(
            task_id="t", source_instance_id="global", target_instance_id="project",
            notes="please", delegated_by="operator", complete_within=timedelta(hours=1),
        )  # fmt: skip
        assert to_project.status is DelegationStatus.PENDING
        assert to_project.parent_delegation_id is None
        assert to_project.complete_by is not None and to_project.accept_by is None
        client.accept_delegation(id=to_project.id)
        to_orch = client.create_delegation(
            task_id="t", source_instance_id="project", target_instance_id="orch"
        )
        assert to_orch.parent_delegation_id == to_project.id
        accepted = client.accept_delegation(id=to_orch.id)
        assert accepted.accepted_at is not None and accepted.completed_at is None

        done = client.complete_delegation(id=to_orch.id, result=RESULT, notes="green")
        assert done.delegation.status is DelegationStatus.COMPLETED
        assert done.delegation.notes == "green"
        assert [d.id for d in done.completed_ancestors] == [to_project.id]
        assert done.completed_ancestors[0].result == RESULT
        assert done.task.status is TaskStatus.DONE and done.task.instance_id == "global"
        assert done.task.result == RESULT
        assert isinstance(done.task.result["tests"], int)

        chain = client.get_delegation_chain(task_id="t")
        assert [d.id for d in chain.delegations] == [to_project.id, to_orch.id]
        assert (chain.origin_instance_id, chain.current_instance_id) == ("global", "global")

        kinds = []
        for event in watch:
            kinds.append(event.kind)
            if event.kind is EventKind.TASK_COMPLETED:
                break
        watch.close()
        assert kinds == [
            EventKind.DELEGATION_CREATED,
            EventKind.DELEGATION_ACCEPTED,
            EventKind.DELEGATION_CREATED,
            EventKind.DELEGATION_ACCEPTED,
            EventKind.DELEGATION_COMPLETED,
            EventKind.DELEGATION_COMPLETED,
            EventKind.TASK_COMPLETED,
        ]
        assert watch.cursor is not None and watch.cursor >= 7


def test_a_decomposed_task_completes_when_its_subtasks_do(server: Server) -> None:
    with HopperClient(server.target) as client:
        register_tree(client)
        client.create_task(id="p", title="Parent", instance_id="global")
        hop = client.create_delegation(
            task_id="p", source_instance_id="global", target_instance_id="project"
        )
        client.accept_delegation(id=hop.id)
        for sub, target in (("s1", "orch"), ("s2", "orch2")):
            client.create_task(id=sub, title=sub, parent_task_id="p")
            d = client.create_delegation(
                task_id=sub, source_instance_id="project", target_instance_id=target,
                delegation_type=DelegationType.DECOMPOSE,
            )  # fmt: skip
            client.accept_delegation(id=d.id)
        assert [t.id for t in client.list_subtasks(task_id="p", page_size=1)] == ["s1", "s2"]
        tree = client.get_delegation_tree(task_id="p")
        assert tree.task.id == "p" and [t.id for t in tree.subtasks] == ["s1", "s2"]
        assert len(tree.delegations) == 3

        first = client.complete_task(task_id="s1", result={"part": 1})
        assert first.task.status is TaskStatus.DONE
        parent = client.get_task(id="p")
        assert parent.status is not TaskStatus.DONE
        last = client.complete_task(task_id="s2", result={"part": 2})
        assert last.task.status is TaskStatus.DONE
        parent = client.get_task(id="p")
        assert parent.status is TaskStatus.DONE
        assert parent.result == {"subtasks": {"s1": {"part": 1}, "s2": {"part": 2}}}

        # Listings read every page.
        incoming = client.list_instance_delegations(
            instance_id="project", direction=DelegationDirection.INCOMING, page_size=1
        )
        assert [d.id for d in incoming] == [hop.id]
        outgoing = list(
            client.list_instance_delegations(
                instance_id="project", direction=DelegationDirection.OUTGOING, page_size=1
            )
        )
        assert [d.task_id for d in outgoing] == ["s1", "s2"]
        counts = client.count_delegations(instance_id="project")
        assert counts[DelegationStatus.COMPLETED] == 3 and counts[DelegationStatus.PENDING] == 0
        assert set(counts) == set(DelegationStatus)
        tree_nodes = client.get_instance_tree(root_id="global")
        assert [n.instance.id for n in tree_nodes] == ["global", "orch", "orch2", "project"]
        assert [i.id for i in client.list_instances(parent_id="project", page_size=1)] == [
            "orch",
            "orch2",
        ]
        listed = list(client.list_task_delegations(task_id="p"))
        assert listed == [client.get_delegation(id=hop.id)]


def test_the_other_transitions(server: Server) -> None:
    with HopperClient(server.target) as client:
        register_tree(client)
        client.create_task(id="t", title="T", instance_id="global")
        d = client.create_delegation(
            task_id="t", source_instance_id="global", target_instance_id="project"
        )
        assert client.list_pending_delegations(instance_id="project").__next__().id == d.id
        assert client.update_delegation(id=d.id, notes="n").notes == "n"
        rejected = client.reject_delegation(id=d.id, reason="busy")
        assert rejected.status is DelegationStatus.REJECTED
        assert rejected.rejection_reason == "busy"
        d = client.create_delegation(
            task_id="t", source_instance_id="global", target_instance_id="project"
        )
        cancelled = client.cancel_delegation(id=d.id)
        assert cancelled.delegation.status is DelegationStatus.CANCELLED
        assert cancelled.task.instance_id == "global"
        gone = client.cancel_task(task_id="t")
        assert gone.task.status is TaskStatus.CANCELLED
        stopped = client.update_instance_status(id="orch2", status=InstanceStatus.STOPPED)
        assert stopped.status is InstanceStatus.STOPPED


async def test_the_story_on_the_async_client(server: Server) -> None:
    async with AsyncHopperClient(server.target) as client:
        await client.register_instance(id="global", name="Global", scope=Scope.GLOBAL)
        await client.register_instance(
            id="project", name="Project", scope=Scope.PROJECT, parent_id="global"
        )
        await client.register_instance(
            id="orch", name="Orch", scope=Scope.ORCHESTRATION, parent_id="project"
        )
        await client.create_task(id="t", title="Ship it", instance_id="global")
        watch = client.watch("global", descendants=True, after=0)
        to_project = await client.create_delegation(
            task_id="t", source_instance_id="global", target_instance_id="project"
        )
        await client.accept_delegation(id=to_project.id)
        to_orch = await client.create_delegation(
            task_id="t", source_instance_id="project", target_instance_id="orch"
        )
        await client.accept_delegation(id=to_orch.id)
        done = await client.complete_delegation(id=to_orch.id, result=RESULT)
        assert [d.id for d in done.completed_ancestors] == [to_project.id]
        assert done.task.status is TaskStatus.DONE and done.task.result == RESULT
        chain = await client.get_delegation_chain(task_id="t")
        assert [d.id for d in chain.delegations] == [to_project.id, to_orch.id]
        tree = await client.get_delegation_tree(task_id="t")
        assert len(tree.delegations) == 2
        pages = [d.id async for d in client.list_task_delegations(task_id="t", page_size=1)]
        assert pages == [to_project.id, to_orch.id]
        sequences = []
        async for event in watch:
            sequences.append(event.sequence)
            if event.kind is EventKind.TASK_COMPLETED:
                break
        await watch.aclose()
        assert sequences == sorted(sequences) and len(sequences) == 7
        assert watch.cursor == sequences[-1]
    with pytest.raises(RuntimeError, match="closed"):
        await client.get_task(id="t")


def test_the_enums_are_the_protos() -> None:
    for name in (
        "Scope",
        "InstanceStatus",
        "TaskStatus",
        "DelegationType",
        "DelegationStatus",
        "ExpiryReason",
    ):
        ours = getattr(hopper_delegation, name)
        proto = resources_pb2.DESCRIPTOR.enum_types_by_name[name]
        prefix = proto.values[0].name.removesuffix("UNSPECIFIED")
        assert {f"{prefix}{m.name}": m.value for m in ours} == {
            v.name: v.number for v in proto.values if v.number
        }, name
    for name in ("EventKind", "DelegationDirection"):
        ours = getattr(hopper_delegation, name)
        proto = delegation_service_pb2.DESCRIPTOR.enum_types_by_name[name]
        prefix = proto.values[0].name.removesuffix("UNSPECIFIED")
        assert {f"{prefix}{m.name}": m.value for m in ours} == {
            v.name: v.number for v in proto.values if v.number
        }, name


def test_the_shipped_service_config_is_the_repositorys() -> None:
    shipped = Path(hopper_delegation.__file__).with_name("service_config.json")
    source = REPO / "proto" / "hopper" / "delegation" / "v1" / "service_config.json"
    assert json.loads(shipped.read_text()) == json.loads(source.read_text())


def test_every_public_name_is_importable_from_the_package() -> None:
    for name in hopper_delegation.__all__:
        assert getattr(hopper_delegation, name) is not None
    rpcs = [
        m.name
        for service in ("delegation_service_pb2", "instance_service_pb2", "task_service_pb2")
        for s in getattr(hopper_delegation._proto, service).DESCRIPTOR.services_by_name.values()
        for m in s.methods
    ]
    snake = [
        "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_") for name in rpcs
    ]
    for client in (HopperClient, AsyncHopperClient):
        missing = [name for name in snake if not callable(getattr(client, name, None))]
        assert missing == [], client


@pytest.mark.parametrize("target", ["http://10.0.0.1:1,10.0.0.2:2", "dns:///hopper:50051"])
def test_targets_of_several_replicas(target: str) -> None:
    client = HopperClient(target)
    expected = "ipv4:10.0.0.1:1,10.0.0.2:2" if target.startswith("http") else target
    assert client.connection.target == expected
    client.close()
    with pytest.raises(ValueError, match="IP addresses"):
        HopperClient("http://a:1,b:2")
